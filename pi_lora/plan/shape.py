"""The numbers of a model the memory and time models need, read from its config, offline.

Parameter counts come from building the model on the meta device (no memory, no weights) and
wrapping it with LoRA exactly as training does, so they hold for any architecture transformers
knows; the layer dimensions come from the config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from pi_lora.recipe.loading import Recipe


@dataclass(frozen=True)
class ModelShape:
    """Dimensions and parameter counts of the LoRA-wrapped model (tied weights counted once)."""

    model_type: str
    layers: int
    hidden: int  # D
    intermediate: int  # F
    heads: int  # H
    kv_heads: int
    head_dim: int
    vocab: int  # V
    tied: bool
    total_params: int  # every parameter of the wrapped model
    lora_params: int
    extras_params: int  # trainable embeddings / norms / lm_head (kept in fp32)
    embedding_params: int  # input embedding matrix (not a matmul: excluded from FLOPs)
    quantizable_params: int  # frozen linear weights inside the decoder layers
    lora_input_features: int  # sum of in_features of the LoRA-wrapped linears, per layer
    head_trainable: bool  # lm_head gets a gradient (lm_head extra, or tied + embeddings)
    attention_window: int | None = None  # tokens a layer attends back; None: whole context
    global_layers: int = 0  # full-attention layers beside sliding ones (Gemma 3); 0: not mixed

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def trainable_params(self) -> int:
        return self.lora_params + self.extras_params

    @property
    def frozen_params(self) -> int:
        return self.total_params - self.trainable_params

    @property
    def matmul_params(self) -> int:
        """Parameters each token multiplies through (the lm_head counts, the lookup does not)."""
        base = self.total_params - self.lora_params
        return base if self.tied else base - self.embedding_params


def model_shape(recipe: Recipe, config: Any) -> ModelShape:
    """Dimensions from the config; counts from a meta-device build wrapped like training."""
    from transformers import AutoModelForCausalLM

    from pi_lora.model.loading import (
        apply_sliding_window,
        attention_window,
        extras_parameter_names,
        wrap_lora,
    )

    config = copy.deepcopy(config)
    apply_sliding_window(config, recipe.model)  # as training will run it
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    model = wrap_lora(base, recipe.lora, gradient_checkpointing=False)
    params = dict(model.named_parameters())  # tied weights appear once
    extras = set(extras_parameter_names(model, recipe.lora.trainable_extras))
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    head = model.get_output_embeddings()
    return ModelShape(
        model_type=config.model_type,
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        vocab=config.vocab_size,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        total_params=sum(p.numel() for p in params.values()),
        lora_params=sum(p.numel() for n, p in params.items() if "lora_" in n),
        extras_params=sum(params[n].numel() for n in extras),
        embedding_params=model.get_input_embeddings().weight.numel(),
        quantizable_params=_decoder_linear_params(model),
        lora_input_features=_lora_input_features(model, config.num_hidden_layers),
        head_trainable=head is not None and head.weight.requires_grad,
        attention_window=attention_window(config),
        global_layers=_global_layers(config),
    )


def _global_layers(config: Any) -> int:
    """Full-attention layers of a model that interleaves them with sliding ones, else 0."""
    from pi_lora.model.families import interleaves_local_layers

    if not interleaves_local_layers(config):
        return 0
    return list(config.layer_types).count("full_attention")


def _decoder_linear_params(model: Any) -> int:
    """Weights bitsandbytes would quantize: every nn.Linear but the output head."""
    head = model.get_output_embeddings()
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, torch.nn.Linear) and m is not head and not m.weight.requires_grad)


def _lora_input_features(model: Any, layers: int) -> int:
    from peft.tuners.lora import LoraLayer

    total = sum(m.in_features for m in model.modules() if isinstance(m, LoraLayer))
    return total // max(layers, 1)
