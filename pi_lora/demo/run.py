"""`make demo`: the PI paper's experiment in miniature, with the commands a real run uses.

A tiny Llama trained on a 256-token window (``pi_lora/demo/base``, built by ``base.py``) is
extended to 1024 tokens by ``pi-lora train`` -> ``pi-lora merge`` with three recipes of equal
step budget (linear PI, YaRN, and the paper's control: fine-tuning at 1024 without
interpolation), then ``pi-lora eval`` measures every model, and the untuned base with each
rope method, on held-out Shakespeare (perplexity) and passkey retrieval.

    python -m pi_lora.demo.run --out build/demo          # full demo, about 8 min on 2 cores
    python -m pi_lora.demo.run --quick --out build/ci    # CI size, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pi_lora.demo.base import BaseSpec, build_base
from pi_lora.demo.corpus import load_plays, split_plays

SHIPPED_BASE = Path(__file__).parent / "base"
RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "demo"  # package data
TRAINED_CONTEXT = 256  # L of the shipped base
TARGET_CONTEXT = 4 * TRAINED_CONTEXT


@dataclass(frozen=True)
class Size:
    """What differs between the full demo and the CI run."""

    max_steps: int
    passkey_lengths: tuple[int, ...]
    passkey_trials: int  # per (length, depth); 5 depths
    ppl_lengths: tuple[int, ...]
    ppl_max_windows: int


FULL = Size(100, (256, 512, 768, 1024), 4, (256, 512, 1024), 12)
QUICK = Size(40, (256, 1024), 2, (256, 1024), 4)

# (recipe stem, report label); the same step budget for all three
FINE_TUNES = (
    ("linear", "linear PI x4, fine-tuned"),
    ("yarn", "YaRN x4, fine-tuned"),
    ("direct", "direct fine-tune at 4L (no interpolation)"),
    ("linear-short-mix", "linear PI x4 + short_mix (50% at L), fine-tuned"),
    ("linear-pose", "linear PI x4, PoSE rows of L, fine-tuned"),
    ("yarn-pose", "YaRN x4, PoSE rows of L, fine-tuned"),
    ("direct-pose", "no interpolation, PoSE rows of L, fine-tuned"),
)


def pi_lora(*args: str) -> float:
    """Run one `pi-lora` command as a user would; its output streams through. Returns seconds."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "pi_lora.cli", *args]
    print("$ pi-lora " + " ".join(args), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return time.perf_counter() - started


def ensure_base(out: Path, rebuild: bool, given: Path | None = None) -> Path:
    """The given or shipped base, or one built (and cached) under ``out/base``."""
    if given is not None:
        return given
    if not rebuild and (SHIPPED_BASE / "model.safetensors").is_file():
        return SHIPPED_BASE
    target = out / "base"
    if not (target / "model.safetensors").is_file():
        print(f"building the base model into {target} (minutes; cached afterwards)", flush=True)
        build_base(BaseSpec(), target)
    return target


def write_data(out: Path) -> tuple[Path, Path]:
    """Training plays as JSONL (for `pi-lora train`), held-out plays as .txt (for eval)."""
    train, held_out = split_plays(load_plays())
    train_file, eval_dir = out / "data" / "train.jsonl", out / "data" / "eval"
    eval_dir.mkdir(parents=True, exist_ok=True)
    with open(train_file, "w", encoding="utf-8") as lines:
        for play in train:
            lines.write(json.dumps({"text": play.text}) + "\n")
    for play in held_out:
        (eval_dir / f"{play.name}.txt").write_text(play.text, encoding="utf-8")
    return train_file, eval_dir


def fine_tune(stem: str, base: Path, train_file: Path, out: Path, size: Size) -> tuple[Path, float]:
    """`pi-lora train` then `pi-lora merge`; returns the release dir and the train seconds."""
    run_dir, release = out / "runs" / stem, out / "release" / stem
    seconds = pi_lora(
        "train", str(RECIPES / f"{stem}.yaml"), "--overwrite",
        "--set", f"model.name={base}",
        "--set", f"data.files=[{train_file}]",
        "--set", f"output_dir={run_dir}",
        "--set", f"training.max_steps={size.max_steps}",
    )
    pi_lora("merge", str(run_dir), "--output", str(release), "--overwrite")
    return release, seconds


def evaluate(base: Path, releases: dict[str, Path], eval_dir: Path, out: Path, size: Size) -> dict:
    """One `pi-lora eval` over the base (3 rope settings) and every release."""
    targets = [f"{label}={path}" for label, path in releases.items()]
    report_dir = out / "report"
    pi_lora(
        "eval", str(base), *targets,
        "--rope", "none", "--rope", f"linear:{TARGET_CONTEXT}", "--rope", f"yarn:{TARGET_CONTEXT}",
        "--passkey-lengths", ",".join(map(str, size.passkey_lengths)),
        "--trials", str(size.passkey_trials),
        "--ppl-lengths", ",".join(map(str, size.ppl_lengths)),
        "--max-windows", str(size.ppl_max_windows),
        "--docs", str(eval_dir), "--dtype", "fp32", "--out", str(report_dir),
    )
    return json.loads((report_dir / "report.json").read_text())


def table(report: dict, train_seconds: dict[str, float]) -> str:
    """The paper-style table: ppl at L, 2L, 4L; passkey accuracy per length; k_max; time."""
    first = report["targets"][0]
    ppl_lengths = list(first["perplexity"]["by_length"])
    pk_lengths = list(first["passkey"]["accuracy_by_length"])
    header = ["model"] + [f"ppl@{n}" for n in ppl_lengths] + [f"pk@{n}" for n in pk_lengths]
    header += ["k_max", "train s", "eval s"]
    rows = [header, ["---"] * len(header)]
    for target in report["targets"]:
        ppl, pk = target["perplexity"]["by_length"], target["passkey"]
        eval_seconds = sum(r["seconds"] for r in ppl.values())
        eval_seconds += sum(pk["seconds_by_length"].values())
        row = [target["label"]] + [f"{ppl[n]['ppl']:.2f}" for n in ppl_lengths]
        row += [f"{pk['accuracy_by_length'][n]:.0%}" for n in pk_lengths]
        seconds = train_seconds.get(target["label"])
        row += [str(pk["k_max"]), f"{seconds:.0f}" if seconds else "-", f"{eval_seconds:.0f}"]
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def run_demo(out: Path, quick: bool, rebuild_base: bool = False, base: Path | None = None) -> dict:
    """Everything `make demo` does; writes ``out/demo.md`` and returns the report dict."""
    size = QUICK if quick else FULL
    started = time.perf_counter()
    base = ensure_base(out, rebuild_base, base)
    train_file, eval_dir = write_data(out)
    releases, train_seconds = {}, {}
    for stem, label in FINE_TUNES:
        releases[label], train_seconds[label] = fine_tune(stem, base, train_file, out, size)
    report = evaluate(base, releases, eval_dir, out, size)
    text = table(report, train_seconds)
    total = time.perf_counter() - started
    where = out / "report" / "report.md"
    summary = f"{text}\n\ntotal wall time {total / 60:.1f} min; full report: {where}\n"
    (out / "demo.md").write_text(summary)
    print("\n" + summary, flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/demo"))
    parser.add_argument("--quick", action="store_true", help="CI size: fewer steps and trials")
    parser.add_argument("--rebuild-base", action="store_true",
                        help="train the base here instead of using the shipped one")
    parser.add_argument("--base", type=Path, help="use this base model directory instead")
    args = parser.parse_args()
    run_demo(args.out, args.quick, args.rebuild_base, args.base)


if __name__ == "__main__":
    main()
