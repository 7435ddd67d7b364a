"""Trained embeddings and norms: pi-lora's extras (the base parameters trained in place) against
peft's `modules_to_save` (+ `ensure_weight_tying` on tied models), by parameter count on the
meta device (no weights, no memory): `python -m benchmarks.extras_vs_modules_to_save`.

The figures are in docs/design.md ("Why trained extras are not peft's modules_to_save").
"""

from __future__ import annotations

import copy
from typing import Any

import torch

MODELS = ("HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-2-7b-hf")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SAVED = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]


def parameter_counts(model: Any) -> tuple[int, int]:
    """(all parameters, trainable ones), each tensor once (tied weights are one tensor)."""
    unique = {id(p): p for _, p in model.named_parameters(remove_duplicate=False)}
    return (sum(p.numel() for p in unique.values()),
            sum(p.numel() for p in unique.values() if p.requires_grad))


def compare(name: str) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pi_lora.model.known_models import known_config
    from pi_lora.model.loading import wrap_lora
    from pi_lora.recipe.schema import LoraSection

    config = known_config(name)
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config)
    tied = bool(config.tie_word_embeddings)
    ours = wrap_lora(copy.deepcopy(base), LoraSection(r=8, alpha=16, trainable_extras=[
        "embeddings", "norms"]), gradient_checkpointing=False)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=8, lora_alpha=16, target_modules=LORA_TARGETS, modules_to_save=SAVED,
        ensure_weight_tying=tied))
    (ours_all, ours_trained), (peft_all, peft_trained) = map(parameter_counts, (ours, theirs))
    return {"model": name, "tied": tied, "extras": (ours_all, ours_trained),
            "modules_to_save": (peft_all, peft_trained), "extra_copy": peft_all - ours_all}


def main() -> None:
    print("| model | tied | params, extras (trainable) | params, modules_to_save (trainable) "
          "| kept copy |")
    print("|---|---|---|---|---|")
    for name in MODELS:
        row = compare(name)
        (a, at), (b, bt) = row["extras"], row["modules_to_save"]
        print(f"| {name} | {row['tied']} | {a:,} ({at:,}) | {b:,} ({bt:,}) | "
              f"+{row['extra_copy']:,} ({row['extra_copy'] / a:.1%}) |")


if __name__ == "__main__":
    main()
