"""loss.png in the run directory: the run's own metrics.jsonl drawn on matplotlib's Agg canvas
(no display, no pyplot global state), training loss per logged step and held-out loss when the
run evaluates. Drawn at the end of training and when training is interrupted."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pi_lora.run.directory import RunDir

LOSS_PLOT_FILE = "loss.png"


def read_losses(metrics: Path) -> dict[str, list[tuple[int, float]]]:
    """{"loss": [(step, loss)...], "eval_loss": [...]} from metrics.jsonl; a line cut short by
    a kill is skipped, as is a non-finite value (a diverged run's last line)."""
    curves: dict[str, list[tuple[int, float]]] = {"loss": [], "eval_loss": []}
    if not metrics.is_file():
        return curves
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for key, points in curves.items():
            value = record.get(key) if isinstance(record, dict) else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                points.append((int(record.get("step", 0)), float(value)))
    return curves


def draw_loss_curve(run: RunDir) -> Path | None:
    """Write RUN/loss.png from the run's metrics; None (nothing written) before any loss was
    logged. Only the main process calls this."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = read_losses(run.metrics_path)
    if not curves["loss"]:
        return None
    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot()
    labels = {"loss": "training loss", "eval_loss": "held-out loss"}
    for key, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, label=labels[key])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title(f"{run.path.name}: loss per step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    FigureCanvasAgg(fig)
    out = run.path / LOSS_PLOT_FILE
    tmp = out.with_name(f".{LOSS_PLOT_FILE}.tmp")  # an interrupt mid-write leaves no half PNG
    fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    tmp.replace(out)
    return out


def try_draw_loss_curve(run: RunDir) -> Path | None:
    """draw_loss_curve, its failure a warning: a plot never fails a run that trained."""
    try:
        return draw_loss_curve(run)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"pi-lora: warning: {run.path / LOSS_PLOT_FILE} not drawn ({type(exc).__name__}: "
              f"{str(exc)[:200]})", flush=True)
        return None
