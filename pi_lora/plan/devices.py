"""Accelerators a plan can target: memory, dense bf16 peak, links, and the CPU of this machine.

Peaks are the vendors' dense (no sparsity) bf16 tensor figures. `default_mfu` is the share of
that peak a LoRA step at long context is assumed to reach on the FLOPs it executes (recompute
included): ~0.4 with FlashAttention-2 on datacenter parts (Llama 3 reported 38% at 131k), less
with sdpa's kernels, and lower on consumer cards with less memory bandwidth per FLOP.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Device:
    """One accelerator (or the host CPU) as the memory and time models see it."""

    name: str
    memory_bytes: int
    peak_tflops: float  # dense bf16
    default_mfu: float  # with flash_attention_2; sdpa and offload lower it (see compute.py)
    intra_node_gbps: float  # GB/s per GPU to its node peers (NVLink, or PCIe for consumer cards)
    host_link_gbps: float  # GB/s GPU <-> host (offload traffic)
    kind: str = "gpu"


def _gpu(name: str, gib: float, tflops: float, mfu: float, nvlink: float, pcie: float) -> Device:
    return Device(name, int(gib * GIB), tflops, mfu, nvlink, pcie)


GPUS: dict[str, Device] = {d.name: d for d in (
    _gpu("h200", 141, 989.0, 0.40, 450.0, 55.0),
    _gpu("h100-80gb", 80, 989.0, 0.40, 450.0, 55.0),
    _gpu("h100-pcie", 80, 756.0, 0.38, 64.0, 55.0),
    _gpu("a100-80gb", 80, 312.0, 0.45, 300.0, 25.0),
    _gpu("a100-40gb", 40, 312.0, 0.45, 300.0, 25.0),
    _gpu("l40s", 48, 362.0, 0.30, 32.0, 25.0),
    _gpu("a6000", 48, 155.0, 0.35, 32.0, 25.0),
    _gpu("rtx4090", 24, 165.0, 0.35, 32.0, 25.0),
    _gpu("rtx3090", 24, 71.0, 0.35, 32.0, 25.0),
    _gpu("a10g", 24, 125.0, 0.30, 16.0, 16.0),
)}
INTER_NODE_GBPS = 50.0  # per GPU across nodes: one 400 Gb/s InfiniBand NIC per GPU
# A CPU is not a bf16 tensor machine: this machine ran SmolLM2's 8k LoRA step (~6.3 TFLOP
# executed) in ~46 s on one thread, i.e. ~0.14 TFLOP/s; cores scale it roughly linearly.
CPU_TFLOPS_PER_CORE = 0.14


def cpu_device(memory_bytes: int | None = None, cores: int | None = None) -> Device:
    """This machine's CPU and RAM: what `--gpu cpu` and the CPU validation use."""
    if memory_bytes is None:
        memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cores = cores or os.cpu_count() or 1
    return Device("cpu", memory_bytes, CPU_TFLOPS_PER_CORE * cores, 1.0, 0.0, 0.0, kind="cpu")


def gpu_like(name: str, memory_bytes: int) -> Device:
    """A GPU the table does not name, planned as an H100 with its own memory (the memory
    model reads only the kind and the size; times would be the H100's)."""
    return dataclasses.replace(GPUS["h100-80gb"], name=name, memory_bytes=memory_bytes)


def device_names() -> list[str]:
    return [*GPUS, "cpu"]


# the names people type for a card the table lists under a longer one
ALIASES = {"h100": "h100-80gb", "h100-sxm": "h100-80gb", "a100": "a100-80gb", "4090": "rtx4090",
           "3090": "rtx3090", "h200-141gb": "h200"}


def get_device(name: str) -> Device | None:
    """A device by table name or common alias (case-insensitive), or None."""
    key = name.lower()
    if key == "cpu":
        return cpu_device()
    return GPUS.get(ALIASES.get(key, key))
