"""chunked_lm_loss / causal_lm_loss against transformers' own loss on tiny models."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from pi_lora.testing import tiny_config
from pi_lora.train.loss import causal_lm_loss, chunked_lm_loss

VOCAB = 512
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def tiny_llama(tied: bool = False, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=VOCAB, max_positions=256, tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype)


def batch(length: int = 45, size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens; labels with masked spans (a prompt and a padded tail)."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (size, length), generator=generator)
    labels = input_ids.clone()
    labels[0, :7] = -100
    labels[1, 20:31] = -100
    labels[1, -3:] = -100
    return input_ids, labels


def run_loss(model, use_chunked: bool, chunk_tokens: int, num_items=None) -> dict:
    """Loss plus gradients of trainable parameters and of the final hidden states."""
    model.zero_grad(set_to_none=True)
    captured = {}

    def keep_hidden(_module, _args, output):
        output.last_hidden_state.retain_grad()
        captured["hidden"] = output.last_hidden_state

    decoder = model.get_base_model() if hasattr(model, "get_base_model") else model
    handle = decoder.get_decoder().register_forward_hook(keep_hidden)
    input_ids, labels = batch()
    try:
        if use_chunked:
            loss = causal_lm_loss(
                model, input_ids, labels, num_items_in_batch=num_items, chunk_tokens=chunk_tokens
            )
        else:
            loss = model(input_ids, labels=labels, num_items_in_batch=num_items).loss
        loss.backward()
    finally:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"loss": loss.detach(), "hidden": captured["hidden"].grad.clone(), "params": grads}


def assert_close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    scale = b.float().abs().max().clamp_min(1e-12)
    assert (a.float() - b.float()).abs().max() <= tol * scale, (a, b)


def assert_same_results(model, dtype, chunk_tokens=16, num_items=None) -> None:
    ours = run_loss(model, True, chunk_tokens, num_items)
    plain = run_loss(model, False, chunk_tokens, num_items)
    assert ours["loss"].dtype == torch.float32
    assert_close(ours["loss"], plain["loss"], dtype)
    assert_close(ours["hidden"], plain["hidden"], dtype)
    assert ours["params"].keys() == plain["params"].keys()
    for name, grad in plain["params"].items():
        assert_close(ours["params"][name], grad, dtype)


@pytest.mark.parametrize(
    ("dtype", "tied", "chunk_tokens"),
    [
        (torch.float32, False, 7),  # 7 does not divide the 2 x 45 tokens
        (torch.float32, True, 1024),  # one chunk for everything
        (torch.bfloat16, False, 1024),
        (torch.bfloat16, True, 7),
    ],
)
def test_full_finetune_matches_plain_loss(dtype, tied, chunk_tokens):
    model = tiny_llama(tied=tied, dtype=dtype)
    assert model.get_output_embeddings().weight.requires_grad
    assert_same_results(model, dtype, chunk_tokens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_matches_plain_loss(dtype):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(tiny_llama(dtype=dtype), config)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    assert_same_results(model, dtype, chunk_tokens=13)


def test_num_items_in_batch_matches_plain_loss():
    model = tiny_llama()
    assert_same_results(model, torch.float32, chunk_tokens=10, num_items=torch.tensor(123))


def test_lora_on_lm_head_is_refused():
    config = LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    model = get_peft_model(tiny_llama(), config)
    input_ids, labels = batch()
    with pytest.raises(TypeError, match=r"plain nn\.Linear lm_head"):
        causal_lm_loss(model, input_ids, labels)


def test_softcap_and_bias_match_reference():
    torch.manual_seed(0)
    hidden = torch.randn(2, 19, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(30, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(30, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 30, (2, 19))
    labels[0, 3:6] = -100
    ours = chunked_lm_loss(hidden, weight, labels, chunk_tokens=5, bias=bias, logit_softcap=2.0)
    got = torch.autograd.grad(ours, (hidden, weight, bias))
    logits = torch.tanh(torch.nn.functional.linear(hidden, weight, bias) / 2.0) * 2.0
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 30), targets.reshape(-1))
    expected = torch.autograd.grad(reference, (hidden, weight, bias))
    torch.testing.assert_close(ours.double(), reference, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def saved_tensor_sizes(compute_loss) -> list[int]:
    """numel of every tensor autograd saves for backward while building the loss."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute_loss()
    return sizes


def test_no_logits_tensor_is_kept_for_backward():
    length, dim, vocab = 512, 8, 4096
    hidden = torch.randn(1, length, dim, requires_grad=True)
    weight = torch.randn(vocab, dim, requires_grad=True)
    labels = torch.randint(0, vocab, (1, length))

    def plain():
        logits = hidden @ weight.t()
        targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1))

    assert max(saved_tensor_sizes(plain)) >= length * vocab  # the control does keep logits
    ours = saved_tensor_sizes(lambda: chunked_lm_loss(hidden, weight, labels, chunk_tokens=64))
    # Only grad_hidden [T, D] and grad_weight [V, D] are kept: O((T + V) * D), not O(T * V).
    assert sum(ours) <= (length + vocab) * dim


def test_model_loss_keeps_no_logits_tensor():
    model = tiny_llama()
    input_ids, labels = batch(length=128)
    ours = saved_tensor_sizes(lambda: causal_lm_loss(model, input_ids, labels, chunk_tokens=32))
    plain = saved_tensor_sizes(lambda: model(input_ids, labels=labels).loss)
    logits_numel = input_ids.numel() * VOCAB
    assert max(plain) >= logits_numel
    # The largest kept tensor is the head-weight gradient [V, D], far below B * T * V.
    assert max(ours) <= VOCAB * model.config.hidden_size < logits_numel


def test_bf16_checkpointed_step_keeps_no_extra_fp32_hidden_states():
    """Between forward and backward a bf16 LoRA model with checkpointing keeps its layer inputs
    (bf16), the loss's d loss / d hidden (bf16) and the final norm's own fp32 input: one
    full-length fp32 [B, T, D] tensor, not one per layer or per chunk."""
    model = tiny_llama(dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).train()
    input_ids = torch.randint(0, VOCAB, (1, 128), generator=torch.Generator().manual_seed(1))
    labels = input_ids
    full = input_ids.numel() * model.config.hidden_size
    storages: dict[tuple[torch.dtype, int], int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() == full:
            storages[(tensor.dtype, tensor.untyped_storage().data_ptr())] = tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        causal_lm_loss(model, input_ids, labels, chunk_tokens=32)
    kinds = [dtype for dtype, _ in storages]
    assert kinds.count(torch.float32) == 1, storages  # the final RMSNorm's upcast input
    # the layer inputs + the gradient the loss hands to the last layer
    assert kinds.count(torch.bfloat16) == model.config.num_hidden_layers + 1, storages
