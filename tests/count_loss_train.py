"""`pi-lora train ARGS`, counting calls of pi_lora.train.loss.causal_lm_loss per rank.

Started by torchrun from tests/test_distributed.py: each rank keeps its count in
$LOSS_CALLS_DIR/rank<RANK>, so the test sees which loss path every rank ran.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pi_lora.train.loss
from pi_lora.cli import main

calls = [0]
_chunked = pi_lora.train.loss.causal_lm_loss


def _counted(*args: Any, **kwargs: Any) -> Any:
    calls[0] += 1  # written at once: a launched rank leaves through os._exit (no atexit)
    (Path(os.environ["LOSS_CALLS_DIR"]) / f"rank{os.environ['RANK']}").write_text(str(calls[0]))
    return _chunked(*args, **kwargs)


pi_lora.train.loss.causal_lm_loss = _counted

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
