"""`pi-lora validate`: what a recipe implies (window, factor, rope parameters, trainable size), offline.

Used by `pi-lora validate`: it reads the model config when it is local or cached, falls back
to pi-lora's table of known models, and otherwise says what it could not check.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.data.build import expand_files
from pi_lora.data.layouts import check_first_record
from pi_lora.model.families import interleaves_local_layers
from pi_lora.model.known_models import config_for_planning
from pi_lora.model.loading import apply_sliding_window, attention_window, wrap_lora
from pi_lora.model.rope import plan_rope
from pi_lora.model.serving import serving_warnings
from pi_lora.recipe.loading import Recipe, RopeSection, resolve_deepspeed_config
from pi_lora.train.arguments import tracking_words
from pi_lora.train.sequence_parallel import sequence_parallel_problems


def count_trainable(recipe: Recipe, config: Any) -> tuple[int, int]:
    """Build the model on the meta device (no memory, no weights) and wrap it as training would."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # peft's own count: tied weights once, 4-bit storage unpacked, ZeRO-3 partitions whole
    return wrap_lora(model, recipe.lora, gradient_checkpointing=False).get_nb_trainable_parameters()


def validate_recipe(recipe: Recipe) -> str:
    """What `pi-lora validate` prints below the resolved recipe: what follows from it."""
    lines = ["# derived"]
    unchecked: list[str] = []
    config, source = config_for_planning(recipe)
    where = recipe.model.name if source == "model config" else ""
    lines.append(f"model config: {where} ({source})" if where else f"model config: {source}")
    if config is None:
        unchecked.append("model config (architecture, pretraining window, existing scaling)")
        lines += _stated_rope_only(recipe.rope, unchecked)
    else:
        problems = sequence_parallel_problems(recipe, config)  # what train refuses up front
        if problems:
            raise problems[0]
        plan = plan_rope(recipe.rope, config)
        lines += [
            f"rope method: {plan.method}",
            f"original context: {plan.original_context} (from {plan.original_source})",
            f"target context: {plan.target_context}",
            f"factor: {plan.factor:.4g} ({plan.original_context} -> {plan.target_context})",
            f"rope_parameters: {json.dumps(plan.rope_parameters)}",
            f"max_position_embeddings: {plan.max_position_embeddings}",
            *[f"note: {n}" for n in plan.notes],
            *[f"warning: {w}" for w in serving_warnings(plan.method)],
        ]
        if plan.existing:
            lines.append(f"existing scaling: {plan.existing}")
        lines.append(_window_line(recipe, config))
        trainable, total = count_trainable(recipe, config)
        lines.append(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.3%})")
    pose = recipe.data.pose
    lines.append(f"training sequence length: {recipe.seq_len}" + (
        f" (PoSE: positions up to {recipe.rope.target_context}, {pose.chunks} pieces per row)"
        if pose else ""))
    lines.append(_describe_data(recipe, unchecked))
    if recipe.training.deepspeed:
        lines.append(f"deepspeed config: {resolve_deepspeed_config(recipe.training.deepspeed)}")
    lines.append(f"tracking: {tracking_words(recipe, Path(recipe.output_dir))}")
    if unchecked:
        lines.append("could not check: " + "; ".join(unchecked))
    return "\n".join(lines)


def _describe_data(recipe: Recipe, unchecked: list[str]) -> str:
    if recipe.data.dataset is not None:
        unchecked.append(f"dataset {recipe.data.dataset.name} (loaded at train time)")
        return f"data: dataset {recipe.data.dataset.name} [{recipe.data.dataset.split}]"
    try:
        files = expand_files(recipe.data.files)
    except PiLoraError as err:
        unchecked.append(f"data files ({err.render()})")
        return "data: files not found here"
    size = sum(f.stat().st_size for f in files)
    # the first record read as train reads it: chat records under format pretrain fail
    # here, naming data.format, not minutes into a training start
    columns = check_first_record(recipe.data, files[0])
    shown = f", columns {', '.join(columns)}" if columns else ""
    return f"data: {len(files)} file(s), {size / 1e6:.1f} MB, format {recipe.data.format}{shown}"


def _stated_rope_only(rope: RopeSection, unchecked: list[str]) -> list[str]:
    if rope.original_context is None:
        unchecked.append("factor (set rope.original_context to compute it offline)")
        return [f"rope method: {rope.method}", f"target context: {rope.target_context}"]
    factor = rope.target_context / rope.original_context
    return [f"rope method: {rope.method}",
            f"factor: {factor:.4g} ({rope.original_context} -> {rope.target_context}, as stated)"]


def _window_line(recipe: Recipe, config: Any) -> str:
    """Per-layer attention reach: a sliding window the extension does not widen caps it."""
    before = attention_window(config)
    apply_sliding_window(config, recipe.model)
    after = attention_window(config)
    text = "whole context" if after is None else f"{after} tokens"
    if after is not None and interleaves_local_layers(config):  # Gemma 3: local by design
        return f"attention window per layer: {text} on the sliding layers, whole context on " \
               "the full_attention layers (the local windows stay)"
    if after is not None and after < recipe.rope.target_context:
        text += f" (below the target {recipe.rope.target_context}: set model.sliding_window)"
    changed = " (model: " + ("whole context" if before is None else f"{before}") + ")" \
        if before != after else ""
    return f"attention window per layer: {text}{changed}"
