"""The CLI prints what a user can act on: third-party notices are off unless --verbose."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# lines every command printed before (bitsandbytes, transformers/peft deprecations, DeepSpeed)
NOISE = ("gemm_4bit_forward", "FutureWarning", "DeprecationWarning", "Setting accelerator to CPU",
         "mtime may not be reliable")


def _validate(*flags: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PI_LORA_VERBOSE"}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pi_lora.cli", *flags, "validate",
                           str(REPO / "recipes" / "llama2-13b-16k.yaml")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_validate_prints_no_third_party_noise() -> None:
    quiet = _validate()
    assert quiet.returncode == 0, quiet.stderr
    assert not [n for n in NOISE if n in quiet.stderr + quiet.stdout], quiet.stderr
    assert "trainable parameters" in quiet.stdout
    loud = _validate("--verbose")
    assert loud.returncode == 0
    assert "FutureWarning" in loud.stderr  # peft's is_gradient_checkpointing call: noise is back


def test_filters_keep_real_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.utils import logging as hf_logging

    from pi_lora.core.quiet import quiet_third_party

    monkeypatch.delenv("PI_LORA_VERBOSE", raising=False)
    handler = hf_logging.get_logger().handlers[0]
    before = list(handler.filters)
    with warnings.catch_warnings():
        quiet_third_party()
        logger = hf_logging.get_logger("transformers.modeling_utils")

        def shown(level: int, message: str) -> bool:
            record = logger.makeRecord(logger.name, level, __file__, 1, message, (), None)
            return all(f.filter(record) for f in handler.filters)

        assert not shown(logging.WARNING, "mtime may not be reliable on this filesystem")
        assert shown(logging.WARNING, "Some weights of LlamaForCausalLM were not initialized")
        assert shown(logging.ERROR, "anything at error level")
        # a warning from our own code is never filtered
        with pytest.warns(UserWarning, match="ours"):
            warnings.warn("ours", UserWarning, stacklevel=1)
    handler.filters[:] = before


def test_peft_vocabulary_and_kernels_notices_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft's 'Could not find a config file' (every checkpoint of a GGUF-based run) and
    kernels' offline trust notice are dropped; the same text from pi-lora itself is not."""
    from pi_lora.core.quiet import quiet_third_party

    monkeypatch.delenv("PI_LORA_VERBOSE", raising=False)
    logger = logging.getLogger("kernels._internals.hf_hub")
    before = list(logger.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()
        text = ("Could not find a config file in org/model - will assume that the vocabulary "
                "was not modified.")
        warnings.warn_explicit(text, UserWarning, "peft/utils/save_and_load.py", 1,
                               module="peft.utils.save_and_load")
        warnings.warn_explicit(text, UserWarning, "pi_lora/x.py", 1, module="pi_lora.x")
        record = logger.makeRecord(logger.name, logging.WARNING, __file__, 1,
                                   "Skipping publisher trust check for 'kernels-community/x' "
                                   "because Hugging Face Hub is in offline mode.", (), None)
        assert not all(f.filter(record) for f in logger.filters)
    assert [w.filename for w in caught] == ["pi_lora/x.py"]
    logger.filters[:] = before
