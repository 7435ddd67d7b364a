"""What `pi-lora merge` settles before any work: where the release may go, on which device,
which check fits this machine, the options' ranges; and how it cleans up after itself.

Every refusal here happens before a byte is read, so a bad option costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.loading import resolve_source
from pi_lora.model.rope import RopePlan
from pi_lora.recipe.loading import Recipe
from pi_lora.run.directory import RunFacts

VerifyMode = Literal["auto", "full", "layers"]


def protected_paths(run_path: Path, recipe: Recipe) -> list[Path]:
    """What a release directory may never be or contain: the run and the local base."""
    protect = [run_path]
    source = resolve_source(recipe.model)
    if source.is_local:
        protect.append(Path(source.path))
    return protect


def check_output(out: Path, overwrite: bool, run_path: Path, recipe: Recipe) -> None:
    """Before any work: --output is new, empty, or (with --overwrite) a release pi-lora wrote."""
    from pi_lora.core.safe_paths import check_replaceable
    from pi_lora.release.files import is_release

    replaceable = check_replaceable(out, owned=is_release, what="release",
                                    protect=protected_paths(run_path, recipe), field="--output")
    if replaceable and not overwrite:
        raise PiLoraError(f"{out} already exists", field="--output",
                          fix="choose another --output, or pass --overwrite")


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PiLoraError("--device cuda, but this machine has no CUDA GPU", field="--device",
                          fix="drop --device (the merge runs on the CPU)")
    return device


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def full_check_bytes(total_parameters: int) -> int:
    """RAM the whole-model check needs: the fp32 model, its logits and loader copies (x3)."""
    return total_parameters * 4 * 3


def verify_mode(verify: VerifyMode, facts: RunFacts) -> Literal["full", "layers"]:
    """`auto`: the whole-model check while it takes at most half the RAM, else layer by layer."""
    if verify != "auto":
        return verify
    return "full" if full_check_bytes(facts.total_parameters) <= _ram_bytes() // 2 else "layers"


def check_probe(probe_tokens: int | None, plan: RopePlan) -> None:
    if probe_tokens is not None and not 0 < probe_tokens <= plan.target_context:
        raise PiLoraError(f"--probe-tokens {probe_tokens} is outside 1..{plan.target_context} "
                          "(the release's context)", field="--probe-tokens",
                          fix=f"give at most {plan.target_context}, or leave it unset")


def parse_size(size: str | int) -> int:
    """`5GB`, `200MB`, `512MiB` or bytes, read as save_pretrained reads max_shard_size
    (transformers' convert_file_size_to_int); a user error when it is none of them or not > 0."""
    from transformers.utils.hub import convert_file_size_to_int

    text = str(size).strip()
    try:
        value = int(text) if text.isdigit() else convert_file_size_to_int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise PiLoraError(f"{text[:40]!r} is not a size", field="--max-shard-size",
                          fix="a whole number and a unit, e.g. 5GB, 500MB or 2GiB")
    return value


def clean_stale(out: Path) -> None:
    """Remove temp dirs of merges into `out` that were killed (their pid is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
