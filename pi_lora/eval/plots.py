"""PNG figures for the eval report, drawn on matplotlib's Agg canvas (no display, no pyplot
global state, so importing this never changes a notebook's backend)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

LOG_SCALE_RATIO = 20.0  # ppl curves switch to a log y axis past this max/min ratio


def format_length(tokens: int) -> str:
    """8192 -> "8k", 12288 -> "12k", 1500 -> "1500": the way context lengths are spoken."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def format_ppl(ppl: float) -> str:
    """7.123 -> "7.12", 12345.6 -> "1.23e+04": two decimals until they stop meaning anything."""
    return f"{ppl:.3g}" if ppl >= 1000 else f"{ppl:.2f}"


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_passkey_heatmap(
    accuracy: Mapping[tuple[int, float], float],
    lengths: Sequence[int],
    depths: Sequence[float],
    title: str,
    path: Path,
) -> None:
    """Accuracy per (depth row, length column), each cell annotated; missing cells blank."""
    grid = [[accuracy.get((length, depth), float("nan")) for length in lengths] for depth in depths]
    fig = Figure(figsize=(1.1 * len(lengths) + 2.5, 0.55 * len(depths) + 1.8))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [format_length(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("key depth")
    ax.set_title(title)
    for row, values in enumerate(grid):
        for col, value in enumerate(values):
            if not math.isnan(value):
                ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="accuracy")
    _save(fig, path)


def plot_ppl_curves(
    curves: Mapping[str, Mapping[int, float]], title: str, path: Path,
    windows: Sequence[int] = (),
) -> None:
    """One perplexity-vs-length line per target, the targets' original and trained windows
    as dotted verticals; log y when the values span > 20x."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for n in windows:
        ax.axvline(n, color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"window {format_length(n)}", (n, 1.0), xycoords=("data", "axes fraction"),
                    rotation=90, va="top", ha="right", fontsize=7, color="grey")
    values = [v for curve in curves.values() for v in curve.values() if not math.isnan(v)]
    for label, curve in curves.items():
        lengths = sorted(curve)
        ax.plot(lengths, [curve[n] for n in lengths], marker="o", label=label)
    if values and min(values) > 0 and max(values) / min(values) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
    all_lengths = sorted({n for curve in curves.values() for n in curve})
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_lengths, [format_length(n) for n in all_lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_search(history: Sequence[Mapping[str, float]], baselines: Mapping[str, float],
                path: Path) -> None:
    """`pi-lora search`: best and mean perplexity per generation, the start curves as lines."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    generations = [h["generation"] for h in history]
    ax.plot(generations, [h["best"] for h in history], marker="o", label="best")
    ax.plot(generations, [h["mean"] for h in history], linestyle=":", label="population mean")
    for name, value in baselines.items():
        ax.axhline(value, linestyle="--", linewidth=0.8, label=f"{name} (start)")
    ax.set_xlabel("generation")
    ax.set_ylabel("perplexity at the target length")
    ax.set_title("LongRoPE factor search")
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_factors(curves: Mapping[str, Sequence[float]], path: Path) -> None:
    """Rescale factor per rotary frequency pair (fast pairs left, slow right)."""
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    for name, values in curves.items():
        ax.plot(range(len(values)), list(values), marker="." if name == "searched" else None,
                label=name)
    ax.set_xlabel("rotary frequency pair (high frequency -> low)")
    ax.set_ylabel("rescale factor")
    ax.set_title("LongRoPE factors vs the methods they start from")
    ax.legend(fontsize=8)
    _save(fig, path)
