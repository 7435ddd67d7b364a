"""Fold a run's LoRA adapter and trained extras into the base, one tensor at a time.

The release is written shard by shard while the base is read shard by shard, so peak RAM is
one output shard + the adapter + the extras, whatever the model size (a 70B merge fits an
ordinary machine). The arithmetic is peft's: delta = (B @ A) * scale in fp32, added to the
base weight in fp32, cast once to the release dtype.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.base_weights import SAFETENSORS_INDEX, TensorInfo, Weights
from pi_lora.recipe.loading import ModelSection
from pi_lora.run.finished import Adapter

# --------------------------------------------------------------------------- base tensors


SAFETENSORS_PATTERN = "model{suffix}.safetensors"  # save_pretrained's shard names

@dataclass
class BaseTensors:
    """The base weights as the adapter was trained against them, tensor by tensor, in fp32.

    A QLoRA run trained against 4/8-bit weights: those tensors come back quantized and
    dequantized exactly as bitsandbytes did it at load time, never the original weights.
    """

    weights: Weights
    extras: dict[str, torch.Tensor]
    requantize: Callable[[torch.Tensor], torch.Tensor] | None = None
    quantized: set[str] = field(default_factory=set)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name in self.extras:
            tensor = self.extras[name]
            return (tensor if rows is None else tensor[rows[0]:rows[1]]).float()
        if name in self.quantized and self.requantize is not None:
            tensor = self.requantize(self.weights.read(name))
            return tensor if rows is None else tensor[rows[0]:rows[1]]
        tensor = self.weights.read(name, rows)
        return tensor.float() if tensor.is_floating_point() else tensor


def requantizer(model: ModelSection, skeleton: Any) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                              set[str]]:
    """bitsandbytes' quantize -> dequantize of the weights a QLoRA base loads quantized."""
    import bitsandbytes as bnb
    from transformers.quantizers.base import get_keys_to_not_convert

    from pi_lora.recipe.dtypes import TORCH_DTYPES

    assert model.quantization is not None
    skip = get_keys_to_not_convert(skeleton)
    quantized = {f"{name}.weight" for name, module in skeleton.named_modules()
                 if isinstance(module, torch.nn.Linear)
                 and not any(name == s or name.endswith(f".{s}") or name.startswith(f"{s}.")
                             for s in skip)}
    dtype = TORCH_DTYPES[model.dtype]
    spec = model.quantization

    def four_bit(weight: torch.Tensor) -> torch.Tensor:
        packed = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, blocksize=64,
                                   compress_statistics=spec.double_quant,
                                   quant_type=spec.quant_type, quant_storage=dtype)
        packed._quantize("cpu")
        return bnb.functional.dequantize_4bit(packed.data, packed.quant_state).float()

    def eight_bit(weight: torch.Tensor) -> torch.Tensor:
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        return bnb.functional.int8_vectorwise_dequant(codes, scales).to(dtype).float()

    return (four_bit if spec.bits == 4 else eight_bit), quantized


# --------------------------------------------------------------------------- the release shards


def release_tensor_names(skeleton: Any) -> list[str]:
    """What save_pretrained would write: parameters (tied ones once) and persistent buffers."""
    names = [name for name, _ in skeleton.named_parameters(remove_duplicate=True)]
    for module_name, module in skeleton.named_modules():
        for buffer_name in module._buffers:
            if buffer_name not in module._non_persistent_buffers_set:
                names.append(f"{module_name}.{buffer_name}" if module_name else buffer_name)
    return names


Shards = list[tuple[str, list[TensorInfo]]]  # (file name, its tensors in writing order)


def plan_shards(groups: list[list[TensorInfo]], wanted: list[str], out_dtype: torch.dtype,
                max_shard_bytes: int) -> Shards:
    """Release shards as save_pretrained cuts and names them (huggingface_hub's
    split_torch_state_dict_into_shards over meta tensors of the release dtype: no data read),
    walking the base in its storage order."""
    from huggingface_hub import split_torch_state_dict_into_shards

    wanted_set = set(wanted)
    present = {info.name for group in groups for info in group}
    missing = [name for name in wanted if name not in present]
    if missing:
        raise PiLoraError(
            f"the base checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
            f"{missing[:3]}", field="model.name",
            fix="point model.name at the checkpoint the run was trained on")
    infos = {info.file_name: info for group in groups for info in group if info.name in wanted_set}
    meta = {name: torch.empty(info.shape, dtype=out_dtype, device="meta")
            for name, info in infos.items()}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_bytes,
                                               filename_pattern=SAFETENSORS_PATTERN)
    return [(file, [infos[name] for name in names])
            for file, names in split.filename_to_tensors.items()]


@dataclass
class FoldStats:
    tensors: int = 0
    lora_folded: int = 0
    extras_applied: int = 0
    shards: int = 0
    largest_shard_bytes: int = 0


def fold_release(out: Path, base: BaseTensors, adapter: Adapter, shards: Shards,
                 out_dtype: torch.dtype, device: torch.device) -> FoldStats:
    """Write the merged release shards into `out`, one shard in memory at a time."""
    from safetensors.torch import save_file

    stats = FoldStats(shards=len(shards))
    weight_map: dict[str, str] = {}
    total = 0
    used = set()
    for file, shard in shards:
        tensors: dict[str, torch.Tensor] = {}
        for info in shard:  # under the checkpoint's own names, as save_pretrained writes them
            tensors[info.file_name] = _merged(info.name, base, adapter, out_dtype, device, used,
                                              stats)
            weight_map[info.file_name] = file
        nbytes = sum(t.nbytes for t in tensors.values())
        total += nbytes
        stats.largest_shard_bytes = max(stats.largest_shard_bytes, nbytes)
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    unused = sorted(set(adapter.pairs) - used)
    if unused:
        raise PiLoraError(f"the adapter changes {unused[:3]}, which the base checkpoint lacks",
                          field="RUN_DIR", fix="merge with the base model the run was trained on")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return stats


def _merged(name: str, base: BaseTensors, adapter: Adapter, out_dtype: torch.dtype,
            device: torch.device, used: set[str], stats: FoldStats) -> torch.Tensor:
    # adapter and extras are known finite: Run.open refused the run otherwise
    stats.tensors += 1
    weight = base.read(name)
    stats.extras_applied += int(name in base.extras)
    delta = adapter.delta(name, device)
    if delta is not None:
        used.add(name)
        stats.lora_folded += 1
        weight = weight.to(device) + delta
    return weight.to("cpu", out_dtype if weight.is_floating_point() else weight.dtype).contiguous()
