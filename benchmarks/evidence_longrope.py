"""`make evidence-longrope`: LongRoPE's factor search on the demo base, against the methods it
starts from, zero-shot and after the demo's fine-tune, with the commands a real run uses.

    python -m benchmarks.evidence_longrope --out build/longrope      # about 10 min on 2 cores

The search scores candidates on one held-out play (The Tempest); perplexity and passkey are
measured on the other (Hamlet), so the factors are not judged on the text they were fit to.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from pi_lora.demo.run import FULL, RECIPES, SHIPPED_BASE, TARGET_CONTEXT, pi_lora, table, write_data


def run(out: Path, population: int, generations: int, samples: int) -> str:
    started = time.perf_counter()
    train_file, eval_dir = write_data(out)
    search_docs, eval_docs = out / "data" / "search", out / "data" / "eval-hamlet"
    for folder, play in ((search_docs, "the-tempest"), (eval_docs, "hamlet")):
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(eval_dir / f"{play}.txt", folder / f"{play}.txt")
    recipe = str(RECIPES / "linear.yaml")
    common = ["--set", f"model.name={SHIPPED_BASE}", "--set", f"data.files=[{train_file}]"]
    seconds = {"search": pi_lora(
        "search", recipe, *common, "--docs", str(search_docs), "--out", str(out / "search"),
        "--population", str(population), "--generations", str(generations),
        "--samples", str(samples))}
    factors = out / "search" / "factors.json"
    releases, train_seconds = {}, {}
    for label, extra in (("linear PI x4, fine-tuned", []),
                         ("LongRoPE x4 (searched), fine-tuned",
                          ["--set", "rope.method=longrope",
                           "--set", f"rope.longrope.factors={factors}"])):
        stem = "longrope" if extra else "linear"
        run_dir, release = out / "runs" / stem, out / "release" / stem
        train_seconds[label] = pi_lora(
            "train", recipe, "--overwrite", *common, *extra, "--set", f"output_dir={run_dir}",
            "--set", f"training.max_steps={FULL.max_steps}")
        pi_lora("merge", str(run_dir), "--output", str(release), "--overwrite")
        releases[label] = release
    report_dir = out / "report"
    pi_lora("eval", str(SHIPPED_BASE), *[f"{k}={v}" for k, v in releases.items()],
            "--rope", "none", "--rope", f"linear:{TARGET_CONTEXT}",
            "--rope", f"yarn:{TARGET_CONTEXT}", "--rope", f"dynamic:{TARGET_CONTEXT}",
            "--rope", f"longrope:{factors}",
            "--passkey-lengths", ",".join(map(str, FULL.passkey_lengths)),
            "--trials", str(FULL.passkey_trials),
            "--ppl-lengths", ",".join(map(str, FULL.ppl_lengths)),
            "--max-windows", str(FULL.ppl_max_windows),
            "--docs", str(eval_docs), "--dtype", "fp32", "--out", str(report_dir))
    report = json.loads((report_dir / "report.json").read_text())
    found = json.loads(factors.read_text())
    search_line = (
        f"search: population {population}, {generations} generations, {samples} x "
        f"{TARGET_CONTEXT}-token windows of The Tempest; ppl {found['perplexity']:.2f} "
        f"(start: " + ", ".join(f"{k} {v:.2f}" for k, v in found["baselines"].items())
        + f"); {found['evaluations']} candidates in {seconds['search']:.0f} s")
    text = (f"{search_line}\n\n{table(report, train_seconds)}\n\ntotal wall time "
            f"{(time.perf_counter() - started) / 60:.1f} min; report: {report_dir}/report.md\n")
    (out / "longrope.md").write_text(text)
    print("\n" + text, flush=True)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/longrope"))
    parser.add_argument("--population", type=int, default=64)
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    run(args.out, args.population, args.generations, args.samples)


if __name__ == "__main__":
    main()
