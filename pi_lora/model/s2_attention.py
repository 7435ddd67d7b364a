"""S2-Attn (LongLoRA's shifted sparse attention) as a transformers attention implementation.

Training only. The sequence is cut into groups of G tokens; the first half of the heads attend
causally inside their group, the second half inside groups shifted by G/2, so information
crosses group borders through the shifted heads. Attention cost drops from O(T^2) to O(T*G).

Unlike LongLoRA's reference code, which rolls the shifted half by G/2 along the sequence (the
last tokens then share a group with the first ones, a wrap-around leak), the shifted groups
here are proper segments: [0, G/2) is its own group, then [G/2, 3G/2), ... and a short tail.
No token ever sees a future token.

Registered through `AttentionInterface`, so it serves every model family whose attention
goes through it (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-NeoX, ...). In eval mode, with a
padding mask, or with a KV cache it falls back to plain sdpa, i.e. full attention.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

DEFAULT_GROUP_FRACTION = 0.25
BASE_NAME = "s2_attn"


def register_s2_attention(
    group_fraction: float = DEFAULT_GROUP_FRACTION, group_size: int | None = None
) -> str:
    """Register S2-Attn with this group setting and return its implementation name.

    Idempotent. The default setting is called "s2_attn"; other settings get their own name
    ("s2_attn_frac0p125", "s2_attn_size2048") so models with different settings can coexist.
    `group_size` (tokens) wins over `group_fraction` (of the sequence length) when given.
    """
    _check_group_setting(group_fraction, group_size)
    name = _implementation_name(group_fraction, group_size)
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        forward = functools.partial(
            s2_attention_forward, group_fraction=group_fraction, group_size=group_size
        )
        ALL_ATTENTION_FUNCTIONS.register(name, forward)
        # Same masks as sdpa: None when there is no padding (S2 applies), a real mask otherwise
        # (we fall back). An unregistered name would silently get no padding mask at all.
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def enable_s2_attention(
    model: nn.Module,
    group_fraction: float = DEFAULT_GROUP_FRACTION,
    group_size: int | None = None,
) -> str:
    """Switch `model` (a transformers model, or a peft model around one) to S2-Attn."""
    name = register_s2_attention(group_fraction, group_size)
    _set_attention(model, name)
    return name


def disable_s2_attention(model: nn.Module, restore: str = "sdpa") -> None:
    """Back to full attention (`restore`), e.g. before evaluation or merging."""
    _set_attention(model, restore)


def _set_attention(model: nn.Module, name: str) -> None:
    get_base_model = getattr(model, "get_base_model", None)
    base = get_base_model() if callable(get_base_model) else model
    # S2 runs sdpa per group and falls back to sdpa, so the model must support sdpa
    # (Gemma2's attention soft-capping, for one, does not).
    if not (base._can_set_attn_implementation() and base._supports_sdpa):
        raise ValueError(
            f"{type(base).__name__} does not run sdpa through transformers' "
            "AttentionInterface, so S2-Attn cannot be switched on for it."
        )
    base.set_attn_implementation(name)


def _check_group_setting(group_fraction: float, group_size: int | None) -> None:
    if group_size is not None and group_size < 2:
        raise ValueError(f"S2-Attn group_size must be >= 2 tokens, got {group_size}")
    if group_size is None and not 0.0 < group_fraction <= 1.0:
        raise ValueError(f"S2-Attn group_fraction must be in (0, 1], got {group_fraction}")


def _implementation_name(group_fraction: float, group_size: int | None) -> str:
    if group_size is not None:
        return f"{BASE_NAME}_size{group_size}"
    if group_fraction == DEFAULT_GROUP_FRACTION:
        return BASE_NAME
    return f"{BASE_NAME}_frac{group_fraction:g}".replace(".", "p")


def resolve_group_size(length: int, group_fraction: float, group_size: int | None) -> int:
    """Group length in tokens for a sequence of `length` tokens (at least 2)."""
    if group_size is not None:
        return group_size
    return max(2, round(length * group_fraction))


def s2_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    *,
    group_fraction: float = DEFAULT_GROUP_FRACTION,
    group_size: int | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """AttentionInterface contract: query [B,H,T,d], key/value [B,Hkv,T,d] -> ([B,T,H,d], None)."""
    length = query.shape[2]
    group = resolve_group_size(length, group_fraction, group_size)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not _s2_applies(module, query, key, attention_mask, causal, group, kwargs):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs
        )
    output = shifted_group_attention(query, key, value, group, scaling=scaling, dropout=dropout)
    return output.transpose(1, 2).contiguous(), None


def _s2_applies(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    group: int,
    kwargs: dict,
) -> bool:
    """S2 only for causal self-attention in training, without padding, over > 1 group."""
    return (
        module.training
        and causal
        and attention_mask is None
        and query.shape[2] == key.shape[2]
        and query.shape[2] > group
        and kwargs.get("position_bias") is None
        and kwargs.get("softcap") is None
    )


def shifted_group_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: int,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """S2 attention: [B,H,T,d] queries, [B,Hkv,T,d] keys/values -> [B,H,T,d].

    Heads [0, H//2) use groups starting at 0, heads [H//2, H) groups starting at G//2.
    """
    heads = query.shape[1]
    split = heads // 2
    attend = functools.partial(_grouped_causal, group=group, scaling=scaling, dropout=dropout)
    halves = []
    for start, stop, offset in ((0, split, 0), (split, heads, group // 2)):
        if stop > start:
            k, v, gqa = _kv_for_heads(key, value, start, stop, heads)
            halves.append(attend(query[:, start:stop], k, v, offset=offset, enable_gqa=gqa))
    return torch.cat(halves, dim=1)


def _kv_for_heads(
    key: Tensor, value: Tensor, start: int, stop: int, heads: int
) -> tuple[Tensor, Tensor, bool]:
    """Key/value heads serving query heads [start, stop) under GQA; True if sdpa must expand."""
    repeats = heads // key.shape[1]
    if repeats == 1:
        return key[:, start:stop], value[:, start:stop], False
    if start % repeats == 0 and stop % repeats == 0:  # the half owns whole kv heads
        kv_heads = slice(start // repeats, stop // repeats)
        return key[:, kv_heads], value[:, kv_heads], True
    # Odd kv-head count (e.g. MQA): a kv head serves both halves, so expand first.
    expanded_key = key.repeat_interleave(repeats, dim=1)[:, start:stop]
    return expanded_key, value.repeat_interleave(repeats, dim=1)[:, start:stop], False


def _grouped_causal(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    offset: int,
    group: int,
    scaling: float | None,
    dropout: float,
    enable_gqa: bool,
) -> Tensor:
    """Causal attention within segments [0, offset), then groups of `group`, then a tail."""
    length = query.shape[2]
    body_end = offset + (length - offset) // group * group
    sdpa = functools.partial(_causal_sdpa, scaling=scaling, dropout=dropout, enable_gqa=enable_gqa)

    def segment(begin: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
        return query[:, :, begin:end], key[:, :, begin:end], value[:, :, begin:end]

    pieces = []
    if offset > 0:  # the short leading group of the shifted heads
        pieces.append(sdpa(*segment(0, offset)))
    if body_end > offset:  # whole groups, batched as [B * groups, h, G, d]
        grouped = (_to_groups(t, group) for t in segment(offset, body_end))
        pieces.append(_ungroup(sdpa(*grouped), query.shape[0]))
    if length > body_end:  # a short trailing group
        pieces.append(sdpa(*segment(body_end, length)))
    return torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]


def _to_groups(tensor: Tensor, group: int) -> Tensor:
    """[B, h, n*G, d] -> [B*n, h, G, d] (a view when the sequence dim allows it)."""
    batch, heads, length, dim = tensor.shape
    groups = length // group
    grouped = tensor.reshape(batch, heads, groups, group, dim).transpose(1, 2)
    return grouped.reshape(batch * groups, heads, group, dim)


def _ungroup(tensor: Tensor, batch: int) -> Tensor:
    """[B*n, h, G, d] -> [B, h, n*G, d]."""
    flat, heads, group, dim = tensor.shape
    groups = flat // batch
    grouped = tensor.reshape(batch, groups, heads, group, dim).transpose(1, 2)
    return grouped.reshape(batch, heads, groups * group, dim)


def _causal_sdpa(
    query: Tensor, key: Tensor, value: Tensor, *, scaling, dropout: float, enable_gqa: bool
) -> Tensor:
    return nn.functional.scaled_dot_product_attention(
        query, key, value, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=enable_gqa
    )
