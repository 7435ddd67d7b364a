"""The markdown the README's peer tables are pasted from, written from the driver's JSON.

    python -m benchmarks.peers.report build/peers/results.json

Every ratio is pi-lora / peer inside one wave (results.wave_ratios), then summarised over
the waves of that comparison; the header names the conditions the numbers were measured
under, so a pasted table carries them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import fields
from pathlib import Path

from benchmarks.peers.results import Result, Spread, label, ratio_summary, tool_summary, wave_ratios


def load(path: Path) -> tuple[dict, list[Result]]:
    document = json.loads(path.read_text())
    names = {f.name for f in fields(Result)}
    return document, [Result(**{k: v for k, v in r.items() if k in names})
                      for r in document["results"]]


def render(document: dict, results: list[Result]) -> str:
    return "\n".join([*conditions(document, results), "", *ratio_table(results), "",
                      *tool_table(results, document["conditions"]["allocators"]),
                      *failures(results)])


def conditions(document: dict, results: list[Result]) -> list[str]:
    c = document["conditions"]
    allocators = ", ".join(f"{name} ({where})" for name, where in c["allocators"].items())
    starts = [r.load_start[0] for r in results if r.load_start]
    ends = [r.load_end[0] for r in results if r.load_end]
    load = (f"{min(starts):.2f}-{max(starts):.2f} at the start of a run, "
            f"{min(ends):.2f}-{max(ends):.2f} at its end" if starts and ends else "not recorded")
    versions = "; ".join(f"{tool}: " + ", ".join(f"{k} {v}" for k, v in found.items())
                         for tool, found in c["versions"].items())
    return [f"Measured {c['date']} on {c['machine']} (commit {c['commit']}). "
            f"{c['repeats']} wave(s) per comparison, each a pi-lora run and its peer's "
            f"{'side by side' if c['parallel'] == 2 else 'one after the other'}, the first "
            "to start alternating from wave to wave (pi-lora first in even waves); "
            f"{c['warmup_steps']} warm-up + {c['timed_steps']} timed steps per run; "
            f"{c['threads']} torch thread(s) per process; device {c['device']}.",
            f"Allocator, the same for every tool in a wave: {allocators}.",
            f"Load average (1 min): {load}.", f"Versions: {versions}."]


def ratio_table(results: list[Result]) -> list[str]:
    ratios = wave_ratios(results)
    summary = ratio_summary(ratios)
    lines = ["Ratios measured within waves (pi-lora / peer of the same wave; median, "
             "min-max over the waves):", "",
             "| length | allocator | pi-lora setting | peer | waves (pi-lora first) "
             "| CPU s/step x peer | peak RSS x peer | load 1 min |", "|" + "---|" * 8]
    for key in sorted(summary):
        length, allocator, setting, peer = key
        cpu, rss = summary[key]
        waves = [r for r in ratios if r.comparison == key]
        first = sum(r.pi_lora_first for r in waves)
        load = [x for r in results if r.wave in {w.wave for w in waves}
                for x in (r.load_start[:1] + r.load_end[:1])]
        load_text = f"{min(load):.1f}-{max(load):.1f}" if load else "-"
        lines.append(f"| {length} | {allocator} | {setting} | {peer} | {len(waves)} ({first}) "
                     f"| {_spread(cpu, 2)} | {_spread(rss, 2)} | {load_text} |")
    return lines


def tool_table(results: list[Result], allocators: dict[str, str]) -> list[str]:
    summary = tool_summary(results)
    names = list(allocators)
    head = " | ".join(f"{a}: CPU s/step | {a}: peak RSS GB" for a in names)
    lines = ["Each tool's runs (step CPU s = user + sys of the timed steps, pooled over its "
             "runs; peak RSS of each run, load included; median, min-max):", "",
             f"| length | tool | runs | {head} | loss step 1 |", "|" + "---|" * (4 + 2 * len(names))]
    tools = sorted({(length, tool) for length, _, tool in summary})
    for length, tool in tools:
        cells = []
        for allocator in names:
            cpu, rss = summary.get((length, allocator, tool), (None, None))
            cells += [_spread(cpu, 1), _spread(rss, 2)]
        mine = [r for r in results if r.ok and r.length == length and label(r) == tool]
        runs = len(mine)
        losses = [r.loss1 for r in mine if r.loss1 is not None]
        loss = f"{losses[0]:.4f}" if losses else "-"
        lines.append(f"| {length} | {tool} | {runs} | {' | '.join(cells)} | {loss} |")
    return lines


def failures(results: list[Result]) -> list[str]:
    failed = [r for r in results if not r.ok]
    if not failed:
        return []
    return ["", "Not measured (the wave gives no ratio):",
            *(f"- {label(r)} at {r.length}, {r.allocator}, wave {r.wave}: {r.status} ({r.log})"
              for r in failed)]


def _spread(spread: Spread | None, digits: int) -> str:
    if spread is None:
        return "-"
    if spread.n == 1:
        return f"{spread.median:.{digits}f}"
    return f"{spread.median:.{digits}f} ({spread.low:.{digits}f}-{spread.high:.{digits}f})"


if __name__ == "__main__":
    print(render(*load(Path(sys.argv[1]))))
