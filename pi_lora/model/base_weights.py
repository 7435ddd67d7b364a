"""The base model's weights read one tensor at a time: safetensors shards or a GGUF file.

Merge and its verification never hold the whole base: they ask for the tensors they need, in
the order the checkpoint stores them, and drop each before the next. Pickled checkpoints
(`*.bin`) are refused: nothing a user hands us is unpickled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.loading import hub_unreachable, resolve_source
from pi_lora.recipe.loading import ModelSection

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str  # the model's parameter name
    shape: tuple[int, ...]
    dtype: torch.dtype
    stored_name: str = ""  # the name in the file, when transformers renames it on load

    @property
    def file_name(self) -> str:
        return self.stored_name or self.name

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsWeights:
    """A directory of safetensors shards (one file, or an index naming several)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = _read_index(index)
            self.files = sorted(set(weight_map.values()), key=_shard_order)
        elif (directory / SAFETENSORS_SINGLE).is_file():
            self.files = [SAFETENSORS_SINGLE]
        else:
            pickled = sorted(p.name for p in directory.glob("*.bin"))
            raise PiLoraError(
                f"{directory} has no safetensors weights"
                + (f" (only pickled {pickled[:3]}: never loaded)" if pickled else ""),
                field="model.name",
                fix="convert the checkpoint to safetensors (save_pretrained(safe_serialization=True))")
        self._where: dict[str, str] = {}
        self._info: dict[str, TensorInfo] = {}
        for file in self.files:
            for info in _header(directory / file):
                self._where[info.name] = file
                self._info[info.name] = info

    def use_model_names(self, skeleton: Any) -> None:
        """Address tensors by the model's parameter names (transformers renames some
        checkpoint keys on load, e.g. GPT-NeoX's `embed_out` -> `lm_head`)."""
        renamed = model_names(list(self._info), skeleton)
        self._where = {renamed[k]: v for k, v in self._where.items()}
        self._info = {renamed[k]: TensorInfo(renamed[k], i.shape, i.dtype, k)
                      for k, i in self._info.items()}

    def groups(self) -> list[list[TensorInfo]]:
        """Tensors shard by shard, in storage order: the order merge reads them."""
        out: list[list[TensorInfo]] = [[] for _ in self.files]
        order = {file: i for i, file in enumerate(self.files)}
        for name, file in self._where.items():
            out[order[file]].append(self._info[name])
        return out

    def info(self, name: str) -> TensorInfo | None:
        return self._info.get(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        path = self.directory / self._where[name]
        stored = self._info[name].file_name
        try:
            with safe_open(str(path), framework="pt") as f:
                if rows is None:
                    return f.get_tensor(stored)
                return f.get_slice(stored)[rows[0]:rows[1]]
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise _corrupt(path, exc) from None

    def largest_file_bytes(self) -> int:
        return max((self.directory / f).stat().st_size for f in self.files)


class GgufWeights:
    """A GGUF file dequantized tensor by tensor, under transformers' Hugging Face names."""

    def __init__(self, path: Path, skeleton: Any) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = path
        self._reader = GGUFReader(str(path))
        architecture = read_field(self._reader, "general.architecture")[0]
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(
            config=parsed.get("config", {}))
        self._hf_names = get_gguf_hf_weights_map(skeleton, self._processor)
        self._tensors: dict[str, Any] = {}
        self._info: dict[str, TensorInfo] = {}
        for tensor in self._reader.tensors:
            hf = self._hf_names.get(tensor.name)
            if hf is None:
                continue
            shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            self._tensors[hf] = tensor
            self._info[hf] = TensorInfo(hf, shape, torch.float32)
        self._parsed = parsed
        self._last: tuple[str, torch.Tensor] | None = None

    def groups(self) -> list[list[TensorInfo]]:
        return [list(self._info.values())]

    def info(self, name: str) -> TensorInfo | None:
        return self._info.get(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        import numpy as np
        from gguf import dequantize

        if self._last is None or self._last[0] != name:
            tensor = self._tensors[name]
            weights = dequantize(tensor.data, tensor.tensor_type)
            weights = self._processor.process(weights=weights, name=tensor.name,
                                              tensor_key_mapping=self._hf_names,
                                              parsed_parameters=self._parsed).weights
            self._last = (name, torch.from_numpy(np.copy(weights)).float())
        full = self._last[1]
        return full if rows is None else full[rows[0]:rows[1]]

    def largest_file_bytes(self) -> int:
        return self.path.stat().st_size


Weights = SafetensorsWeights | GgufWeights


def empty_model(config: Any) -> Any:
    """The model `config` describes, parameters on the meta device (no memory), buffers real
    (rotary frequencies): names, shapes and module structure without weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    model.tie_weights()  # on meta, from_config leaves tied heads untied
    return model.eval()


def open_base_weights(model: ModelSection, skeleton: Any) -> Weights:
    """The base checkpoint `model.name` names: local directory, hub snapshot or GGUF file."""
    source = resolve_source(model)
    if source.gguf_file:
        return GgufWeights(Path(source.path) / source.gguf_file, skeleton)
    weights = SafetensorsWeights(Path(source.path) if source.is_local else _hub_snapshot(model))
    weights.use_model_names(skeleton)
    return weights


def model_names(stored: list[str], skeleton: Any) -> dict[str, str]:
    """Checkpoint key -> model parameter name, by transformers' own load-time renamings.

    Checkpoints that transformers converts on load beyond renaming (experts fused into one
    tensor) are refused: their tensors are not one-to-one with the model's.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(skeleton)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = skeleton.state_dict()
    out = {}
    for key in stored:
        name, converted = rename_source_key(key, renamings, converters,
                                            skeleton.base_model_prefix, meta)
        if converted is not None:
            raise PiLoraError(
                f"{type(skeleton).__name__} checkpoints are converted on load ({key} -> {name})",
                field="model.name",
                fix="pi-lora merges checkpoints stored in the model's own layout; merge this "
                    "one with peft's merge_and_unload")
        out[key] = name
    return out


def _hub_snapshot(model: ModelSection) -> Path:
    from huggingface_hub import snapshot_download

    # the hub out of reach: the cache alone, not five retries per file
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or hub_unreachable() is not None
    try:
        return Path(snapshot_download(
            model.name, revision=model.revision, local_files_only=offline,
            allow_patterns=["*.safetensors", SAFETENSORS_INDEX, "*.json"]))
    except Exception as exc:  # the hub client raises many types; all mean "not available"
        raise PiLoraError(
            f"cannot read {model.name!r}'s weights: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}", field="model.name",
            fix=f"download it first (`hf download {model.name} --local-dir DIR`) or point "
                "model.name at a directory"
        ) from None


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
        return {str(k): str(v) for k, v in weight_map.items()}
    except (ValueError, KeyError, AssertionError, TypeError) as exc:
        raise PiLoraError(f"{index} is not a safetensors index: {exc}", field="model.name",
                          fix="re-download or re-save the checkpoint") from None


def _shard_order(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name.split("-of-")[0] if c.isdigit())
    return (int(digits) if digits else 0, name)


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(path: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes from a shard's header (safetensors reads it; no data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = [(name, f.get_slice(name)) for name in f.keys()]  # noqa: SIM118
            return [TensorInfo(name, tuple(piece.get_shape()), _DTYPES[piece.get_dtype()])
                    for name, piece in slices]
    except (SafetensorError, OSError, KeyError, RuntimeError) as exc:
        raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: BaseException) -> PiLoraError:
    return PiLoraError(f"{path} is unreadable: {type(exc).__name__}: {str(exc)[:200]}",
                       field="model.name", fix="re-download or re-save the checkpoint")
