"""What serving stacks make of a release's config.json: the window vLLM derives from it, and
the rope methods a stack does not carry. One home for these facts: merge writes the config
by them, validate and the model card warn by them.

vLLM (vllm/config/model.py, `_get_and_verify_max_len`) takes the smallest of several length
keys it finds in the config, then multiplies it by the rope factor for every rope type but
llama3 and longrope; for yarn it starts from `original_max_position_embeddings` instead. A
linear release says max_position_embeddings = target (what transformers and llama.cpp read),
so vLLM would default to target x factor: twice the trained window at x2, 8x at x8. Writing
the original window under another key vLLM reads (and nothing else does before
max_position_embeddings) makes its default the trained window.
"""

from __future__ import annotations

from typing import Any

from pi_lora.model.rope import RopePlan

VLLM_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                    "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
VLLM_UNSCALED_TYPES = ("su", "longrope", "llama3")
VLLM_PIN_KEY = "max_sequence_length"  # read by vLLM; transformers' Llama-family configs ignore it

DYNAMIC_WARNING = ("dynamic NTK does not survive every serving stack: vLLM produced NaN past "
                   "the original window and a GGUF conversion drops the scaling; prefer yarn or "
                   "linear for a release that will be served")


def vllm_default_window(config: dict[str, Any]) -> int | None:
    """The max_model_len vLLM derives from a config.json when none is given (its rule)."""
    lengths = [config[k] for k in VLLM_LENGTH_KEYS if isinstance(config.get(k), int | float)]
    if not lengths:
        return None
    window = min(lengths)
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in VLLM_UNSCALED_TYPES and rope_type != "default":
        if rope_type == "yarn" and scaling.get("original_max_position_embeddings"):
            window = scaling["original_max_position_embeddings"]
        window *= scaling.get("factor") or 1.0
    return int(window)


def pin_vllm_window(config: dict[str, Any], plan: RopePlan) -> dict[str, Any]:
    """The config with vLLM's default window brought to the target when it would exceed it."""
    derived = vllm_default_window(config)
    if derived is None or derived <= plan.target_context:
        return config
    pinned = {**config, VLLM_PIN_KEY: plan.original_context}
    return pinned if (vllm_default_window(pinned) or 0) <= plan.target_context else config


def serving_warnings(method: str) -> list[str]:
    """Rope methods a release can be trained with but that a serving stack loses."""
    return [DYNAMIC_WARNING] if method == "dynamic" else []
