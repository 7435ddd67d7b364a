"""One prepared GPU run: pi-lora's CUDA checks in priority order, under one deadline.

    python benchmarks/gpu_check.py --out $OUT/gpu-check   # on the lent GPU (~8 min); make gpu-check
    python benchmarks/gpu_check.py --dry-run               # rehearsal on a CPU machine, tiny sizes

Stages (docs/gpu.md): wheels (the carried .whl/ installed into a private site), env, tests
(`pytest -m gpu`), bench (7B-shaped LoRA step at 16k and 32k, pi-lora vs transformers+peft),
plan (the planner beside each measured peak; its max context on one 80 GB GPU), max-context
(doubling under a memory cap), smollm2 (8k -> 32k fine-tune, when its package is installed).
Each stage gets min(its budget, time to the deadline); results.json and summary.md are
rewritten after every stage, so a run cut short keeps what it measured. The results folder
holds at most 8 files, all the device returns.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.gpu_stages import (
    GIB,
    INF,
    REPO,
    SITE,
    STAGES,
    TARGETS,
    Context,
    StageTimeout,
)

# ----------------------------------------------------------------------------- results


def target_lines(results: dict[str, Any]) -> list[str]:
    """Each target of issue #23 against what was measured, or that it was not."""
    rows = results.get("bench", {}).get("rows", [])
    ours = sorted((r for r in rows if r["setting"] == "pi-lora"), key=lambda r: r["seq_len"])
    verdict = {True: "met", False: "not met"}
    lines = ["- MFU: not measured"]
    if ours and ours[-1].get("mfu") is not None:
        lines = [f"- MFU at {ours[-1]['seq_len']}: {ours[-1]['mfu']:.1%} (target >= 45%: "
                 f"{verdict[ours[-1]['mfu'] >= 0.45]})"]
    if ours and ours[0].get("memory_ratio") is not None:
        ratio = ours[0]["memory_ratio"]
        lines.append(f"- peak at {ours[0]['seq_len']}, pi-lora / baseline: {ratio:.2f} "
                     f"(target <= 0.5: {verdict[ratio <= 0.5]})")
    errors = [abs(r["error"]) for r in results.get("plan", {}).get("rows", [])]
    lines.append(f"- plan vs measured peak: worst {max(errors):.1%} (target <= 15%: "
                 f"{verdict[max(errors) <= 0.15]})" if errors else "- plan vs measured: none")
    measured = results.get("max-context", {})
    planned = results.get("plan", {}).get("max_context_h100_80gb")
    lines.append(f"- max context measured (7B-shaped bf16 LoRA, cap {measured.get('cap_gib', '-')}"
                 f" GiB): {json.dumps(measured.get('largest')) if measured else '-'}; the "
                 f"planner on one 80 GB H100: {json.dumps(planned) if planned else '-'}; Unsloth:"
                 " 342k (8B QLoRA, 80 GB); ALST: 500K (8B, one H100)")
    return lines


def render_summary(results: dict[str, Any]) -> str:
    run, env = results.get("run", {}), results.get("env", {})
    lines = [f"# pi-lora GPU check{' (dry run)' if run.get('dry_run') else ''}", "",
             f"Started {run.get('started')}, deadline {run.get('deadline_min')} min. GPU: "
             f"{env.get('gpu') or '-'} (nvidia-smi: {env.get('nvidia_smi', '-')}). Packages: "
             f"{json.dumps(env.get('packages', {}))}.", "", f"Targets (issue #23): {TARGETS}.",
             "", *target_lines(results), "", "| stage | status | s | budget (s) | note |",
             "|---|---|---|---|---|"]
    for name in (n for n in STAGES if n in results):
        r = results[name]
        budget = "rest" if r.get("budget_s") is None else r["budget_s"]
        note = str(r.get("note", "")).replace("|", "/")
        lines.append(f"| {name} | {r.get('status')} | {r.get('seconds', '-')} | {budget} | {note} |")
    outcomes = results.get("tests", {}).get("outcomes", {})
    failed = [f"- `{k}`: {v}" for k, v in outcomes.items() if v.startswith("failed")]
    lines += ["", "## Tests that failed", "", *failed] if failed else []
    bench = results.get("bench", {})
    if bench.get("table"):
        lines += ["", f"## LoRA step ({bench['model']})", "", bench["table"], "", bench["formula"]]
    if results.get("plan", {}).get("rows"):
        lines += ["", "## Plan vs measured peak (max_memory_allocated on CUDA)", "",
                  "| setting | seq_len | plan (GiB) | measured (GiB) | error |", "|---|---|---|---|---|"]
        lines += [f"| {r['setting']} | {r['seq_len']} | {r['predicted_bytes'] / GIB:.2f} | "
                  f"{r['measured_bytes'] / GIB:.2f} | {r['error']:+.1%} |"
                  for r in results["plan"]["rows"]]
    return "\n".join(lines) + "\n"


