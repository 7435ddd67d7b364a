"""Process groups and DeepSpeed configs for training: what a launcher left in the environment.

torchrun, accelerate and the deepspeed launcher all export RANK / LOCAL_RANK / WORLD_SIZE, so
`pi-lora train` reads only those. Three gaps in the libraries are filled here:
- a recipe naming a DeepSpeed config started without any launcher still needs a process
  group: we make a one-process one on a free loopback port;
- on a machine without CUDA, accelerate's DeepSpeed path insists on a GPU backend, so we set
  up its state ourselves over gloo and tell the Trainer to use it;
- shipped configs are written for GPUs: on CPU the offload `pin_memory` flags are turned off,
  and optimizer offload gets DeepSpeed's own AdamW block, which ZeRO-Offload requires.
"""

from __future__ import annotations

import copy
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError

LAUNCHER_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class ProcessInfo:
    """Where this process sits in the run (rank 0 of 1 when nothing launched it)."""

    rank: int
    local_rank: int
    world_size: int
    launched: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info() -> ProcessInfo:
    """Read the variables every standard launcher exports."""
    launched = all(name in os.environ for name in LAUNCHER_VARIABLES)
    return ProcessInfo(rank=int(os.environ.get("RANK", "0")),
                       local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                       world_size=int(os.environ.get("WORLD_SIZE", "1")),
                       launched=launched)


def world_size() -> int:
    """Processes in the job: the initialized group's size, else what the launcher exported
    (so checks made before the group exists see the same number)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return process_info().world_size


def free_port() -> int:
    """A TCP port free on loopback right now (for one-process groups and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _export_single_process_group() -> None:
    """The variables a launcher would have set, for a one-process DeepSpeed run."""
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def prepare_processes(uses_deepspeed: bool) -> dict[str, Any] | None:
    """Set up the process group the Trainer will use; returns its `accelerator_config`.

    None leaves everything to accelerate (GPUs, or CPU without DeepSpeed).
    """
    info = process_info()
    if not uses_deepspeed:
        return None
    if not info.launched:
        _export_single_process_group()
    import torch

    if torch.cuda.is_available():
        return None
    from accelerate import PartialState

    # accelerate would pick a GPU backend for DeepSpeed; on CPU only gloo works
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"use_configured_state": True}


# --------------------------------------------------------------------------- DeepSpeed config


def load_deepspeed_config(path: Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config; a broken file is the user's to fix."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PiLoraError(f"cannot read {path}: {exc}", field="training.deepspeed",
                          fix="give a valid DeepSpeed JSON config") from None
    if not isinstance(config, dict):
        raise PiLoraError(f"{path} must hold a JSON object", field="training.deepspeed")
    return config


OFFLOAD_KEYS = ("offload_optimizer", "offload_param")


def offload_sections(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The ZeRO offload blocks that move something off the GPU (device cpu or nvme).

    The one rule for "this config offloads", shared by training and `pi-lora plan`.
    """
    zero = config.get("zero_optimization") or {}
    return [zero[key] for key in OFFLOAD_KEYS
            if isinstance(zero.get(key), dict) and zero[key].get("device", "none") in ("cpu", "nvme")]


def zero_stage(config: dict[str, Any]) -> int:
    return int((config.get("zero_optimization") or {}).get("stage", 0))


def adapt_deepspeed_config(config: dict[str, Any], *, has_cuda: bool) -> dict[str, Any]:
    """The config as this machine can run it; "auto" values stay for the Trainer to fill.

    No optimizer block means the Trainer builds torch AdamW from the recipe (no JIT build of
    DeepSpeed's cpu_adam); optimizer offload needs DeepSpeed's AdamW, so it gets one.
    """
    config = copy.deepcopy(config)
    zero = config.setdefault("zero_optimization", {})
    offloads = offload_sections(config)
    if not has_cuda:
        for offload in offloads:
            offload["pin_memory"] = False  # pinned host memory needs a CUDA driver
    if any(o.get("device") == "nvme" for o in offloads) and not has_cuda:
        raise PiLoraError("NVMe offload needs a CUDA GPU", field="training.deepspeed",
                          fix="use zero3 or zero3_offload on this machine")
    if zero.get("offload_optimizer") in offloads and "optimizer" not in config:
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    return config


def prebuild_deepspeed_ops(cache_dir: Path) -> None:
    """Compile DeepSpeed's CPU communication op once, into a cache every later run reuses.

    Two ranks starting cold would both wait on the ~40 s JIT build; tests and CI build first.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir))
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.create_op_builder("ShareMemCommBuilder").load(verbose=False)
