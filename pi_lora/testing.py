"""Tiny random models, a tokenizer and a corpus built locally: fixtures for tests and smoke runs.

Nothing here downloads; every family the core supports can be built in well under a second.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# the real model's locator lives with model loading (pi_lora.model.packaged); re-exported for old callers
from pi_lora.model.packaged import SMOLLM2_GGUF_FILE as SMOLLM2_GGUF_FILE
from pi_lora.model.packaged import smollm2_gguf as smollm2_gguf

_WORDS = (
    "the a one every old young quick slow red blue green river stone house king queen horse bird "
    "ship road light night day sea wind fire tree city field song book door runs sees holds finds "
    "brings keeps leaves takes gives calls makes knows hears walks and but so then while because "
    "over under near far into across beside"
).split()

_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "gpt_neox": {"rotary_pct": 0.5},
}


@dataclass(frozen=True)
class TinyFamily:
    """A current family's rope twist in miniature: windows of tens of tokens, not 128k."""

    family: str  # transformers model_type
    max_positions: int
    rope_parameters: dict[str, Any]
    overrides: dict[str, Any]
    method: str  # how the shipped recipe extends it
    target_context: int
    original_context: int  # the true pretraining window a correct plan starts from


CURRENT_FAMILIES: dict[str, TinyFamily] = {
    # Llama 3.1: llama3 x4 from 64 (the real one: x8 from 8192); extend to 512 = x8 from 64
    "llama3.1": TinyFamily("llama", 256, {"rope_type": "llama3", "factor": 4.0, "rope_theta":
                                          500000.0, "low_freq_factor": 1.0, "high_freq_factor":
                                          4.0, "original_max_position_embeddings": 64},
                           {}, "llama3", 512, 64),
    # Qwen3 as its card configures 128k: YaRN x4 from 32, max_position_embeddings left at 40
    "qwen3": TinyFamily("qwen3", 40, {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                      "original_max_position_embeddings": 32},
                        {"head_dim": 16}, "yarn", 256, 32),
    # Gemma 3 4B+: local layers (window 16, base 10k) and global ones (base 1M, linear x8)
    "gemma3": TinyFamily("gemma3_text", 128,
                         {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                          "full_attention": {"rope_type": "linear", "factor": 8.0,
                                             "rope_theta": 1e6}},
                         {"head_dim": 32, "sliding_window": 16, "num_hidden_layers": 3,
                          "layer_types": ["sliding_attention", "full_attention",
                                          "sliding_attention"]}, "linear", 256, 16),
    # Phi-3.5/4-mini: partial rotary (12 of 16 dims: 6 pairs), LongRoPE short and long factors
    "phi4": TinyFamily("phi3", 128, {"rope_type": "longrope", "rope_theta": 10000.0,
                                     "partial_rotary_factor": 0.75,
                                     "long_factor": [1.0, 1.3, 1.8, 2.6, 3.5, 4.4],
                                     "short_factor": [1.0, 1.0, 1.02, 1.05, 1.1, 1.2],
                                     "original_max_position_embeddings": 32},
                       {"partial_rotary_factor": 0.75, "original_max_position_embeddings": 32,
                        "pad_token_id": 0}, "longrope", 256, 32),
    # Mistral-Nemo: head_dim 32 where hidden / heads is 16, rope_theta 1M, no sliding window
    "mistral-nemo": TinyFamily("mistral", 128, {"rope_type": "default", "rope_theta": 1e6},
                               {"head_dim": 32, "sliding_window": None}, "yarn", 256, 128),
}


def synthetic_text(n_docs: int, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    """Pseudo-sentences with repeated structure: a tiny model's loss drops fast on them."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        while sum(len(s.split()) for s in sentences) < words_per_doc:
            sentences.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 9))) + ".")
        docs.append(" ".join(sentences).capitalize())
    return docs


def write_corpus(path: Path, n_docs: int = 64, seed: int = 0) -> Path:
    """A text file with one document per blank-line-separated paragraph."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(synthetic_text(n_docs, seed=seed)) + "\n")
    return path


def make_tokenizer(vocab_size: int = 384) -> Any:
    """A byte-level BPE tokenizer trained on the synthetic corpus, with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(synthetic_text(200, seed=1), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>")
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_config(family: str = "llama", *, vocab_size: int = 384, max_positions: int = 128,
                rope_parameters: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """The one tiny random config of `family` every test builds on; `overrides` change fields
    (e.g. hidden_size=32, tie_word_embeddings=True) where a test needs another shape."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": max_positions, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": False, **FAMILY_CONFIGS.get(family, {}),
    }
    if family == "gpt_neox":
        kwargs.pop("num_key_value_heads")
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    return AutoConfig.for_model(family, **{**kwargs, **overrides})


def make_tiny_model(out_dir: Path, family: str = "llama", *, max_positions: int = 128,
                    rope_parameters: dict[str, Any] | None = None, seed: int = 0,
                    tie_word_embeddings: bool = False, tokenizer: Any | None = None,
                    **overrides: Any) -> Path:
    """Save a random tiny causal LM + tokenizer (ours unless one is given) as a normal Hugging
    Face directory."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer if tokenizer is not None else make_tokenizer()
    config = tiny_config(family, vocab_size=len(tokenizer), max_positions=max_positions,
                         rope_parameters=rope_parameters, **overrides)
    config.tie_word_embeddings = tie_word_embeddings
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def make_tiny_family(out_dir: Path, name: str, *, seed: int = 0) -> Path:
    """A random tiny model of one of CURRENT_FAMILIES, saved as a Hugging Face directory."""
    spec = CURRENT_FAMILIES[name]
    return make_tiny_model(out_dir, spec.family, max_positions=spec.max_positions,
                           rope_parameters=spec.rope_parameters, seed=seed, **spec.overrides)


def build_tiny(out: Path) -> tuple[Path, Path]:
    """(model dir, corpus file) of recipes/tiny.yaml under `out` (`make tiny`, the golden test)."""
    model = make_tiny_model(out / "model", tie_word_embeddings=True)
    return model, write_corpus(out / "corpus.txt", n_docs=200)


def main() -> None:
    """`python -m pi_lora.testing OUT_DIR`: the tiny model + corpus the tiny recipe uses."""
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/tiny")
    build_tiny(out)
    print(f"tiny model and corpus written to {out}")


if __name__ == "__main__":
    main()
