"""FLOPs of one optimizer step and the time they take at an assumed utilisation.

Executed FLOPs per token (what the GPU runs, so recompute counts):
- frozen base: 2N forward + 2N backward (gradients of the activations only: LoRA needs no
  weight gradients of the frozen matrices) = 4N, where N = parameters a token multiplies
  through (input embedding lookup excluded, lm_head included);
- trainable (LoRA + extras): +2 N_trainable for their weight gradients;
- checkpointing: +2 N_layers, the decoder layers' forward runs twice;
- tiled MLP (ALST): +2 N_mlp, each MLP's forward runs again, tile by tile, in backward;
- attention: causal, so a query sees span/2 keys on average (span = T, or the S2-Attn group):
  2 * L * H * d_head * span forward (QK^T and PV), twice that backward, +1 forward recomputed.
The conventional "model FLOPs" 6N + 12*L*D*T per token (full fine-tune, non-causal) is
reported next to it, for comparing with published MFU figures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pi_lora.plan.devices import INTER_NODE_GBPS, Device
from pi_lora.plan.memory import checkpoint_bytes, frozen_weight_bytes, ulysses_kv_dim
from pi_lora.plan.setup import Setup
from pi_lora.plan.shape import ModelShape

SDPA_MFU_FACTOR = 0.75  # torch sdpa's kernels vs FlashAttention-2 at long context
QLORA_MFU_FACTOR = 0.7  # nf4 weights are dequantized before every matmul
FORMULA = ("per token: 4N (frozen base: forward + activation gradients) + 2N_trainable "
           "+ 2N_layers if checkpointing + 2N_mlp if tiled MLP "
           "+ (3 + ckpt) * 2*L*H*d_head*span (causal attention)")


@dataclass
class TimePlan:
    flops_per_token: float  # executed
    model_flops_per_token: float  # 6N + 12*L*D*T convention
    flops_per_step: float  # executed, all devices
    mfu: float
    step_seconds: float
    compute_seconds: float
    communication_seconds: float
    offload_seconds: float
    tokens_per_second: float
    total_seconds: float
    device_hours: float
    all_to_all_seconds: float = 0.0  # sequence parallelism's exchanges, not overlapped
    notes: list[str] = field(default_factory=list)


def flops_per_token(shape: ModelShape, setup: Setup) -> float:
    """Executed FLOPs per trained token (see the module docstring)."""
    n = shape.matmul_params
    layers_n = n - (shape.vocab * shape.hidden)  # the head is not recomputed
    ckpt = 1 if setup.checkpointing else 0
    linear = 4 * n + 2 * shape.trainable_params + 2 * layers_n * ckpt
    if setup.tiled_mlp:  # TiledMLP runs each MLP's forward again in backward
        linear += 2 * 3 * shape.hidden * shape.intermediate * shape.layers
    attention_forward = 2 * shape.layers * shape.heads * shape.head_dim * setup.attention_span
    recompute = ckpt if setup.recompute_attention else 0  # kept attention is not run again
    return linear + (3 + recompute) * attention_forward


def model_flops_per_token(shape: ModelShape, setup: Setup) -> float:
    """6N + 12 L D T; a sliding window W < T caps the attention term at W."""
    reach = setup.seq_len if shape.attention_window is None \
        else min(setup.seq_len, shape.attention_window)
    return 6 * shape.matmul_params + 12 * shape.layers * shape.hidden * reach


def assumed_mfu(setup: Setup, device: Device) -> tuple[float, list[str]]:
    """The utilisation assumption and why."""
    if device.kind == "cpu":
        return 1.0, ["CPU: throughput calibrated on this machine (SmolLM2 8k step)"]
    mfu, notes = device.default_mfu, [f"{device.name}: {device.default_mfu:.0%} MFU assumed "
                                      "with FlashAttention-2"]
    if setup.attn != "flash_attention_2":
        mfu *= SDPA_MFU_FACTOR
        notes.append(f"{setup.attn} attention: x{SDPA_MFU_FACTOR}")
    if setup.quant_bits:
        mfu *= QLORA_MFU_FACTOR
        notes.append(f"{setup.quant_bits}-bit base dequantized per matmul: x{QLORA_MFU_FACTOR}")
    return mfu, notes


def plan_time(shape: ModelShape, setup: Setup, device: Device) -> TimePlan:
    per_token = flops_per_token(shape, setup)
    micro_tokens = setup.local_tokens  # a device's share of the micro-batch
    micro_steps = setup.grad_accum
    mfu, notes = assumed_mfu(setup, device)
    compute = per_token * micro_tokens * micro_steps / (device.peak_tflops * 1e12 * mfu)
    communication = _communication_seconds(shape, setup, device) * micro_steps
    offload = _offload_seconds(shape, setup, device) * micro_steps
    exchange = all_to_all_seconds(shape, setup, device) * micro_steps
    if communication > compute:
        notes.append("ZeRO communication exceeds compute: the step is network-bound")
    step = max(compute, communication) + offload + exchange
    total = step * setup.max_steps
    return TimePlan(
        flops_per_token=per_token, model_flops_per_token=model_flops_per_token(shape, setup),
        flops_per_step=per_token * setup.tokens_per_step, mfu=mfu, step_seconds=step,
        compute_seconds=compute, communication_seconds=communication, offload_seconds=offload,
        all_to_all_seconds=exchange,
        tokens_per_second=setup.tokens_per_step / step, total_seconds=total,
        device_hours=total * setup.world / 3600, notes=notes)


def _link_gbps(setup: Setup, device: Device) -> float:
    return INTER_NODE_GBPS if setup.nodes > 1 else device.intra_node_gbps


def _communication_seconds(shape: ModelShape, setup: Setup, device: Device) -> float:
    """Per micro-step, overlapped with compute: ZeRO-3 gathers the weights for forward,
    recompute and backward; gradients of the trainable parameters are reduced."""
    if setup.world == 1 or device.kind == "cpu":
        return 0.0
    share = (setup.world - 1) / setup.world
    passes = 3 if setup.checkpointing else 2
    gathered = frozen_weight_bytes(shape, setup) * passes if setup.zero_stage == 3 else 0.0
    reduced = 2 * shape.trainable_params * 4
    return (gathered + reduced) * share / (_link_gbps(setup, device) * 1e9)


def all_to_all_bytes(shape: ModelShape, setup: Setup) -> float:
    """Bytes one device sends per micro-step under sequence parallelism (DeepSpeed Ulysses).

    Each layer's forward runs 4 all-to-alls (q, k, v in; the attention output back), each
    sending the (N-1)/N of the device's T/N-token slice that other devices hold heads of; the
    backward runs them again for the gradients (x2), and checkpointing recomputes the forward.
    """
    n = setup.sequence_parallel
    if n == 1:
        return 0.0
    width = 2 * shape.hidden + 2 * ulysses_kv_dim(shape, setup)  # q and output, k and v
    per_layer_forward = setup.local_tokens * width * setup.dtype_bytes * (n - 1) / n
    passes = 3 + (1 if setup.checkpointing else 0)
    return shape.layers * per_layer_forward * passes


def all_to_all_seconds(shape: ModelShape, setup: Setup, device: Device) -> float:
    """Per micro-step, not overlapped: attention waits for its exchange. Within a node over
    the GPU link, across nodes when a group spans them."""
    if device.kind == "cpu" or setup.sequence_parallel == 1:
        return 0.0
    spans_nodes = setup.nodes > 1 and setup.sequence_parallel > setup.gpus_per_node
    gbps = INTER_NODE_GBPS if spans_nodes else device.intra_node_gbps
    return all_to_all_bytes(shape, setup) / (gbps * 1e9)


def _offload_seconds(shape: ModelShape, setup: Setup, device: Device) -> float:
    """Per micro-step, not overlapped (conservative): under ZeRO offload each device pulls its
    weight shard from the host per pass and ships its gradient shard out; offloaded checkpoints
    go out in the forward and come back for the recompute."""
    if device.kind == "cpu":
        return 0.0
    moved = 0.0
    if setup.offload:
        passes = 3 if setup.checkpointing else 2
        moved += (frozen_weight_bytes(shape, setup) * passes + shape.trainable_params * 4) / setup.world
    if setup.offload_checkpoints and setup.checkpointing:
        moved += 2 * checkpoint_bytes(shape, setup)
    return moved / (device.host_link_gbps * 1e9)
