"""What a model family's published config means for rope, where it is not what it says.

Each current family brings a twist that a context extension must read correctly:
- Qwen3 and Mistral-Nemo publish a `max_position_embeddings` that is not the window they
  were trained at (Qwen3: 40960 = 32768 + 8192 of output room; Nemo: 1024000 for a model
  trained at 128k), so the pretraining window comes from their model cards here;
- Gemma 3 interleaves local sliding-window layers (their own rope base) with global layers:
  only the global rope is scaled, and `validate` says which layers that is;
- Phi-3/Phi-4 carry LongRoPE short and long factors that an extension continues from;
- Gemma 3 4B/12B/27B are image-text checkpoints whose language model sits in `text_config`.
"""

from __future__ import annotations

from typing import Any

from pi_lora.core.errors import PiLoraError

# (model_type, published max_position_embeddings) -> (pretraining window, where that is stated)
TRAINED_WINDOWS: dict[tuple[str, int], tuple[int, str]] = {
    ("qwen3", 40960): (32768, "Qwen3 model card: 32,768 native; the config's 40,960 adds "
                              "8,192 tokens of output room"),
    ("mistral", 1024000): (131072, "Mistral-Nemo model card: trained with a 128k window; the "
                                   "config's 1,024,000 is not a trained length"),
}
# nested rope_parameters: the layer types whose rope is never scaled (local sliding windows
# never see long distances; scaling them would only blur what they were trained on)
UNSCALED_LAYER_TYPES = ("sliding_attention",)


def trained_window(config: Any) -> tuple[int, str] | None:
    """(pretraining window, source) where the config's max_position_embeddings misstates it."""
    key = (getattr(config, "model_type", ""), int(getattr(config, "max_position_embeddings", 0)))
    return TRAINED_WINDOWS.get(key)


def refuse_composite(config: Any) -> None:
    """An image-text checkpoint (Gemma 3 4B+, Llama 3.2 Vision, ...) keeps its language model's
    rope in `text_config`, and its vision tower shares projection names with the decoder: LoRA,
    merge and the rope plan would all reach the wrong modules. Refuse it up front."""
    if getattr(config, "text_config", None) is None and getattr(config, "vision_config",
                                                                None) is None:
        return
    kind = getattr(config, "model_type", None) or type(config).__name__
    hint = (" (Gemma 3 4B/12B/27B: the 1B and 270M checkpoints are text-only gemma3_text)"
            if kind == "gemma3" else "")
    raise PiLoraError(
        f"{kind} is an image-text checkpoint{hint}: pi-lora extends text-only causal LMs, and "
        "would put adapters and rope scaling on the vision tower's layers too", field="model.name",
        fix="use the family's text-only checkpoint, or extract the language model "
            "(text_config and its weights) into its own directory first")


def interleaves_local_layers(config: Any) -> bool:
    """Local sliding-window layers between global ones (Gemma 3): the window is by design."""
    types = set(getattr(config, "layer_types", None) or ())
    return {"sliding_attention", "full_attention"} <= types


def nested_rope(config: Any) -> dict[str, dict[str, Any]]:
    """Per-layer-type rope dicts (Gemma 3: sliding_attention / full_attention), or {}."""
    params = getattr(config, "rope_parameters", None) or {}
    return {k: v for k, v in params.items() if isinstance(v, dict)}


def scaled_layer_types(config: Any) -> list[str]:
    """The layer types whose rope an extension rewrites (all of them for a flat config)."""
    nested = nested_rope(config)
    return [k for k in nested if k not in UNSCALED_LAYER_TYPES] if nested else []


def layer_scaling_note(config: Any) -> str:
    """Which decoder layers get the new rope: `validate` prints it, run.json keeps it."""
    layers = int(getattr(config, "num_hidden_layers", 0))
    nested = nested_rope(config)
    types = list(getattr(config, "layer_types", None) or [])
    if not nested or not types:
        return f"scaled layers: all {layers}"
    scaled = set(scaled_layer_types(config))
    hit = [i for i, t in enumerate(types) if t in scaled]
    kept = [t for t in nested if t not in scaled]
    kept_text = "; ".join(
        f"{sum(1 for t in types if t == k)} {k} layers keep rope_theta "
        f"{nested[k].get('rope_theta'):g} ({nested[k].get('rope_type', 'default')})"
        + (f" and their {config.sliding_window}-token window"
           if k == "sliding_attention" and getattr(config, "sliding_window", None) else "")
        for k in kept)
    return (f"scaled layers: {len(hit)} of {layers} ({'/'.join(sorted(scaled))}: "
            f"{', '.join(map(str, hit))})" + (f"; {kept_text}" if kept_text else ""))


def own_longrope(params: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's own LongRoPE factors (Phi-3.5 / Phi-4-mini), which an extension
    continues from and never drops; None for any other rope."""
    if params.get("rope_type", params.get("type")) != "longrope":
        return None
    return {"long_factor": [float(v) for v in params["long_factor"]],
            "short_factor": [float(v) for v in params["short_factor"]]}
