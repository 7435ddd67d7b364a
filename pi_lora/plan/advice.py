"""Recommendations: recipe changes that make a step fit or go faster, each planned in full.

Every candidate is a `--set` override applied to a copy of the recipe and run through the
same memory and time models, so its effect is computed, not asserted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pi_lora.plan.setup import Setup
from pi_lora.plan.shape import ModelShape
from pi_lora.recipe.loading import QuantizationSection, Recipe
from pi_lora.train.sequence_parallel import sequence_parallel_sizes


@dataclass(frozen=True)
class Candidate:
    name: str
    overrides: tuple[str, ...]  # for `pi-lora train RECIPE --set ...`
    why: str
    apply: Callable[[Recipe], Recipe]


def _training(**changes: object) -> Callable[[Recipe], Recipe]:
    def apply(recipe: Recipe) -> Recipe:
        return recipe.model_copy(update={"training": recipe.training.model_copy(update=changes)})

    return apply


def _both(first: Callable[[Recipe], Recipe],
          second: Callable[[Recipe], Recipe]) -> Callable[[Recipe], Recipe]:
    return lambda recipe: second(first(recipe))


def _model(**changes: object) -> Callable[[Recipe], Recipe]:
    def apply(recipe: Recipe) -> Recipe:
        return recipe.model_copy(update={"model": recipe.model.model_copy(update=changes)})

    return apply


def candidates(recipe: Recipe, setup: Setup, shape: ModelShape, fits: bool) -> list[Candidate]:
    """Changes worth planning for this recipe on this launch (none it already has)."""
    t, found = recipe.training, []
    if not fits:
        found += sequence_parallel_candidates(recipe, setup, shape)
    if not t.chunked_loss:
        found.append(Candidate("chunked loss", ("training.chunked_loss=true",),
                               "no [T, V] logits", _training(chunked_loss=True)))
    if not t.gradient_checkpointing:
        found.append(Candidate("gradient checkpointing", ("training.gradient_checkpointing=true",),
                               "keep layer inputs only; one extra forward",
                               _training(gradient_checkpointing=True)))
    if setup.world > 1 and setup.zero_stage < 3:
        found.append(Candidate("ZeRO-3", ("training.deepspeed=zero3",),
                               "shard weights and states over the devices",
                               _training(deepspeed="zero3")))
    if not setup.offload and not fits:
        found.append(Candidate("ZeRO-3 + CPU offload", ("training.deepspeed=zero3_offload",),
                               "weights and optimizer states in host RAM; PCIe-bound",
                               _training(deepspeed="zero3_offload")))
    if not t.tiled_mlp and not fits and setup.device_kind == "gpu":
        found.append(Candidate("tiled MLP", ("training.tiled_mlp=true",),
                               "MLP over row tiles, recomputed in backward: no [T, F] saved",
                               _training(tiled_mlp=True)))
    if t.gradient_checkpointing and not t.offload_checkpoints and setup.device_kind == "gpu":
        found.append(Candidate("offload checkpoints", ("training.offload_checkpoints=true",),
                               "layer inputs in pinned host memory; PCIe copies each step",
                               _training(offload_checkpoints=True)))
    if setup.quant_bits is None and setup.device_kind == "gpu":
        found.append(Candidate("QLoRA (nf4 base)", ("model.quantization.bits=4",),
                               "4-bit frozen base; slower matmuls, small quality cost",
                               _model(quantization=QuantizationSection(bits=4))))
    if not t.s2_attn and recipe.data.format == "pretrain" and t.sequence_parallel == 1:
        # packed conversations: no S2; sequence parallelism replaces the attention itself
        fa2 = recipe.model.attn_implementation == "flash_attention_2"
        found.append(Candidate(
            "S2-Attn", ("training.s2_attn=true",) + (("model.attn_implementation=sdpa",) if fa2 else ()),
            "attention in groups of T/4 (training only, LongLoRA; runs on sdpa)",
            _both(_training(s2_attn=True), _model(attn_implementation="sdpa"))))
    if (recipe.model.attn_implementation != "flash_attention_2" and not t.s2_attn
            and setup.device_kind == "gpu"):  # S2-Attn replaces the attention kernel
        found.append(Candidate("FlashAttention-2", ("model.attn_implementation=flash_attention_2",),
                               "faster fused attention (pip install flash-attn)",
                               _model(attn_implementation="flash_attention_2")))
    if t.per_device_batch_size > 1 and t.global_batch_size is not None:
        found.append(Candidate(
            "1 sequence per device", ("training.per_device_batch_size=1",),
            "same global batch (more accumulation), activations of one sequence",
            _training(per_device_batch_size=1)))
    elif t.per_device_batch_size > 1:
        accum = t.gradient_accumulation_steps * t.per_device_batch_size
        found.append(Candidate(
            "1 sequence per device",
            ("training.per_device_batch_size=1", f"training.gradient_accumulation_steps={accum}"),
            "same global batch, activations of one sequence",
            _training(per_device_batch_size=1, gradient_accumulation_steps=accum)))
    return found


SEQUENCE_PARALLEL = "sequence parallel"


def sequence_parallel_candidates(recipe: Recipe, setup: Setup,
                                 shape: ModelShape) -> list[Candidate]:
    """One candidate per size the launch and model allow (the planner keeps the smallest that
    fits), with what sequence parallelism needs: DeepSpeed, no S2-Attn, and an attention
    kernel that keeps the row's structure without a mask."""
    t = recipe.training
    if setup.device_kind != "gpu" or t.sequence_parallel > 1:
        return []
    sizes = sequence_parallel_sizes(t, setup.seq_len, shape.heads, shape.kv_heads, setup.world)
    training: dict[str, object] = {"s2_attn": False} if t.s2_attn else {}
    if not t.deepspeed:
        training["deepspeed"] = "zero3"
    attention = recipe.model.attn_implementation
    windowed = shape.attention_window is not None and shape.attention_window < setup.seq_len
    if recipe.data.format != "pretrain" or windowed:
        attention = "flash_attention_2"  # separates packed conversations, keeps the window
    elif attention == "eager" or (recipe.data.pose and attention == "flash_attention_2"):
        attention = "sdpa"
    model = {"attn_implementation": attention} if attention != recipe.model.attn_implementation \
        else {}
    found = []
    for n in sizes:
        changes = {**training, "sequence_parallel": n}
        overrides = tuple(f"training.{k}={_text(v)}" for k, v in changes.items()) + tuple(
            f"model.{k}={v}" for k, v in model.items())
        found.append(Candidate(
            f"{SEQUENCE_PARALLEL} x{n}", overrides,
            f"each sequence split over {n} devices (DeepSpeed Ulysses): activations / {n}, "
            "all-to-all per layer" + ("; exact attention, so S2-Attn's saving goes"
                                      if t.s2_attn else ""),
            _both(_training(**changes), _model(**model))))
    return found


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
