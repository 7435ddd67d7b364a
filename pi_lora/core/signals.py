"""SIGTERM and SIGHUP end a command through its cleanup path, as Ctrl-C does.

A scheduler's `kill`, a closed terminal or a preempted node sends SIGTERM/SIGHUP; Python's
default would end the process at once, skipping every `finally` that removes a temporary
release, GGUF or report. Raised as `Terminated` (a KeyboardInterrupt), the same cleanup runs
and the command exits 128 + the signal number (143 for SIGTERM, 130 for Ctrl-C).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """A stop requested by a signal other than Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"signal {signum}")
        self.signum = signum


def signal_number(stop: KeyboardInterrupt) -> int:
    return stop.signum if isinstance(stop, Terminated) else int(signal.SIGINT)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Inside: SIGTERM / SIGHUP raise Terminated (main thread only; elsewhere a no-op)."""
    def stop(signum: int, _frame: Any) -> None:
        raise Terminated(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
