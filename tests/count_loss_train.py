"""`pi-lora train ARGS`, counting calls of pi_lora.loss.causal_lm_loss per rank.

Started by torchrun from tests/test_distributed.py: each rank writes its count to
$LOSS_CALLS_DIR/rank<RANK> at exit, so the test sees which loss path every rank ran.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any

import pi_lora.loss
from pi_lora.cli import main

calls = [0]
_chunked = pi_lora.loss.causal_lm_loss


def _counted(*args: Any, **kwargs: Any) -> Any:
    calls[0] += 1
    return _chunked(*args, **kwargs)


pi_lora.loss.causal_lm_loss = _counted
atexit.register(lambda: (Path(os.environ["LOSS_CALLS_DIR"]) / f"rank{os.environ['RANK']}")
                .write_text(str(calls[0])))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
