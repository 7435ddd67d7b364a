"""One run's timed steps, and pi-lora / peer ratios taken inside each wave.

A run's numbers come from the timer hook (hook/sitecustomize.py): one `step` record per
optimizer step, `loss` records, and an `end` record with the peak RSS. The first
`warmup_steps` steps are dropped (axolotl compiles its loss in step 1); the rest give the
median and the spread (min, max) of CPU seconds per step.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.peers.waves import PI_LORA


@dataclass
class Result:
    tool: str
    length: int
    status: str
    wave: int = -1
    repeat: int = -1
    allocator: str = ""
    setting: str | None = None   # the pi-lora setting's name; None for a peer
    position: int = -1           # 0: started first in its wave
    steps: int = 0               # all optimizer steps, warm-up included
    step_cpu_s: list[float] = field(default_factory=list)  # user + sys of each timed step
    cpu_s: float = 0.0           # median of step_cpu_s
    cpu_min_s: float = 0.0
    cpu_max_s: float = 0.0
    user_s: float = 0.0          # medians over the timed steps
    sys_s: float = 0.0
    wall_s: float = 0.0
    minflt: float = 0.0
    peak_rss_gb: float = 0.0
    tcmalloc_loaded: bool | None = None  # seen in the process's own /proc/self/maps
    loss1: float | None = None
    first_step_cpu_s: float = 0.0
    load_start: list[float] = field(default_factory=list)  # os.getloadavg() (1, 5, 15 min)
    load_end: list[float] = field(default_factory=list)
    run_s: float = 0.0
    log: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def summarize_run(records: list[dict], *, warmup_steps: int, timed_steps: int, returncode: int,
                  allocator: str) -> dict:
    """The Result fields one run's timer records give (status, step statistics, peak)."""
    steps = [r for r in records if r["event"] == "step"]
    ends = [r for r in records if r["event"] == "end"]
    losses = [r["loss"] for r in records if r["event"] == "loss"]
    timed = steps[warmup_steps:]
    if returncode != 0 or len(timed) < timed_steps or not ends:
        return {"status": f"failed (exit {returncode}, {len(steps)} steps)", "steps": len(steps)}
    tcmalloc = ends[-1].get("tcmalloc")
    if tcmalloc is not None and tcmalloc != (allocator == "tcmalloc"):
        status = f"wrong allocator (tcmalloc {'loaded' if tcmalloc else 'missing'})"
    else:
        status = "ok"
    cpu = [s["user_s"] + s["sys_s"] for s in timed]
    median = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
    return {"status": status, "steps": len(steps), "step_cpu_s": cpu,
            "cpu_s": statistics.median(cpu), "cpu_min_s": min(cpu), "cpu_max_s": max(cpu),
            "user_s": median("user_s"), "sys_s": median("sys_s"), "wall_s": median("wall_s"),
            "minflt": median("minflt"), "peak_rss_gb": max(e["peak_rss"] for e in ends) / 1e9,
            "tcmalloc_loaded": tcmalloc, "loss1": losses[0] if losses else None,
            "first_step_cpu_s": sum(s["user_s"] + s["sys_s"] for s in steps[:warmup_steps])}


def read_timer(timer: Path) -> list[dict]:
    return [json.loads(line) for line in timer.read_text().splitlines()] if timer.is_file() else []


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))


@dataclass(frozen=True)
class WaveRatio:
    """pi-lora / peer inside one wave."""

    wave: int
    comparison: tuple[int, str, str, str]  # length, allocator, pi-lora setting, peer
    cpu: float
    rss: float
    pi_lora_first: bool


def wave_ratios(results: list[Result]) -> list[WaveRatio]:
    """One ratio per wave where both runs finished; never a pi-lora run of one wave over a
    peer run of another."""
    by_wave: dict[int, list[Result]] = defaultdict(list)
    for result in results:
        by_wave[result.wave].append(result)
    ratios = []
    for wave, runs in sorted(by_wave.items()):
        ours = [r for r in runs if r.tool == PI_LORA]
        theirs = [r for r in runs if r.tool != PI_LORA]
        assert len(ours) == 1 and len(theirs) == 1, f"wave {wave}: {[r.tool for r in runs]}"
        a, b = ours[0], theirs[0]
        if not (a.ok and b.ok):
            continue
        ratios.append(WaveRatio(wave, (a.length, a.allocator, a.setting or "", b.tool),
                                a.cpu_s / b.cpu_s, a.peak_rss_gb / b.peak_rss_gb,
                                a.position < b.position))
    return ratios


def ratio_summary(ratios: list[WaveRatio]) -> dict[tuple, tuple[Spread, Spread]]:
    """Per comparison: (CPU ratio, RSS ratio), each as median and min-max over its waves."""
    grouped: dict[tuple, list[WaveRatio]] = defaultdict(list)
    for ratio in ratios:
        grouped[ratio.comparison].append(ratio)
    return {key: (Spread.of([r.cpu for r in group]), Spread.of([r.rss for r in group]))
            for key, group in grouped.items()}


def tool_summary(results: list[Result]) -> dict[tuple, tuple[Spread, Spread]]:
    """Per (length, allocator, tool label): step CPU s pooled over its runs' timed steps and
    the runs' peak RSS, each as median and min-max."""
    grouped: dict[tuple, list[Result]] = defaultdict(list)
    for result in results:
        if result.ok:
            grouped[(result.length, result.allocator, label(result))].append(result)
    return {key: (Spread.of([s for r in runs for s in r.step_cpu_s]),
                  Spread.of([r.peak_rss_gb for r in runs]))
            for key, runs in grouped.items()}


def label(result: Result) -> str:
    return f"{PI_LORA}[{result.setting}]" if result.tool == PI_LORA else result.tool
