"""training.recompute_attention: false keeps attention's outputs through checkpointing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from pi_lora.plan import get_device, plan_recipe
from pi_lora.recipe.loading import load_recipe
from pi_lora.train.recompute import attention_ops, checkpoint_kwargs

REPO = Path(__file__).resolve().parents[1]


class _CountAttention(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.ops = attention_ops()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.ops
        return func(*args, **(kwargs or {}))


def _layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    out = torch.nn.functional.scaled_dot_product_attention(q @ w, k @ w, v, is_causal=True)
    return torch.tanh(out) @ w


@pytest.mark.parametrize("recompute", [True, False])
def test_kept_attention_runs_once_and_gives_the_same_gradients(recompute: bool) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, requires_grad=True) for _ in range(3))
    w = torch.randn(16, 16, requires_grad=True)
    plain = _layer(q, k, v, w).square().sum()
    expected = torch.autograd.grad(plain, (q, k, v, w))
    with _CountAttention() as counter:
        out = checkpoint(_layer, q, k, v, w, **checkpoint_kwargs(recompute)).square().sum()
        forward_calls = counter.calls
        grads = torch.autograd.grad(out, (q, k, v, w))
    assert forward_calls == 1
    # recompute: the backward runs attention's forward again; kept: never
    assert counter.calls - forward_calls == (1 if recompute else 0)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plan_counts_the_kept_attention() -> None:
    path = REPO / "recipes/llama2-7b-32k.yaml"
    device = get_device("h100-80gb")
    full = plan_recipe(load_recipe(path, ["training.s2_attn=false"]), device, advise=False)
    kept = plan_recipe(load_recipe(path, ["training.s2_attn=false",
                                          "training.recompute_attention=false"]),
                       device, advise=False)
    shape, seq = full.shape, 32768
    attention_forward = 2 * shape.layers * shape.heads * shape.head_dim * seq
    assert full.time.flops_per_token - kept.time.flops_per_token == attention_forward
    extra = shape.layers * seq * shape.heads * (shape.head_dim * 2 + 4)  # bf16 output + lse

    def stored(plan) -> int:
        terms = plan.memory.moments["end of forward"]
        return next(t.bytes for t in terms if t.name.startswith("checkpointed layer inputs"))

    assert stored(kept) - stored(full) == extra
    assert kept.memory.peak_bytes - full.memory.peak_bytes >= extra  # + the allocator's slack


def test_a_run_trains_with_kept_attention(tiny_models, write_recipe) -> None:
    """The context function travels through TrainingArguments into the Trainer's checkpointing."""
    from pi_lora.run.directory import RunDir
    from pi_lora.train.assembly import train

    recipe = load_recipe(write_recipe(tiny_models("llama"), training={
        "max_steps": 2, "recompute_attention": False, "gradient_checkpointing": True}))
    with _CountAttention() as counter:
        run = train(recipe)
    assert RunDir(run).read_facts().status == "complete"
    # 2 layers x 2 steps x batch 1: forward only, nothing recomputed
    assert counter.calls == 2 * 2, counter.calls


@pytest.mark.parametrize("overrides", [["training.gradient_checkpointing=false"],
                                       ["model.attn_implementation=eager"]])
def test_kept_attention_without_its_kernel_is_refused(overrides: list[str]) -> None:
    from pi_lora.core.errors import PiLoraError

    with pytest.raises(PiLoraError, match="recompute_attention"):
        load_recipe(REPO / "recipes/llama2-7b-16k.yaml",
                    ["training.recompute_attention=false", *overrides])
