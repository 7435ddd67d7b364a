"""RoPE scaling checked numerically against the formulas, across model families."""

from __future__ import annotations

import math

import pytest
import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.rope import apply_rope, detect_existing, plan_rope, rotary_dim, yarn_temperature
from pi_lora.recipe.loading import RopeSection
from pi_lora.testing import FAMILY_CONFIGS, tiny_config

FAMILIES = sorted(FAMILY_CONFIGS)


def _rotary(config):
    """The family's own rotary module, built from the config as the model would."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


def _cos_sin(config, positions: torch.Tensor):
    rotary = _rotary(config)
    x = torch.zeros(1, positions.shape[-1], 8)
    return rotary(x, positions[None, :])


def _plan(config, method: str, target: int, **extra):
    return plan_rope(RopeSection(method=method, target_context=target, **extra), config)


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_pi_is_position_over_factor(family: str) -> None:
    """PI at factor s gives exactly the cos/sin of position p/s (Chen et al. eq. 2)."""
    base = tiny_config(family, max_positions=128)
    plan = _plan(base, "linear", 512)
    assert plan.factor == 4.0 and plan.max_position_embeddings == 512
    scaled = apply_rope(tiny_config(family, max_positions=128), plan)
    positions = torch.arange(0, 512, dtype=torch.float32)
    cos_pi, sin_pi = _cos_sin(scaled, positions)
    cos_ref, sin_ref = _cos_sin(base, positions / 4.0)
    torch.testing.assert_close(cos_pi, cos_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin_pi, sin_ref, atol=1e-5, rtol=1e-5)


def test_factor_is_exact_not_rounded() -> None:
    plan = _plan(tiny_config("llama", max_positions=4096), "linear", 10000)
    assert plan.factor == pytest.approx(10000 / 4096)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gemma"])
def test_ntk_raises_theta_by_formula(family: str) -> None:
    base = tiny_config(family, max_positions=128)
    plan = _plan(base, "ntk", 512)
    d = rotary_dim(base)
    expected_theta = 10000.0 * 4.0 ** (d / (d - 2))
    assert plan.rope_parameters["rope_theta"] == pytest.approx(expected_theta)
    rotary = _rotary(apply_rope(tiny_config(family, max_positions=128), plan))
    expected = 1.0 / expected_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    torch.testing.assert_close(rotary.inv_freq.float(), expected)


def test_partial_rotary_dim() -> None:
    config = tiny_config("gpt_neox")  # head_dim 16, rotary_pct 0.5
    assert rotary_dim(config) == 8


def test_dynamic_ntk_by_formula() -> None:
    base = tiny_config("llama", max_positions=128)
    plan = _plan(base, "dynamic", 512)
    assert plan.max_position_embeddings == 128  # transformers' dynamic reads it as the window
    config = apply_rope(tiny_config("llama", max_positions=128), plan)
    rotary = _rotary(config)
    positions = torch.arange(0, 384, dtype=torch.long)
    rotary(torch.zeros(1, 384, 8), positions[None, :])
    d, s, length, original = 16, 4.0, 384, 128
    theta = 10000.0 * ((s * length / original) - (s - 1)) ** (d / (d - 2))
    expected = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    torch.testing.assert_close(rotary.inv_freq.float(), expected)


def test_yarn_by_parts_and_temperature() -> None:
    base = tiny_config("llama", max_positions=128)
    plan = _plan(base, "yarn", 2048, yarn={"beta_fast": 32, "beta_slow": 1})
    config = apply_rope(tiny_config("llama", max_positions=128), plan)
    rotary = _rotary(config)
    d, b, s, original = 16, 10000.0, 16.0, 128
    plain = 1.0 / b ** (torch.arange(0, d, 2, dtype=torch.float32) / d)

    def correction_dim(rotations: float) -> float:
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(b))

    low, high = max(math.floor(correction_dim(32)), 0), min(math.ceil(correction_dim(1)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    expected = plain * (1 - ramp) + (plain / s) * ramp
    torch.testing.assert_close(rotary.inv_freq.float(), expected)
    assert rotary.attention_scaling == pytest.approx(yarn_temperature(s))
    assert yarn_temperature(16) == pytest.approx(1.2773, abs=1e-4)  # reference.md: s=16 -> 1.277
    assert plan.rope_parameters["original_max_position_embeddings"] == 128


def test_llama3_by_formula() -> None:
    base = tiny_config("llama", max_positions=128)
    plan = _plan(base, "llama3", 1024)
    rotary = _rotary(apply_rope(tiny_config("llama", max_positions=128), plan))
    d, s, original, low_ff, high_ff = 16, 8.0, 128, 1.0, 4.0
    plain = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    wavelen = 2 * math.pi / plain
    smooth = (original / wavelen - low_ff) / (high_ff - low_ff)
    mid = (1 - smooth) * plain / s + smooth * plain
    expected = torch.where(wavelen < original / high_ff, plain,
                           torch.where(wavelen > original / low_ff, plain / s, mid))
    torch.testing.assert_close(rotary.inv_freq.float(), expected)


def test_legacy_rope_scaling_is_read_and_extended_from_true_original() -> None:
    from transformers import LlamaConfig

    legacy = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                         max_position_embeddings=256, rope_scaling={"type": "linear", "factor": 2.0})
    existing = detect_existing(legacy)
    assert existing is not None and existing.original_context == 128
    plan = _plan(legacy, "linear", 1024)
    assert plan.original_context == 128 and plan.factor == 8.0


def test_double_scaling_is_an_error() -> None:
    from transformers import LlamaConfig

    scaled = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                         max_position_embeddings=512,
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                                          "original_max_position_embeddings": 128})
    with pytest.raises(PiLoraError, match="twice") as info:
        _plan(scaled, "yarn", 2048, original_context=512)
    assert info.value.field == "rope.original_context"
    replaced = _plan(scaled, "linear", 2048)  # replaces yarn x4, measured from 128: x16
    assert replaced.factor == 16.0 and replaced.rope_parameters["rope_type"] == "linear"
    assert any("replaces the checkpoint's yarn x4" in n for n in replaced.notes)
    with pytest.raises(PiLoraError) as info:
        _plan(scaled, "yarn", 512)
    assert info.value.field == "rope.target_context"
    plan = _plan(scaled, "yarn", 2048)
    assert plan.factor == 16.0 and plan.original_context == 128


def test_target_must_exceed_original() -> None:
    with pytest.raises(PiLoraError) as info:
        _plan(tiny_config("llama", max_positions=128), "linear", 128)
    assert info.value.field == "rope.target_context"


def test_none_keeps_rope_and_extends_window() -> None:
    base = tiny_config("llama", max_positions=128)
    plan = _plan(base, "none", 512)
    assert plan.rope_parameters["rope_type"] == "default"
    assert plan.max_position_embeddings == 512
