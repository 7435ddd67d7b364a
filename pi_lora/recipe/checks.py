"""The checks between a recipe's sections (data vs rope, training vs model, DeepSpeed's JSON,
sequence parallelism, S2-attention, PoSE): constraints no single field can express, each
reported with the field to change and how."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError
from pi_lora.core.safe_yaml import ERROR_VALUE_CHARS, cut
from pi_lora.recipe.schema import (
    SHIPPED_DEEPSPEED_DIR,
    DataSection,
    RopeSection,
    training_length,
)


def cross_checks(sections: dict[str, Any]) -> list[PiLoraError]:
    """Constraints between sections that single fields cannot express; each runs when the
    sections it reads are valid."""
    errors: list[PiLoraError] = []
    data, rope, model, training = (sections.get(k) for k in ("data", "rope", "model", "training"))
    if data is not None:
        errors += _data_checks(data, rope)
    if training is not None:
        if training.global_batch_size is not None \
                and "gradient_accumulation_steps" in training.model_fields_set:
            errors.append(PiLoraError(
                "set both with global_batch_size", field="training.gradient_accumulation_steps",
                fix="drop it: accumulation follows from global_batch_size and the process count"))
        if model is not None and training.deepspeed and model.quantization \
                and model.quantization.bits == 8:
            errors.append(PiLoraError(
                "8-bit quantization cannot be sharded by ZeRO", field="model.quantization.bits",
                fix="use bits: 4 with ZeRO-3, or drop training.deepspeed"))
        if training.offload_checkpoints and not training.gradient_checkpointing:
            errors.append(PiLoraError(
                "offloads the checkpointed layer inputs, so it needs checkpointing",
                field="training.offload_checkpoints",
                fix="set training.gradient_checkpointing: true, or drop offload_checkpoints"))
        if not training.recompute_attention and not (
                training.gradient_checkpointing and (model is None or model.attn_implementation == "sdpa")):
            errors.append(PiLoraError(
                "keeps sdpa's attention output through checkpointing: nothing to keep without "
                "checkpointing, and eager / flash_attention_2 are not sdpa",
                field="training.recompute_attention",
                fix="use gradient_checkpointing: true and attn_implementation: sdpa, or drop it"))
        errors += _check_deepspeed_path(training.deepspeed)
        errors += _s2_checks(training, model, data)
        errors += _sequence_parallel_checks(training, model, data, rope)
    return errors


def _sequence_parallel_checks(training: Any, model: Any, data: Any,
                              rope: Any) -> list[PiLoraError]:
    """Ulysses runs inside DeepSpeed and drops the attention mask (each slice's mask is not
    the whole sequence's): whatever relies on a mask, or on another attention, is refused."""
    n = training.sequence_parallel
    if n == 1:
        return []
    attention = model.attn_implementation if model is not None else None
    data_format, pose, stream = (data.format, data.pose, data.streaming) if data is not None \
        else ("pretrain", None, False)
    refused = [  # (when, why, fix)
        (not training.deepspeed, "sequence parallelism is DeepSpeed's (Ulysses)",
         "set training.deepspeed: zero2 or zero3, or drop sequence_parallel"),
        (training.s2_attn, "S2-Attn and sequence parallelism both replace the attention function",
         "drop training.s2_attn (sequence parallelism keeps exact attention)"),
        (attention == "eager", "eager attention needs a [T x T] mask, which sequence "
         "parallelism does not pass", "set model.attn_implementation: sdpa or flash_attention_2"),
        (data_format != "pretrain" and attention == "sdpa", f"{data_format} data packs "
         "conversations that must not see each other; without a mask sdpa would attend across "
         "them", "set model.attn_implementation: flash_attention_2 (it separates them by "
         "position ids), or drop sequence_parallel"),
        (pose is not None and attention == "flash_attention_2", "PoSE positions skip ahead, "
         "which FlashAttention-2 reads as new documents once the mask is gone",
         "use model.attn_implementation: sdpa with PoSE, or drop sequence_parallel"),
        (stream, "a stream is dispatched from rank 0 and the sequence-parallel data adapter "
         "gathers from every rank: the combination is untested",
         "set data.streaming: false (the data is tokenized once and memory-mapped)"),
    ]
    errors = [PiLoraError(why, field="training.sequence_parallel", fix=fix)
              for when, why, fix in refused if when]
    seq_len = training_length(data, rope)
    if seq_len is not None and seq_len % n:
        errors.append(PiLoraError(f"training rows of {seq_len} tokens do not split into {n} "
                                  "equal slices", field="data.seq_len", fix=f"use a multiple of {n}"))
    return errors


def _s2_checks(training: Any, model: Any, data: Any) -> list[PiLoraError]:
    """S2-Attn is its own attention (on sdpa) and needs one causal sequence per row: it
    would replace FlashAttention-2 and fall back to full attention on packed conversations,
    both silently, so both are refused."""
    if not training.s2_attn:
        return []
    errors = []
    if model is not None and model.attn_implementation == "flash_attention_2":
        errors.append(PiLoraError(
            "S2-Attn replaces the attention kernel, so flash_attention_2 would not run",
            field="training.s2_attn", fix="use model.attn_implementation: sdpa with S2-Attn, or "
                                          "drop s2_attn to train with FlashAttention-2"))
    if data is not None and data.format != "pretrain":
        errors.append(PiLoraError(
            f"S2-Attn attends in fixed groups of one sequence; {data.format} data is packed "
            "conversations (a block-diagonal mask), where it would run full attention instead",
            field="training.s2_attn", fix="drop s2_attn for chat/instruction data"))
    return errors


def _pose_checks(data: DataSection, rope: RopeSection | None,
                 seq_len: int | None) -> list[PiLoraError]:
    """PoSE skips positions over the gap between the row and the target window: with no gap
    it would do nothing, and packed conversations already use position ids for boundaries."""
    if data.pose is None:
        return []
    errors = []
    if rope is not None and seq_len is not None and seq_len >= rope.target_context:
        errors.append(PiLoraError(
            f"PoSE trains rows shorter than the target window, but the rows are {seq_len} "
            f"tokens and rope.target_context is {rope.target_context}", field="data.pose",
            fix="set data.seq_len below the target (the paper trains 2k rows for 16k-128k), "
                "or drop data.pose"))
    if data.format != "pretrain":
        errors.append(PiLoraError(
            f"PoSE skips positions inside one text; {data.format} data packs conversations "
            "whose position ids mark where each one starts", field="data.pose",
            fix="use data.format: pretrain with PoSE, or drop data.pose"))
    if seq_len is not None and data.pose.chunks > seq_len:
        errors.append(PiLoraError(
            f"{data.pose.chunks} pieces do not fit rows of {seq_len} tokens",
            field="data.pose.chunks", fix="use 2 (the paper's setting)"))
    return errors


def _data_checks(data: DataSection, rope: RopeSection | None) -> list[PiLoraError]:
    errors = []
    if rope is not None and data.seq_len and data.seq_len > rope.target_context:
        errors.append(PiLoraError(
            f"{data.seq_len} exceeds rope.target_context {rope.target_context}",
            field="data.seq_len", fix="train at or below the target window"))
    seq_len = training_length(data, rope)
    if data.short_mix and seq_len is not None and data.short_mix.seq_len >= seq_len:
        errors.append(PiLoraError(
            "must be shorter than the training length", field="data.short_mix.seq_len",
            fix=f"use a length below {seq_len}"))
    errors += _pose_checks(data, rope, seq_len)
    if data.streaming and data.short_mix:
        errors.append(PiLoraError(
            "short_mix chooses blocks to cut among all of them, which a stream does not have",
            field="data.short_mix", fix="drop short_mix, or set data.streaming: false"))
    if not data.files and data.dataset is None:
        errors.append(PiLoraError(
            "no training data", field="data",
            fix="give data.files (txt/jsonl/parquet) or data.dataset.name"))
    return errors


def _check_deepspeed_path(value: str | None) -> list[PiLoraError]:
    if value is None:
        return []
    path = resolve_deepspeed_config(value)
    if path is not None:
        return _check_deepspeed_json(path)
    shipped = sorted(p.stem for p in SHIPPED_DEEPSPEED_DIR.glob("*.json"))
    return [PiLoraError(f"{value} is neither a shipped config nor a file",
                        field="training.deepspeed", fix=f"use one of {shipped} or a JSON path")]


def _check_deepspeed_json(path: Path) -> list[PiLoraError]:
    """The DeepSpeed config is read at launch, long after validation: read it now."""

    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return [PiLoraError(f"{path} is not a JSON file: {cut(str(exc), ERROR_VALUE_CHARS)}",
                            field="training.deepspeed", fix="give a DeepSpeed JSON config")]
    except OSError as exc:
        return [PiLoraError(f"cannot read {path}: {exc.strerror}", field="training.deepspeed")]
    if not isinstance(config, dict):
        return [PiLoraError(f"{path} holds no JSON object", field="training.deepspeed",
                            fix="give a DeepSpeed JSON config")]
    return []


def resolve_deepspeed_config(value: str) -> Path | None:
    """A shipped name (zero3) or a JSON path; None when neither exists."""
    path = Path(value)
    if path.is_file():
        return path.resolve()
    shipped = SHIPPED_DEEPSPEED_DIR / f"{Path(value).stem}.json"
    return shipped if shipped.is_file() else None
