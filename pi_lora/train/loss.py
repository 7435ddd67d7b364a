"""Causal-LM loss without materialising the [T, V] logits.

At long context the fp32 logits dominate training memory (8k tokens x 49k vocab = 1.6 GB for
SmolLM2, 16.8 GB at 32k for Llama-3). `chunked_lm_loss` runs the lm_head and the
cross-entropy over a few hundred tokens at a time and computes the gradients of the hidden
states and of the head weight right there, during forward. Backward then only scales the
stored gradients: no logits are kept and nothing is recomputed.

Numerics follow transformers' `ForCausalLMLoss`: the softmax runs on fp32 logits. On CUDA the
head matmuls run in the model dtype like there; on CPU they run in fp32 (faster there, and
more exact), so bf16 results match the plain path to bf16 precision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pi_lora.data import IGNORE_INDEX

DEFAULT_CHUNK_TOKENS = 256  # = the schema default (training.loss_chunk_tokens)


def chunked_lm_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    ignore_index: int = IGNORE_INDEX,
    bias: Tensor | None = None,
    logit_softcap: float | None = None,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """Mean next-token cross-entropy of `hidden[B,T,D] @ weight[V,D].T` against `labels[B,T]`.

    Labels are unshifted, as in `model(input_ids, labels=labels)`: hidden[:, t] predicts
    labels[:, t+1]. The mean runs over non-ignored tokens, or the sum is divided by
    `num_items_in_batch` when given (what Trainer passes under gradient accumulation).
    Returns an fp32 scalar (fp64 for fp64 inputs).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if hidden.shape[:2] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} differ")
    targets = shift_labels(labels, ignore_index).reshape(-1)
    return _ChunkedLinearCrossEntropy.apply(
        hidden,
        weight,
        bias,
        targets,
        chunk_tokens,
        ignore_index,
        logit_softcap,
        num_items_in_batch,
    )


def shift_labels(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """labels[B,T] -> targets[B,T] where targets[:, t] = labels[:, t+1] and the last is ignored."""
    return nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss and its gradients in one pass; backward only multiplies by grad_output."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        chunk_tokens: int,
        ignore_index: int,
        logit_softcap: float | None,
        num_items_in_batch: Tensor | int | None,
    ) -> Tensor:
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, D]
        rows = (targets != ignore_index).nonzero().squeeze(1)  # only these carry a loss
        denominator = _denominator(rows, num_items_in_batch, hidden.device)
        grads = _Grads.allocate(flat_hidden, weight, bias, ctx.needs_input_grad)
        head = _MatmulHead.of(weight, bias)
        loss_sum = torch.zeros((), dtype=_wide_dtype(hidden.dtype), device=hidden.device)
        for start in range(0, rows.numel(), chunk_tokens):
            chunk_rows = rows[start : start + chunk_tokens]
            loss_sum += _chunk_step(
                flat_hidden, head, targets, chunk_rows, logit_softcap, denominator, grads
            )
        ctx.hidden_shape = hidden.shape
        ctx.save_for_backward(*grads.as_tuple(hidden.dtype, weight.dtype))
        return loss_sum / denominator

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight, grad_bias = _unpack_saved(ctx)
        scale = _upcast(grad_output)

        def scaled(grad: Tensor | None) -> Tensor | None:
            return None if grad is None else (grad * scale).to(grad.dtype)

        grad_hidden = scaled(grad_hidden)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(ctx.hidden_shape)
        return grad_hidden, scaled(grad_weight), scaled(grad_bias), None, None, None, None, None


