"""CPU training memory: keep glibc from hoarding freed activation buffers.

glibc's mmap threshold is dynamic: after the first large free it climbs to 32 MiB, so every
activation, recompute buffer and loss chunk of a CPU training step below that size lands in
the heap. Freed heap blocks go back to the OS only from the top, and the blocks a step frees
are pinned between longer-lived ones, so the resident set grows to the sum of several moments'
transients rather than their maximum (measured: 1.23 GiB against 0.85 GiB of live peak for a
512-wide model at 2k tokens; 4.2-4.5 GiB against 1.65 GiB for SmolLM2 at 4k). A fixed 1 MiB
threshold sends every large tensor to its own mapping, returned at free: the resident peak
then follows the live tensors, which is what `pi-lora plan` predicts.

Fresh mappings cost page faults: with 4 KiB pages that made a SmolLM2 step at 4k 18% slower.
PyTorch's own switch THP_MEM_ALLOC_ENABLE aligns tensors of 2 MiB and more to huge pages and
asks the kernel for them (madvise), which brings the cost down to ~7% at 4k and ~11% at 1k
(measured against glibc defaults, side by side); from 4k on the chunked loss saves more.

Both settings still pay the kernel: every freed activation goes back to the OS and comes back
as fresh, zeroed pages (SmolLM2 at 2k: 4.6M page faults and 8 s of system time per 37 s step).
tcmalloc (gperftools) keeps freed spans and reuses them, and its page heap does not pin them the
way glibc's arenas do: same peak as the 1 MiB threshold, 27k page faults, no system time (2.15
GiB, 28.9 CPU s/step, against 2.14 GiB / 37.3 s here and 3.60 GiB / 29.5 s for glibc defaults;
jemalloc 2.13 GiB / 33.4 s, mimalloc 2.15 GiB / 31.8 s; benchmarks/README.md). It has to be
loaded before the process starts, so `pi-lora train` on a CPU re-runs its own command line once
with tcmalloc in LD_PRELOAD when the library is installed (`reexec_with_tcmalloc`), and says how
to install it when it is not. PI_LORA_CPU_ALLOCATOR=glibc keeps glibc (with the thresholds).

Applied by `pi-lora train` (every rank) when it runs on the CPU, before the model is loaded.
It stays out of the way when the user chose otherwise: a preloaded allocator (mimalloc,
jemalloc, tcmalloc) or glibc's own MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ win.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from pi_lora.core.errors import PiLoraError

MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 4 << 20
_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
ALLOCATOR_ENV = "PI_LORA_CPU_ALLOCATOR"  # auto (tcmalloc where installed) | tcmalloc | glibc
CHOICES = ("auto", "tcmalloc", "glibc")
PRELOADED_ENV = "PI_LORA_TCMALLOC_PRELOADED"  # set in the re-run process: never re-run twice
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
TCMALLOC_INSTALL = ("apt install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install "
                    "gperftools-libs, or conda install gperftools")
# tcmalloc prints a line for every allocation above this (default 1 GiB: a long-context loss
# chunk or an optimizer state would trigger it on every step)
_TCMALLOC_QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


def allocator_choice(environ: Mapping[str, str] = os.environ) -> str:
    """PI_LORA_CPU_ALLOCATOR, checked where it is read."""
    choice = environ.get(ALLOCATOR_ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise PiLoraError(f"unknown CPU allocator {choice!r}", field=ALLOCATOR_ENV,
                          fix=f"one of {', '.join(CHOICES)} (or leave it unset)")
    return choice


def find_tcmalloc(dirs: tuple[Path, ...] | None = None) -> Path | None:
    """gperftools' tcmalloc where distributions and conda install it; None if absent."""
    if dirs is None:
        machine = platform.machine()
        dirs = (Path(sys.prefix) / "lib", Path(f"/usr/lib/{machine}-linux-gnu"), Path("/usr/lib64"),
                Path("/usr/lib"), Path("/usr/local/lib"))
    for folder in dirs:
        for name in TCMALLOC_NAMES:
            if (folder / name).is_file():
                return folder / name
    return None


def tcmalloc_environment(environ: Mapping[str, str] = os.environ,
                         library: Path | None = None) -> dict[str, str] | None:
    """The environment to re-run a CPU training command in, tcmalloc preloaded; None when
    this process keeps its allocator (already re-run, the user preloaded or tuned one, glibc
    chosen, not Linux, or tcmalloc not installed under `auto`)."""
    choice = allocator_choice(environ)
    if (choice == "glibc" or environ.get(PRELOADED_ENV) or environ.get("LD_PRELOAD")
            or any(name in environ for name in _USER_SETTINGS) or platform.system() != "Linux"):
        return None
    library = library or find_tcmalloc()
    if library is None:
        if choice == "tcmalloc":
            raise PiLoraError("tcmalloc is not installed", field=ALLOCATOR_ENV,
                              fix=f"{TCMALLOC_INSTALL}; or {ALLOCATOR_ENV}=auto")
        return None
    return {**environ, **_TCMALLOC_QUIET, "LD_PRELOAD": str(library), PRELOADED_ENV: "1"}


def reexec_with_tcmalloc() -> None:
    """Replace this process by the same command line with tcmalloc preloaded (CPU training).

    Called by the CLI before anything large is allocated; returns only when the process keeps
    its allocator. Launched ranks inherit the preload from the re-run launcher.
    """
    environment = tcmalloc_environment()
    if environment is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def tune_cpu_allocator() -> str:
    """Fix glibc's mmap and trim thresholds; returns what was done, for the run log."""
    preload = os.environ.get("LD_PRELOAD", "")
    if preload and "tcmalloc" in preload and _loaded(preload):
        return f"tcmalloc ({preload})"
    if preload:
        return f"left alone (LD_PRELOAD={preload})"
    if any(name in os.environ for name in _USER_SETTINGS):
        return "left alone (MALLOC_*_THRESHOLD_ set in the environment)"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "left alone (not glibc)"
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    done = (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not done:
        return "left alone (mallopt refused)"
    # read by torch at its first large CPU allocation, hence before the model exists
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return (f"glibc mmap threshold {MMAP_THRESHOLD_BYTES >> 20} MiB, trim threshold "
            f"{TRIM_THRESHOLD_BYTES >> 20} MiB, huge pages {_huge_pages()}")


def missing_tcmalloc_note() -> str | None:
    """One line for the run log when tcmalloc would have been used but is not installed."""
    if (allocator_choice() != "auto" or os.environ.get("LD_PRELOAD") or platform.system() != "Linux"
            or any(name in os.environ for name in _USER_SETTINGS) or find_tcmalloc()):
        return None
    return ("tcmalloc not found: training on glibc, whose freed activations come back as fresh "
            f"pages (about 30% more CPU per step on SmolLM2 at 2k); install it: {TCMALLOC_INSTALL}")


def _loaded(library: str) -> bool:
    """Whether the preloaded library is mapped into this process (LD_PRELOAD can name a
    file that does not exist: the loader then warns and goes on without it)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(Path(part).name in maps for part in library.replace(":", " ").split())


def _huge_pages() -> str:
    """Whether tensors can get transparent huge pages: the kernel's policy decides."""
    if os.environ.get("THP_MEM_ALLOC_ENABLE") == "0":
        return "off (THP_MEM_ALLOC_ENABLE=0)"
    try:
        policy = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unavailable"
    chosen = policy[policy.find("[") + 1:policy.find("]")] if "[" in policy else policy.strip()
    return "off (kernel: never)" if chosen == "never" else f"on (kernel: {chosen})"
