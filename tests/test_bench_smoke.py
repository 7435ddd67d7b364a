"""The training-step benchmark runs end to end on a tiny model and prints a parsable table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].replace("|", "")) == {"-"}
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return [dict(zip(header, row, strict=True)) for row in rows]


def test_benchmark_table_on_tiny_model():
    command = [sys.executable, "-m", "benchmarks.bench_train_step", "--model", "tiny",
               "--lengths", "128", "--warmup", "0"]
    command.append("--parallel")  # both workers at once: ~15 s on an idle 2-core machine
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = parse_markdown_table(done.stdout)
    assert [(row["seq_len"], row["setting"]) for row in rows] == [
        ("128", "baseline"),
        ("128", "pi-lora"),
    ]
    for row in rows:
        assert float(row["s/step"]) > 0
        assert float(row["tokens/s"]) > 0
        assert 0.05 < float(row["peak RSS (GiB)"]) < 8
        assert float(row["speed x"]) > 0 and float(row["memory x"]) > 0
    baseline, pi_lora = (float(row["loss"]) for row in rows)
    assert abs(baseline - pi_lora) < 1e-2  # same model, same tokens, same loss
    assert "allocator" in done.stdout


def test_merge_benchmark_on_a_small_model() -> None:
    """bench_merge builds a sharded base + run, merges both ways in workers, prints the table."""
    command = [sys.executable, "-m", "benchmarks.bench_merge", "--sizes", "20M", "--modes", "old,new"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                          cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = parse_markdown_table(done.stdout)
    assert row["size"] == "20M"
    old, new = (float(row[k].split()[0]) for k in ("old peak RSS", "new peak RSS"))
    assert 0.2 < new < old < 8  # GiB
    assert float(row["new / old"]) < 1


def test_budget_curve_fit_recovers_a_power_law() -> None:
    """benchmarks.pi_budget_curve: the extrapolation #33's table quotes."""
    from benchmarks.pi_budget_curve import fit_power_law, steps_to_reach

    a, b = fit_power_law([64, 128, 256], [0.3 * (s / 64) ** -1.0 for s in (64, 128, 256)])
    assert abs(b + 1.0) < 1e-9 and abs(a * 64**b - 0.3) < 1e-9
    assert abs(steps_to_reach(a, b, 0.05) - 384) < 1e-6
    assert steps_to_reach(1.0, 0.2, 0.05) is None  # a curve that rises never gets there