def write_results(ctx: Context) -> None:
    """results.json (everything) and summary.md (for a reader), rewritten after each stage."""
    (ctx.out / "results.json").write_text(json.dumps(ctx.results, indent=1, default=str))
    (ctx.out / "summary.md").write_text(render_summary(ctx.results))


# ----------------------------------------------------------------------------- driver


def run_stages(ctx: Context, names: list[str]) -> bool:
    """The stages in order; True when none failed. A stage that raises is recorded (its
    traceback in check.log) and the next one runs; one past its time keeps its partial record."""
    all_ok = True
    for name in names:
        stage, budget = STAGES[name]
        started = time.monotonic()
        ctx.stage_end = started + budget
        record: dict[str, Any] = {"status": "skipped", "note": "the deadline came first"}
        try:
            if ctx.left() > 1:
                print(f"gpu-check: {name} (up to {ctx.left():.0f} s)", flush=True)
                record = {"status": "ok", **stage(ctx)}
        except StageTimeout as exc:
            record = {**ctx.results.get(name, {}), "status": "timeout", "note": str(exc)}
        except KeyboardInterrupt:
            ctx.results[name] = {**ctx.results.get(name, {}), "status": "interrupted"}
            write_results(ctx)
            raise
        except Exception as exc:  # recorded; the later stages still run
            ctx.log(traceback.format_exc())
            record = {**ctx.results.get(name, {}), "status": "failed",
                      "note": f"{type(exc).__name__}: {exc}"[:300]}
        record.update(seconds=round(time.monotonic() - started, 1),
                      budget_s=None if budget == INF else budget)
        ctx.results[name] = record
        all_ok &= record["status"] in ("ok", "skipped")
        write_results(ctx)
        print(f"gpu-check: {name}: {record['status']} ({record['seconds']:.0f} s) "
              f"{record.get('note', '')}", flush=True)
    return all_ok


GPU_PROBE = """
try:
    import torch
except ImportError:
    print("torch is not installed")
else:
    if not torch.cuda.is_available():
        print(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})")
"""


def no_gpu_reason() -> str | None:
    """Why this machine cannot run the check, or None. Asked in a child: this process imports
    nothing heavy before the carried wheels are in place (torch would load the image's
    typing_extensions first) and never holds a CUDA context."""
    probe = subprocess.run([sys.executable, "-c", GPU_PROBE], capture_output=True, text=True,
                           check=False)
    if probe.returncode != 0:
        return f"python could not ask torch: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else None


def prepare_environment() -> None:
    """Carried wheels first, then this checkout (pi-lora is not installed on the device), for
    this process and its children; offline; output unbuffered."""
    SITE.mkdir(parents=True, exist_ok=True)  # before sys.path sees it, or it is cached as absent
    paths = [str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")]
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
                      TOKENIZERS_PARALLELISM="false")
    sys.path.insert(0, str(SITE))  # the carried wheels before the image's own packages


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="results folder (default: docs/results/gpu/"
                        "TIMESTAMP; build/gpu-check-dry-run/TIMESTAMP with --dry-run)")
    parser.add_argument("--deadline-min", type=float, default=8.0, help="the whole run (8)")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma list, run in this order")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny sizes, tests "
                        "collected only, wheels not installed")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels")
    parser.add_argument("--work-dir", type=Path, default=REPO / "build" / "gpu-check-work")
    parser.add_argument("--mem-limit-gb", type=float, default=78.0, help="max-context cap in "
                        "allocated GiB (78: about what an 80 GB H100 leaves torch)")
    args = parser.parse_args(argv)
    args.stages = [name for name in args.stages.split(",") if name]
    unknown = [name for name in args.stages if name not in STAGES]
    if unknown:
        parser.error(f"unknown stage {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if args.deadline_min <= 0:
        parser.error("--deadline-min must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = None if args.dry_run else no_gpu_reason()
    if reason:
        print(f"no GPU: {reason}; rehearse on this machine with --dry-run", file=sys.stderr)
        return 2
    where = "build/gpu-check-dry-run" if args.dry_run else "docs/results/gpu"
    out = args.out or REPO / where / time.strftime("%Y%m%d-%H%M%S")
    if out.exists() and any(out.iterdir()):
        print(f"gpu-check: {out} already holds results; give another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    prepare_environment()
    ctx = Context(args, out, time.monotonic() + 60 * args.deadline_min)
    ctx.results["run"] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "dry_run": args.dry_run,
                          "deadline_min": args.deadline_min, "stages": args.stages}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        all_ok = run_stages(ctx, args.stages)
    except KeyboardInterrupt:
        print(f"gpu-check: interrupted; what was measured is in {out}", file=sys.stderr)
        return 130
    files = sorted(p.name for p in out.iterdir())
    print(f"gpu-check: results in {out}: {', '.join(files)}"
          + ("" if len(files) <= 8 else " (more than the 8 files the device returns)"))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
