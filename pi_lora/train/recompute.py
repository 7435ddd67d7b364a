"""Selective recomputation: keep attention's output through checkpointing instead of
running attention twice.

Gradient checkpointing keeps only each decoder layer's input and runs the layer's forward again
in backward. At long context that second forward is mostly attention (quadratic in length,
while the projections and MLP are linear): SmolLM2 at 8k spends about a third of its
recompute there. `training.recompute_attention: false` marks the fused attention kernels'
outputs (the attention output and its softmax statistics) as saved (torch's selective
activation checkpointing, the policy torchtitan calls "selective op"), so backward reuses
them: + seq_len x hidden x dtype bytes per layer, checked by `pi-lora plan`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

# the fused attention kernels torch's sdpa dispatches to, by device (absent ones are skipped)
_ATTENTION_OPS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def attention_ops() -> set[Any]:
    """The aten overloads whose outputs are kept (those this torch build has)."""
    import torch

    found = set()
    for name in _ATTENTION_OPS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None and hasattr(packet, "default"):
            found.add(packet.default)
    return found


def _keep_attention(ops: set[Any], ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE


def keep_attention_context() -> Any:
    """A checkpoint `context_fn` under which attention is saved, everything else recomputed."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(partial(_keep_attention, attention_ops()))


def checkpoint_kwargs(recompute_attention: bool) -> dict[str, Any]:
    """Keyword arguments for torch.utils.checkpoint (non-reentrant, as selective needs)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if not recompute_attention:
        kwargs["context_fn"] = keep_attention_context
    return kwargs
