"""pi_lora.allocator: freed activation-sized blocks leave the resident set on CPU."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pi_lora.allocator import tune_cpu_allocator

# A step's pattern: a large free first (glibc then raises its mmap threshold to that size), then
# 4 MiB activations interleaved with small long-lived tensors, then the activations are freed.
_PATTERN = r"""
import json, sys, torch
if sys.argv[1] == "tuned":
    from pi_lora.allocator import tune_cpu_allocator
    tune_cpu_allocator()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
first = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del first
kept, big = [], []
before = rss()
for _ in range(40):
    big.append(torch.ones(1 << 20))              # 4 MiB
    kept.append(torch.ones(16 << 10))            # 64 KiB, stays alive between them
grown = rss() - before
huge = sum(int(line.split()[1]) << 10 for line in open("/proc/self/smaps_rollup")
           if line.startswith("AnonHugePages"))
big.clear()
print(json.dumps({"grown": grown, "retained": rss() - before, "huge": huge}))
"""

glibc_linux = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _run(mode: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                        "THP_MEM_ALLOC_ENABLE")}
    done = subprocess.run([sys.executable, "-c", _PATTERN, mode], capture_output=True,
                          text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc_linux
def test_tuned_glibc_returns_freed_activations() -> None:
    default, tuned = _run("default"), _run("tuned")
    mib = 1 << 20
    assert default["grown"] > 150 * mib and tuned["grown"] > 150 * mib
    # default glibc keeps the 4 MiB blocks pinned between the live 64 KiB ones
    assert default["retained"] > 100 * mib, default
    assert tuned["retained"] < 16 * mib, tuned
    # fresh mappings fault in huge pages where the kernel allows it (4 KiB faults cost ~15%)
    policy = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if policy.is_file() and "[never]" not in policy.read_text():
        assert tuned["huge"] >= 32 * mib, tuned


def test_user_choice_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libmimalloc.so.2")
    assert tune_cpu_allocator().startswith("left alone (LD_PRELOAD")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tune_cpu_allocator().startswith("left alone (MALLOC_")