class _Grads:
    """Gradient buffers filled chunk by chunk; weight/bias accumulate in >= fp32."""

    def __init__(self, hidden: Tensor | None, weight: Tensor | None, bias: Tensor | None):
        self.hidden, self.weight, self.bias = hidden, weight, bias

    @classmethod
    def allocate(
        cls, flat_hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, ...]
    ) -> _Grads:
        wide = _wide_dtype(weight.dtype)
        return cls(
            torch.zeros_like(flat_hidden) if needs[0] else None,
            torch.zeros(weight.shape, dtype=wide, device=weight.device) if needs[1] else None,
            torch.zeros(bias.shape, dtype=wide, device=bias.device)
            if bias is not None and needs[2]
            else None,
        )

    def as_tuple(self, hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> tuple[Tensor, ...]:
        """Tensors for save_for_backward (an empty tensor stands for None)."""
        empty = torch.empty(0)
        return (
            empty if self.hidden is None else self.hidden.to(hidden_dtype),
            empty if self.weight is None else self.weight.to(weight_dtype),
            empty if self.bias is None else self.bias.to(weight_dtype),
        )


def _wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types (as transformers upcasts logits), the dtype itself for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _upcast(tensor: Tensor) -> Tensor:
    return tensor.to(_wide_dtype(tensor.dtype))


def _unpack_saved(ctx) -> list[Tensor | None]:
    return [None if t.numel() == 0 else t for t in ctx.saved_tensors]


def _denominator(rows: Tensor, num_items_in_batch: Tensor | int | None, device) -> Tensor:
    if num_items_in_batch is None:
        count = torch.tensor(rows.numel(), dtype=torch.float32, device=device)
        # HF gives nan for an all-ignored batch (0/0); keep that behaviour visible.
        return count
    return torch.as_tensor(num_items_in_batch, device=device).to(torch.float32)


class _MatmulHead:
    """The head weight in the dtype its matmuls run in.

    On CPU that is fp32: without native bf16 units (AVX2) a bf16 matmul is ~5x slower than
    fp32, and fp32 is also the more exact of the two. On accelerators it is the model dtype,
    as in transformers (logits upcast after the matmul).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight, self.bias = weight, bias

    @classmethod
    def of(cls, weight: Tensor, bias: Tensor | None) -> _MatmulHead:
        dtype = _wide_dtype(weight.dtype) if weight.device.type == "cpu" else weight.dtype
        return cls(weight.to(dtype), None if bias is None else bias.to(dtype))


def _chunk_step(
    flat_hidden: Tensor,
    head: _MatmulHead,
    targets: Tensor,
    rows: Tensor,
    logit_softcap: float | None,
    denominator: Tensor,
    grads: _Grads,
) -> Tensor:
    """Loss sum of one chunk of rows; adds the chunk's gradients into `grads`."""
    hidden_chunk = flat_hidden.index_select(0, rows).to(head.weight.dtype)  # [n, D]
    chunk_targets = targets.index_select(0, rows).unsqueeze(1)  # [n, 1]
    logits = _upcast(nn.functional.linear(hidden_chunk, head.weight, head.bias))  # [n, V]
    tanh = None
    if logit_softcap is not None:
        tanh = torch.tanh(logits / logit_softcap)
        logits = torch.mul(tanh, logit_softcap, out=logits)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [n, 1]
    loss_sum = (lse - logits.gather(1, chunk_targets)).sum()
    # d loss / d logits = (softmax - onehot) / denominator, built in place over the logits.
    grad_logits = logits.sub_(lse).exp_()
    grad_logits.scatter_add_(1, chunk_targets, torch.full_like(lse, -1.0))
    if tanh is not None:
        grad_logits.mul_(1.0 - tanh.square_())
    grad_logits.div_(denominator)
    _accumulate(grads, grad_logits, hidden_chunk, head.weight, rows)
    return loss_sum


def _accumulate(
    grads: _Grads, grad_logits: Tensor, hidden_chunk: Tensor, weight: Tensor, rows: Tensor
) -> None:
    """grad_logits[n,V] -> hidden rows [n,D] and W [V,D], matmuls in the head's dtype."""
    lhs = grad_logits.to(weight.dtype)  # bf16 on accelerators, as autograd would cast it
    if grads.hidden is not None:
        grads.hidden.index_copy_(0, rows, (lhs @ weight).to(grads.hidden.dtype))
    if grads.weight is not None:
        if lhs.dtype == grads.weight.dtype:
            grads.weight.addmm_(lhs.t(), hidden_chunk)
        else:
            grads.weight += lhs.t() @ hidden_chunk
    if grads.bias is not None:
        grads.bias += grad_logits.sum(0)


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:
    """Same value and gradients as `model(input_ids, labels=labels).loss`, without logits.

    Works on a transformers CausalLM or a peft-wrapped one. Uses Liger's fused kernel when it
    is installed and the model runs on CUDA, else `chunked_lm_loss`.
    """
    causal_lm = _unwrap_peft(model)
    head = _plain_output_head(causal_lm)
    decoder = causal_lm.get_decoder()
    outputs = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = outputs.last_hidden_state  # [B, T, D]
    softcap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if hidden.is_cuda and _liger_available():
        return _liger_loss(hidden, head, labels, softcap, num_items_in_batch)
    return chunked_lm_loss(
        hidden,
        head.weight,
        labels,
        chunk_tokens=chunk_tokens,
        bias=head.bias,
        logit_softcap=softcap,
        num_items_in_batch=num_items_in_batch,
    )


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """PeftModel -> the transformers model inside (LoRA layers stay in place)."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if callable(get_base_model) else model


def _plain_output_head(causal_lm: nn.Module) -> nn.Linear:
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"causal_lm_loss needs a plain nn.Linear lm_head, got {type(head).__name__}. "
            "The head carries an adapter (LoRA target or modules_to_save); remove lm_head "
            "from the LoRA targets or use the plain `model(..., labels=...)` loss."
        )
    if _has_unsupported_logit_scaling(causal_lm.config):
        raise ValueError(
            f"{type(causal_lm).__name__} scales its logits (logit_scale/logits_scaling), "
            "which causal_lm_loss does not reproduce; use the plain loss."
        )
    return head


def _has_unsupported_logit_scaling(config) -> bool:
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * scale
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / scaling
    return (scale is not None and scale != 1.0) or (scaling is not None and scaling != 1.0)


def _liger_available() -> bool:
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except ImportError:
        return False
    return True


def _liger_loss(
    hidden: Tensor,
    head: nn.Linear,
    labels: Tensor,
    softcap: float | None,
    num_items_in_batch: Tensor | int | None,
) -> Tensor:
    """Liger's Triton fused linear + cross-entropy (CUDA only)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    targets = shift_labels(labels).reshape(-1)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = liger_fused_linear_cross_entropy(
        input=hidden.reshape(-1, hidden.shape[-1]),
        weight=head.weight,
        target=targets,
        bias=head.bias,
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
        softcap=softcap,
    )
    if isinstance(loss, tuple):  # some versions return (loss, z_loss)
        loss = loss[0]
    if num_items_in_batch is not None:
        loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
    return loss
