"""Linear PI's budget curve on SmolLM2 (issue #33): perplexity against tokens trained, and the
budget the measured trend says each target needs.

    python -m benchmarks.pi_budget_curve --tokens-per-step 2048 \\
        --report 64=docs/results/smollm2-pi/ppl-step64/report.json \\
        --report 128=docs/results/smollm2-pi/ppl-step128/report.json \\
        --base 4.72,26.11 --yarn 5.08,8.90 --out docs/results/smollm2-pi/budget-curve.png

Reads `pi-lora eval` reports (their perplexity at the short and the long length), plots
ppl@short and ppl@long against tokens, and extrapolates with the power law the points follow
(the excess over the base, ppl / base - 1, against steps, fitted on a log-log line): an
estimate, printed as one, never a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path


def _report_ppl(path: Path, lengths: tuple[int, int]) -> tuple[float, float]:
    target = json.loads(path.read_text())["targets"][0]
    by_length = target["perplexity"]["by_length"]
    return by_length[str(lengths[0])]["ppl"], by_length[str(lengths[1])]["ppl"]


def fit_power_law(steps: list[int], excess: list[float]) -> tuple[float, float]:
    """(a, b) of excess = a * steps**b, least squares on log-log; needs >= 2 points > 0."""
    xs = [math.log(s) for s in steps]
    ys = [math.log(e) for e in excess]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / \
        sum((x - mean_x) ** 2 for x in xs)
    return math.exp(mean_y - slope * mean_x), slope


def steps_to_reach(a: float, b: float, excess: float) -> float | None:
    """Steps at which a * steps**b falls to `excess`; None when the fit does not fall."""
    return None if b >= 0 else (excess / a) ** (1 / b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", action="append", required=True, metavar="STEPS=REPORT_JSON")
    parser.add_argument("--lengths", default="2048,16384", help="short,long (default 2048,16384)")
    parser.add_argument("--base", required=True, help="base ppl at short,long")
    parser.add_argument("--yarn", required=True, help="untuned YaRN ppl at short,long")
    parser.add_argument("--tokens-per-step", type=int, required=True)
    parser.add_argument("--short-target", type=float, default=1.05,
                        help="ppl@short target as a multiple of the base's (default 1.05)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    short, long = (int(v) for v in args.lengths.split(","))
    base = [float(v) for v in args.base.split(",")]
    yarn = [float(v) for v in args.yarn.split(",")]
    points = sorted((int(s), *_report_ppl(Path(p), (short, long)))
                    for s, p in (r.split("=", 1) for r in args.report))
    steps = [p[0] for p in points]
    print(f"| steps | tokens | ppl@{short} | x base | ppl@{long} |")
    print("| --- | --- | --- | --- | --- |")
    for s, ppl_short, ppl_long in points:
        print(f"| {s} | {s * args.tokens_per_step:,} | {ppl_short:.2f} | "
              f"{ppl_short / base[0]:.3f} | {ppl_long:.2f} |")
    excess = [p[1] / base[0] - 1 for p in points]
    a, b = fit_power_law(steps, excess)
    need_short = steps_to_reach(a, b, args.short_target - 1)
    a_long, b_long = fit_power_law(steps, [p[2] for p in points])  # ppl@long itself, falling
    need_long = steps_to_reach(a_long, b_long, yarn[1])
    met = (points[-1][1] <= base[0] * args.short_target, points[-1][2] < yarn[1])
    for (what, need), done in zip(((f"ppl@{short} <= {args.short_target:g} x base", need_short),
                                   (f"ppl@{long} < untuned YaRN's {yarn[1]:g}", need_long)), met,
                                  strict=True):
        if done:
            words = f"reached by {steps[-1]} steps (measured)"
        elif need is None or need <= steps[-1]:  # the fit says "already", the data say no
            words = (f"not reached at {steps[-1]} steps, and the points flatten faster than a "
                     "power law: no estimate")
        else:
            words = f"~{need:,.0f} steps (~{need * args.tokens_per_step / 1e6:.1f}M tokens)"
        print(f"estimate (power law on {len(points)} points, not measured): {what}: {words}")
    if len(points) >= 2:  # the last doubling alone: how fast the excess still falls
        rate = excess[-1] / excess[-2]
        print(f"last interval {steps[-2]} -> {steps[-1]} steps: the excess over the base at "
              f"{short} went {excess[-2]:.3f} -> {excess[-1]:.3f} (x{rate:.2f})")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [s * args.tokens_per_step for s in steps]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, column, length, ref in ((axes[0], 1, short, 0), (axes[1], 2, long, 1)):
        ax.plot(tokens, [p[column] for p in points], "o-", label="linear PI x2, fine-tuned")
        ax.axhline(base[ref], color="gray", ls="--", label="base (plain RoPE)")
        ax.axhline(yarn[ref], color="tab:orange", ls=":", label="untuned YaRN x2")
        if ref == 0:
            ax.axhline(base[0] * args.short_target, color="tab:green", ls="-.",
                       label=f"target {args.short_target:g} x base")
        ax.set_xscale("log")
        ax.set_xlabel("tokens trained")
        ax.set_ylabel(f"perplexity at {length:,} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M 8k -> 16k, linear PI + PoSE: perplexity vs budget (KJV)")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
