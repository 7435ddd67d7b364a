"""pi_lora.core.allocator: freed activation-sized blocks leave the resident set on CPU."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from pi_lora.core.allocator import tune_cpu_allocator

# A step's pattern: a large free first (glibc then raises its mmap threshold to that size), then
# 4 MiB activations interleaved with small long-lived tensors, then the activations are freed.
_PATTERN = r"""
import json, sys, torch
if sys.argv[1] == "tuned":
    from pi_lora.core.allocator import tune_cpu_allocator
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


# ------------------------------------------------------------------ tcmalloc, where installed
from pi_lora.core import allocator  # noqa: E402
from pi_lora.core.errors import PiLoraError  # noqa: E402


def _fake_library(tmp_path: Path) -> Path:
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_bytes(b"")
    return library


def test_tcmalloc_environment_preloads_once(tmp_path: Path) -> None:
    library = _fake_library(tmp_path)
    env = allocator.tcmalloc_environment({"PATH": "/bin"}, library)
    assert env is not None and env["LD_PRELOAD"] == str(library) and env["PATH"] == "/bin"
    assert env[allocator.PRELOADED_ENV] == "1"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    # the re-run process, a user's own preload or glibc tuning, or the opt-out: no re-run
    for kept in (env, {"LD_PRELOAD": "/x/libjemalloc.so.2"}, {"MALLOC_MMAP_THRESHOLD_": "65536"},
                 {allocator.ALLOCATOR_ENV: "glibc"}):
        assert allocator.tcmalloc_environment(kept, library) is None, kept


def test_tcmalloc_choice_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(PiLoraError, match="unknown CPU allocator") as err:
        allocator.tcmalloc_environment({allocator.ALLOCATOR_ENV: "jemallocc"})
    assert err.value.field == allocator.ALLOCATOR_ENV
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda dirs=None: None)
    assert allocator.tcmalloc_environment({}) is None  # auto: glibc, with a note (below)
    with pytest.raises(PiLoraError, match="not installed") as err:
        allocator.tcmalloc_environment({allocator.ALLOCATOR_ENV: "tcmalloc"})
    assert "libtcmalloc-minimal4" in err.value.fix


def test_find_tcmalloc_and_the_missing_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert allocator.find_tcmalloc((tmp_path,)) is None
    library = _fake_library(tmp_path)
    assert allocator.find_tcmalloc((tmp_path / "absent", tmp_path)) == library
    for name in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 allocator.ALLOCATOR_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda dirs=None: None)
    if platform.system() == "Linux":
        note = allocator.missing_tcmalloc_note()
        assert note is not None and "install" in note
    monkeypatch.setenv(allocator.ALLOCATOR_ENV, "glibc")
    assert allocator.missing_tcmalloc_note() is None  # the user chose glibc: nothing to say


_REEXEC = r"""
import os, sys
from pi_lora.core.allocator import reexec_with_tcmalloc, tune_cpu_allocator
print("pid", os.getpid(), flush=True)
reexec_with_tcmalloc()
print("allocator", tune_cpu_allocator(), flush=True)
"""


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc not installed")
def test_reexec_runs_the_same_command_with_tcmalloc() -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                        allocator.PRELOADED_ENV, allocator.ALLOCATOR_ENV)}
    done = subprocess.run([sys.executable, "-c", _REEXEC], capture_output=True, text=True,
                          env=env, check=True)
    lines = done.stdout.splitlines()
    # the command ran twice in one process (exec keeps the pid), the second time on tcmalloc
    assert [line.split()[0] for line in lines] == ["pid", "pid", "allocator"], lines
    assert lines[0] == lines[1]
    assert lines[2].startswith("allocator tcmalloc ("), lines


def test_train_names_a_bad_allocator_choice() -> None:
    env = {**os.environ, allocator.ALLOCATOR_ENV: "fastest"}
    done = subprocess.run([sys.executable, "-m", "pi_lora.cli", "train", "recipes/tiny.yaml"],
                          capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    assert allocator.ALLOCATOR_ENV in done.stderr and "Traceback" not in done.stderr
