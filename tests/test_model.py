"""Model loading: the recipe's sliding window reaches the config (and so the release), and a
PI-extended model with the model's own window would not see past it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.loading import apply_sliding_window, attention_window, load_model
from pi_lora.recipe.loading import ModelSection
from pi_lora.testing import make_tokenizer, tiny_config


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Mistral whose layers attend 16 tokens back."""
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("mistral")
    torch.manual_seed(0)
    config = tiny_config("mistral", max_positions=256, sliding_window=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    make_tokenizer().save_pretrained(str(out))
    return out


def _reacts_to_the_first_tokens(model) -> bool:
    """Does the last position's output change when tokens 0-9 change?"""
    ids = torch.randint(10, 300, (1, 100), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, :10] = 5
    with torch.no_grad():
        a, b = model(ids).logits[0, -1], model(other).logits[0, -1]
    return not torch.allclose(a, b, atol=1e-6)


def test_sliding_window_is_what_the_recipe_says(windowed_mistral: Path) -> None:
    kept = load_model(ModelSection(name=str(windowed_mistral), dtype="fp32"), None).eval()
    assert attention_window(kept.config) == 16
    assert not _reacts_to_the_first_tokens(kept)  # 90 tokens back: outside a 16 window
    full = load_model(ModelSection(name=str(windowed_mistral), dtype="fp32",
                                   sliding_window="none"), None).eval()
    assert attention_window(full.config) is None and full.config.sliding_window is None
    assert _reacts_to_the_first_tokens(full)
    wider = load_model(ModelSection(name=str(windowed_mistral), dtype="fp32",
                                    sliding_window=128), None).eval()
    assert attention_window(wider.config) == 128 and _reacts_to_the_first_tokens(wider)


def test_window_switches_follow_each_family() -> None:
    qwen = tiny_config("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0)
    assert attention_window(qwen) == 16
    apply_sliding_window(qwen, ModelSection(name="x", sliding_window="none"))
    assert attention_window(qwen) is None and set(qwen.layer_types) == {"full_attention"}
    full = tiny_config("qwen2")
    with pytest.raises(PiLoraError, match="whole context"):
        apply_sliding_window(full, ModelSection(name="x", sliding_window=512))
