"""The fair schedule: which processes run together, in which order, under which allocator.

A *wave* is one comparison run once: a pi-lora setting and the peer it is compared with, both
at one length, under one allocator, one right after the other (or side by side with
`--parallel 2`). Ratios are taken only inside a wave, so both numbers saw the same moment of
the machine; a slow minute (another job, a thermal dip) lands on both or on neither.

Every comparison gets `repeats` waves, and the tool that goes first alternates from one wave
to the next (pi-lora then the peer, the peer then pi-lora, ...): a drift in the machine's
speed favours neither. Each peer gets its own waves with pi-lora, so pi-lora never sits
beside one peer only (the old driver ran pi-lora next to LLaMA-Factory every time).

The allocator is the same library for every tool in a wave: tcmalloc preloaded into every
process (the variables pi-lora's own re-run sets, from pi_lora.core.allocator), or glibc with
pi-lora's re-run switched off (PI_LORA_CPU_ALLOCATOR=glibc, its documented opt-out).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pi_lora.core.allocator import ALLOCATOR_ENV, PRELOADED_ENV, tcmalloc_environment

PI_LORA = "pi-lora"
ALLOCATORS = ("tcmalloc", "glibc")
# a process's allocator is ours to set: what the caller's shell preloaded must not leak in
_ALLOCATOR_KEYS = ("LD_PRELOAD", ALLOCATOR_ENV, PRELOADED_ENV)
_QUIET = {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
          "WANDB_DISABLED": "true", "DISABLE_VERSION_CHECK": "1",
          "AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}


@dataclass(frozen=True)
class Setting:
    """A named set of `pi-lora train --set` overrides; `defaults` has none."""

    name: str
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Wave:
    """One comparison run once; `order` is the start order of its two processes."""

    index: int          # position in the whole schedule
    repeat: int         # 0 .. repeats-1 for this comparison
    length: int
    allocator: str
    setting: Setting
    peer: str
    order: tuple[str, str] = field(default=())

    @property
    def comparison(self) -> tuple[int, str, str, str]:
        """What the waves of one comparison share: the key ratios are summarised under."""
        return (self.length, self.allocator, self.setting.name, self.peer)


def parse_setting(text: str) -> Setting:
    """NAME or NAME:KEY=VALUE[,KEY=VALUE...]; a comma splits only before another KEY=, so a
    value may hold commas (a list)."""
    name, _, rest = text.partition(":")
    if not name or not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"pi-lora setting {text!r}: start with a name (letters, digits, ._-)")
    overrides = tuple(part for part in re.split(r",(?=[A-Za-z_][\w.]*=)", rest) if part)
    bad = [part for part in overrides if "=" not in part]
    if bad:
        raise ValueError(f"pi-lora setting {text!r}: {bad[0]!r} is not KEY=VALUE")
    return Setting(name, overrides)


def schedule(lengths: list[int], allocators: list[str], settings: list[Setting],
             peers: list[str], repeats: int) -> list[Wave]:
    """Every (length, allocator, setting, peer) comparison `repeats` times, repeat by repeat
    (the whole matrix once, then again), pi-lora first in even repeats and second in odd."""
    waves: list[Wave] = []
    for repeat in range(repeats):
        for length in lengths:
            for allocator in allocators:
                for setting in settings:
                    for peer in peers:
                        order = (PI_LORA, peer) if repeat % 2 == 0 else (peer, PI_LORA)
                        waves.append(Wave(len(waves), repeat, length, allocator, setting, peer,
                                          order))
    return waves


def allocator_environment(allocator: str, tcmalloc: Path | None) -> dict[str, str]:
    """The allocator variables every tool's process gets, identical across tools."""
    if allocator == "glibc":
        return {ALLOCATOR_ENV: "glibc"}  # pi-lora's opt-out: no tcmalloc re-run
    if tcmalloc is None:
        raise SystemExit("--allocator tcmalloc: tcmalloc is not installed (apt install "
                         "libtcmalloc-minimal4), or run with --allocator glibc")
    env = tcmalloc_environment({ALLOCATOR_ENV: "tcmalloc"}, tcmalloc)
    if env is None:
        raise SystemExit("--allocator tcmalloc needs Linux (LD_PRELOAD)")
    return env


def tool_environment(tool: str, allocator_env: Mapping[str, str], *, threads: int, timer: Path,
                     pythonpath: list[str], base: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment of one tool's process: the caller's, less its allocator choices, plus
    the timer hook, the thread count, offline switches and the wave's allocator."""
    env = {key: value for key, value in base.items() if key not in _ALLOCATOR_KEYS}
    env.update(_QUIET)
    env.update({"PEER_TIMER_OUT": str(timer), "OMP_NUM_THREADS": str(threads),
                "MKL_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(pythonpath)})
    if tool != PI_LORA:
        env.pop("THP_MEM_ALLOC_ENABLE", None)  # pi-lora's glibc policy sets it in its process
    env.update(allocator_env)
    return env
