"""`pi-lora train ARGS`, but the process sends itself SIGINT (Ctrl-C) when step
$INTERRUPT_AT_STEP ends: what a user at the terminal does mid-run."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from transformers import TrainerCallback

import pi_lora.train.assembly
from pi_lora.cli import main

AT_STEP = int(os.environ["INTERRUPT_AT_STEP"])


class _CtrlC(TrainerCallback):
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == AT_STEP:
            os.kill(os.getpid(), signal.SIGINT)


_build_trainer = pi_lora.train.assembly._build_trainer


def _build_interrupted_trainer(*args: Any, **kwargs: Any) -> Any:
    trainer = _build_trainer(*args, **kwargs)
    trainer.add_callback(_CtrlC())
    return trainer


pi_lora.train.assembly._build_trainer = _build_interrupted_trainer

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
