"""pytest plugin (`-p tests.slow_notice`, in pyproject's addopts): a test still running after
PI_LORA_SLOW_NOTICE seconds (default 60) is named on the terminal, so a long one (the quick
demo, the 2-process DeepSpeed runs) is not a row of dots that seems to hang.

Loaded with -p, it is imported before pytest captures output, so it keeps a copy of the real
terminal and a timer thread writes there without touching pytest's capture state."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

SECONDS = float(os.environ.get("PI_LORA_SLOW_NOTICE", "60"))
_TERMINAL = os.dup(1)  # fd 1 before capture redirects it
_timers: dict[str, threading.Timer] = {}


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    if SECONDS <= 0:
        return
    started = time.monotonic()

    def notice() -> None:
        line = f"\n[still running after {time.monotonic() - started:.0f} s: {nodeid}]\n"
        os.write(_TERMINAL, line.encode())

    timer = threading.Timer(SECONDS, notice)
    timer.daemon = True
    timer.start()
    _timers[nodeid] = timer


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    timer = _timers.pop(nodeid, None)
    if timer is not None:
        timer.cancel()
