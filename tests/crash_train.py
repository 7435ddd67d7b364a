"""`pi-lora train ARGS`, but rank 0 kills itself with SIGKILL once step $CRASH_AT_STEP is logged.

Started by torchrun from tests/test_distributed.py: a crash mid-run, after a checkpoint and
after steps the checkpoint does not hold were logged, as a killed job leaves it.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from transformers import TrainerCallback

import pi_lora.train.assembly
from pi_lora.cli import main

CRASH_AT_STEP = int(os.environ["CRASH_AT_STEP"])


class _Crash(TrainerCallback):
    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= CRASH_AT_STEP and os.environ.get("RANK") == "0":
            os.kill(os.getpid(), signal.SIGKILL)


_build_trainer = pi_lora.train.assembly._build_trainer


def _build_crashing_trainer(*args: Any, **kwargs: Any) -> Any:
    trainer = _build_trainer(*args, **kwargs)
    trainer.add_callback(_Crash())  # after the progress callback: the step is in metrics.jsonl
    return trainer


pi_lora.train.assembly._build_trainer = _build_crashing_trainer

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
