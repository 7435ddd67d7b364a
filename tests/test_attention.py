"""S2-Attn against an explicit-mask reference, causality, and tiny models end to end."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

from pi_lora.model.s2_attention import (
    disable_s2_attention,
    enable_s2_attention,
    register_s2_attention,
    s2_attention_forward,
)
from pi_lora.testing import tiny_config


class FakeAttention(nn.Module):
    """Just what the attention interface reads from a model's attention module."""

    is_causal = True

    def __init__(self, num_key_value_groups: int):
        super().__init__()
        self.num_key_value_groups = num_key_value_groups


def qkv(length=64, heads=8, kv_heads=2, dim=16, batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64)
    key = torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(batch, kv_heads, length, dim, generator=generator, dtype=torch.float64)
    return query, key, value


def s2(query, key, value, training=True, **group):
    module = FakeAttention(query.shape[1] // key.shape[1]).train(training)
    output, weights = s2_attention_forward(module, query, key, value, None, **group)
    assert weights is None
    return output  # [B, T, H, d]


def segment_ids(length: int, group: int, offset: int) -> torch.Tensor:
    """Group index of every position: [0, offset) is group 0 when offset > 0."""
    positions = torch.arange(length)
    if offset == 0:
        return positions // group
    return torch.where(positions < offset, 0, 1 + (positions - offset) // group)


def reference_s2(query, key, value, group: int) -> torch.Tensor:
    """Eager softmax attention with the explicit per-token S2 mask of each head half."""
    heads, length = query.shape[1], query.shape[2]
    key = key.repeat_interleave(heads // key.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    masks = []
    for head in range(heads):
        ids = segment_ids(length, group, 0 if head < heads // 2 else group // 2)
        masks.append(causal & (ids[:, None] == ids[None, :]))
    mask = torch.stack(masks)  # [H, T, T]
    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


def full_causal(query, key, value):
    module = FakeAttention(query.shape[1] // key.shape[1]).eval()
    output, _ = s2_attention_forward(module, query, key, value, None)
    repeats = query.shape[1] // key.shape[1]
    expected = nn.functional.scaled_dot_product_attention(
        query,
        key.repeat_interleave(repeats, 1),
        value.repeat_interleave(repeats, 1),
        is_causal=True,
    ).transpose(1, 2)
    torch.testing.assert_close(output, expected)
    return expected


@pytest.mark.parametrize("group", [{"group_fraction": 1.0}, {"group_size": 64}, {"group_size": 80}])
def test_group_spanning_sequence_is_full_causal_attention(group):
    query, key, value = qkv()
    torch.testing.assert_close(s2(query, key, value, **group), full_causal(query, key, value))


def test_eval_mode_is_full_causal_attention():
    query, key, value = qkv()
    expected = full_causal(query, key, value)
    torch.testing.assert_close(s2(query, key, value, training=False), expected)


@pytest.mark.parametrize(
    ("length", "heads", "kv_heads", "group"),
    [
        (64, 8, 2, {}),  # G = T/4 = 16, GQA with whole kv heads per half
        (64, 4, 4, {"group_fraction": 0.125}),
        (70, 8, 1, {"group_size": 16}),  # MQA: the kv head serves both halves; ragged tail
        (45, 3, 3, {"group_size": 10}),  # odd head count and odd offsets
    ],
)
def test_matches_explicit_mask_reference(length, heads, kv_heads, group):
    query, key, value = qkv(length, heads, kv_heads)
    size = group.get("group_size") or round(length * group.get("group_fraction", 0.25))
    expected = reference_s2(query, key, value, size)
    torch.testing.assert_close(s2(query, key, value, **group), expected)


def test_s2_is_not_full_attention():
    query, key, value = qkv()
    assert not torch.allclose(s2(query, key, value), full_causal(query, key, value))


@pytest.mark.parametrize("changed", [0, 7, 8, 16, 23, 40, 63])
def test_no_position_sees_a_later_token(changed):
    query, key, value = qkv(length=64)
    before = s2(query, key, value)
    for tensor in (query, key, value):
        tensor[:, :, changed] += 3.0
    after = s2(query, key, value)
    torch.testing.assert_close(after[:, :changed], before[:, :changed], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, changed], before[:, changed])


def test_register_is_idempotent_and_names_settings():
    assert register_s2_attention() == register_s2_attention(0.25) == "s2_attn"
    assert register_s2_attention(0.125) == "s2_attn_frac0p125"
    assert register_s2_attention(group_size=2048) == "s2_attn_size2048"
    with pytest.raises(ValueError, match="group_fraction"):
        register_s2_attention(0.0)


def tiny_model(family: str) -> nn.Module:
    """A random 2-layer model of `family` (pi_lora.testing's shapes) on sdpa."""
    torch.manual_seed(0)
    config = tiny_config(family, vocab_size=256, max_positions=256)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def logits(model, input_ids, attention_mask=None):
    return model(input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_model_trains_with_s2_and_evaluates_like_sdpa(family):
    model = tiny_model(family)
    input_ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    model.eval()
    sdpa_logits = logits(model, input_ids)
    model.train()
    sdpa_train_logits = logits(model, input_ids)

    assert enable_s2_attention(model) == "s2_attn"
    assert model.config._attn_implementation == "s2_attn"
    assert model.model.config._attn_implementation == "s2_attn"
    loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert not torch.allclose(logits(model, input_ids), sdpa_train_logits)

    model.eval()
    torch.testing.assert_close(logits(model, input_ids), sdpa_logits, rtol=0, atol=0)
    disable_s2_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_padding_mask_falls_back_to_full_attention():
    model = tiny_model("llama").train()
    input_ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    padded = torch.ones_like(input_ids)
    padded[1, :5] = 0
    no_padding = torch.ones_like(input_ids)
    expected_padded = logits(model, input_ids, padded)
    full_attention = logits(model, input_ids, no_padding)
    enable_s2_attention(model)
    torch.testing.assert_close(logits(model, input_ids, padded), expected_padded)
    s2_logits = logits(model, input_ids, no_padding)  # an all-ones mask is dropped: S2 applies
    torch.testing.assert_close(s2_logits, logits(model, input_ids))
    assert not torch.allclose(s2_logits, full_attention)


def test_enable_through_peft_wrapper():
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(tiny_model("llama"), config).train()
    input_ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    before = model(input_ids).logits
    enable_s2_attention(model, group_fraction=0.5)
    assert model.get_base_model().config._attn_implementation == "s2_attn_frac0p5"
    after = model(input_ids, labels=input_ids)
    after.loss.backward()
    assert not torch.allclose(after.logits, before)
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma", "phi3", "gpt_neox"])
def test_other_families_switch_to_s2_in_training_only(family):
    model = tiny_model(family)
    input_ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    eval_logits = logits(model.eval(), input_ids)
    train_logits = logits(model.train(), input_ids)
    enable_s2_attention(model)
    assert not torch.allclose(logits(model, input_ids), train_logits)
    torch.testing.assert_close(logits(model.eval(), input_ids), eval_logits, rtol=0, atol=0)


def test_model_without_sdpa_is_refused():
    config = transformers.Gemma2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=256,
    )
    with pytest.raises(ValueError, match="S2-Attn cannot be switched on"):
        enable_s2_attention(transformers.Gemma2ForCausalLM(config))
