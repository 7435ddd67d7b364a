"""Step timer for benchmarks/peers: every tool under test trains on transformers' Trainer, so
one callback, added to every Trainer this process creates, times all of them the same way.

Imported by Python at start-up when this folder is on PYTHONPATH (and PEER_TIMER_OUT names
the JSON-lines file to append to). transformers is patched when the tool imports it, not
before, so start-up and model load stay outside the timed steps.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import resource
import sys
import time

OUT = os.environ.get("PEER_TIMER_OUT")


def _status(key: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _tcmalloc_mapped() -> bool:
    """Whether this process really runs on tcmalloc (a preload of a missing file only warns)."""
    with open("/proc/self/maps") as f:
        return "libtcmalloc" in f.read()


def _write(record: dict) -> None:
    with open(OUT, "a") as f:
        f.write(json.dumps(record) + "\n")


def _callback_class():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall, CPU (user, sys) and minor page faults of each optimizer step."""

        def on_step_begin(self, args, state, control, **kwargs):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            self._start = (time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt)

        def on_step_end(self, args, state, control, **kwargs):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            wall, user, sys_, faults = self._start
            _write({"event": "step", "step": state.global_step,
                    "wall_s": time.perf_counter() - wall, "user_s": usage.ru_utime - user,
                    "sys_s": usage.ru_stime - sys_, "minflt": usage.ru_minflt - faults,
                    "rss": _status("VmRSS")})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                _write({"event": "loss", "step": state.global_step, "loss": logs["loss"]})

        def on_train_end(self, args, state, control, **kwargs):
            _write({"event": "end", "peak_rss": _status("VmHWM"),
                    "pid": os.getpid(), "tcmalloc": _tcmalloc_mapped()})

    return StepTimer


def _patch(module) -> None:
    trainer_class = module.Trainer
    original = trainer_class.__init__

    def init_and_time(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(_callback_class()())
        _write({"event": "trainer", "class": type(self).__name__, "pid": os.getpid(),
                "rss_at_start": _status("VmRSS")})

    trainer_class.__init__ = init_and_time


class _Finder(importlib.abc.MetaPathFinder):
    """Patches transformers.trainer right after it is first imported."""

    def find_spec(self, name, path, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        loader.exec_module = exec_and_patch
        return spec


if OUT:
    sys.meta_path.insert(0, _Finder())
