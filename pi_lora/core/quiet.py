"""Third-party noise off at the command line, real warnings kept; `--verbose` brings it all back.

Every `pi-lora` command used to print lines its users cannot act on: bitsandbytes' optional
kernels notice, library deprecation warnings about calls inside transformers, peft, DeepSpeed
and torch.distributed, DeepSpeed's accelerator guess, transformers' checkpoint-sorting notes.
Only the CLI calls this (a library must not change its host's logging); child processes of a
launch inherit the choice through the environment.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

VERBOSE_ENV = "PI_LORA_VERBOSE"

# warnings raised inside these packages are addressed to their developers, not our users
_THIRD_PARTY = (r"(transformers|peft|accelerate|datasets|deepspeed|torch|bitsandbytes|trl|gguf"
                r"|huggingface_hub)(\..*)?")
_DEVELOPER_CATEGORIES = (FutureWarning, DeprecationWarning, PendingDeprecationWarning)

# transformers warnings that do concern a user: weights that did not load as expected
_REAL_TRANSFORMERS = re.compile(r"not initialized|newly initialized|missing|unexpected|mismatch",
                                re.IGNORECASE)
# messages a user cannot act on, by logger
_NOISE = {
    "bitsandbytes.backends.cpu.ops": re.compile(r"kernels"),
    "DeepSpeed": re.compile(r"Setting accelerator to CPU"),
    # transformers 5.25+ pulls `kernels`, which says this once per hub kernel it looks up offline
    "kernels._internals.hf_hub": re.compile(r"Skipping publisher trust check"),
}
# peft's check whether the vocabulary was resized, printed at every checkpoint when the base is
# a GGUF file or offline: pi-lora never resizes it and saves trained embeddings itself
_NOISY_WARNINGS = (r"Could not find a config file in .* will assume that the vocabulary",)


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_third_party(verbose: bool = False) -> None:
    """Install the filters (idempotent). `verbose` (or PI_LORA_VERBOSE=1) leaves all noise on."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if verbose or verbose_requested():
        os.environ[VERBOSE_ENV] = "1"  # launched child processes stay verbose too
        return
    for category in _DEVELOPER_CATEGORIES:
        warnings.filterwarnings("ignore", category=category, module=_THIRD_PARTY)
    warnings.filterwarnings("ignore", message=".*gguf.*", category=UserWarning)
    for message in _NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, module=_THIRD_PARTY)
    for name, pattern in _NOISE.items():
        _add_filter(logging.getLogger(name), _DropMatching(pattern))
    _quiet_transformers()


class _DropMatching(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]) -> None:
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _KeepReal(logging.Filter):
    """transformers: errors, and warnings about weights; its other notes are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or bool(_REAL_TRANSFORMERS.search(record.getMessage()))


def _add_filter(target: logging.Logger | logging.Handler, new: logging.Filter) -> None:
    if not any(type(f) is type(new) for f in target.filters):
        target.addFilter(new)


def _quiet_transformers() -> None:
    """Filter at transformers' own handler: its modules log to child loggers, which a filter
    on the library logger would not see."""
    from transformers.utils import logging as hf_logging

    for handler in hf_logging.get_logger().handlers:
        _add_filter(handler, _KeepReal())
