"""dtype names: the one table between recipe names (bf16, fp16, fp32) and torch dtypes, and the
"auto" choice (bf16 only where the device computes it natively)."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import torch

from pi_lora.recipe.loading import DType

TORCH_DTYPES: dict[DType, torch.dtype] = {
    "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
}
assert set(TORCH_DTYPES) == set(get_args(DType)), "the recipe schema and this table agree"
_NAMES: dict[torch.dtype, DType] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def torch_dtype(name: DType) -> torch.dtype:
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> DType:
    return _NAMES[dtype]


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Without it PyTorch's bf16 matmuls fall back to a generic kernel, measured ~8x slower than
    fp32 on an AVX2 EPYC: bf16 then saves memory but costs time.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that have it and on CPUs that compute it natively, else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
