"""Per-device memory of one LoRA training step: every term named, in bytes.

The activation terms follow what autograd saves in a transformers 5 Llama-style decoder layer
wrapped by peft (checked with `torch.autograd.graph.saved_tensors_hooks` in
tests/test_plan.py). The step peak is the largest of four moments:

- end of forward: persistent state + checkpointed layer inputs (or every layer's saved
  activations without checkpointing) + the loss's forward peak;
- loss backward: persistent state + checkpoints + the loss's backward peak (plain loss: the
  [T, V] log-probabilities and their gradients, freed before the decoder's backward starts);
- backward of one layer: persistent state + checkpoints + the gradient of its output + that
  layer's recomputed activations + its gradient temporaries and attention workspace + the
  trainable parameters' gradients;
- optimizer step: persistent state + gradients + AdamW temporaries.

Symbols: B sequences per device, T tokens per sequence, D hidden, F intermediate, V vocab,
L layers, e bytes per element of the model dtype. Under sequence parallelism (N processes per
sequence, DeepSpeed Ulysses) every per-token term counts the device's T/N tokens: outside
attention a device holds its slice, inside it all T tokens of H/N heads (the same bytes), plus
the all-to-all's copies of q, k, v.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pi_lora.plan.devices import GIB, Device
from pi_lora.plan.setup import Setup
from pi_lora.plan.shape import ModelShape

ADAPTER_BYTES = 4  # peft keeps LoRA weights in fp32 when the base is bf16/fp16
EXTRAS_BYTES = 4  # model.wrap_lora keeps trainable extras in fp32 for the optimizer
ADAM_BYTES = 8  # exp_avg + exp_avg_sq, fp32
NF4_BYTES = 0.5 + 4 / 64  # 4 bits + one fp32 absmax per 64-weight block
NF4_DOUBLE_QUANT_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # absmax quantized to 8 bits
INT8_BYTES = 1 + 4 / 4096  # LLM.int8: one fp32 scale per row (rows are >= 4096 wide)
ZERO3_LIVE_LAYERS = 2  # gathered by ZeRO-3 at once: the running layer + the prefetched one

# --- CPU constants, calibrated on this repository's measurements (benchmarks.plan_validation)
# Resident set of a process that has imported torch, transformers, peft and pi-lora and built
# a 2-layer tiny model: measured 455-462 MiB (torch 2.13 CPU, transformers 5.23) across runs.
CPU_RUNTIME_BYTES = 460 * 2**20
# `pi-lora train` fixes glibc's mmap threshold on CPU (pi_lora.core.allocator), so freed activation
# buffers leave the resident set and the peak follows the live tensors; what glibc still keeps
# (small blocks in the heap, freed but not at its top) is a share on top of the transients.
# Without that setting the resident set grows to the sum of several moments' transients
# (measured +42% on a 512-wide model at 2k tokens): the plan does not model it.
CPU_ALLOCATOR_SLACK = 0.03
# Loading a GGUF file: transformers dequantizes tensors to fp32 numpy arrays before the copy in
# the target dtype, so loading peaks above the final weights. Measured on SmolLM2-135M Q4_1:
# load peak 994-998 MiB = runtime + bf16 weights + ~0.5 x (parameters x 4 bytes).
GGUF_LOAD_FP32_SHARE = 0.5

# --- GPU constants (not validated in this repository yet: no GPU was lent)
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # CUDA context + cuBLAS/cuDNN workspaces, outside torch
CUDA_FRAGMENTATION = 0.08  # caching-allocator slack on top of the transient bytes


@dataclass(frozen=True)
class Term:
    name: str
    bytes: int
    note: str


@dataclass
class MemoryPlan:
    """The terms at the peak moment, the peak itself and the verdict against the device."""

    terms: list[Term]
    step_peak_bytes: int
    load_peak_bytes: int
    peak_moment: str
    host_bytes_per_node: int  # ZeRO-3 offload states + offloaded checkpoints
    device_bytes: int
    # every moment's transient terms (the peak's included), so the table can show all of them
    moments: dict[str, list[Term]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.step_peak_bytes, self.load_peak_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.device_bytes

    def allocated_bytes(self, peak_bytes: int) -> int:
        """A peak as torch.cuda.max_memory_allocated sees it: without the terms outside
        torch's allocator (the CUDA context) or reserved but unallocated (fragmentation)."""
        return int(peak_bytes - sum(t.bytes for t in self.terms if t.name in _NOT_ALLOCATED))


# ----------------------------------------------------------------------------- weights


def frozen_weight_bytes(shape: ModelShape, setup: Setup) -> float:
    """Frozen base in the model dtype; decoder linears in nf4/int8 under QLoRA."""
    frozen = shape.frozen_params
    if setup.quant_bits is None:
        return frozen * setup.dtype_bytes
    per = INT8_BYTES if setup.quant_bits == 8 else (
        NF4_DOUBLE_QUANT_BYTES if setup.double_quant else NF4_BYTES)
    quantized = min(shape.quantizable_params, frozen)
    return quantized * per + (frozen - quantized) * setup.dtype_bytes


def _weights_on_device(shape: ModelShape, setup: Setup) -> tuple[float, str]:
    full = frozen_weight_bytes(shape, setup)
    if setup.zero_stage < 3:
        return full, "replicated on every device"
    live = full / shape.layers * ZERO3_LIVE_LAYERS
    if setup.offload:
        return live, f"ZeRO-3 offload: only ~{ZERO3_LIVE_LAYERS} gathered layers on the device"
    return full / setup.world + live, f"ZeRO-3: 1/{setup.world} shard + {ZERO3_LIVE_LAYERS} gathered layers"


def _trainable_terms(shape: ModelShape, setup: Setup) -> list[Term]:
    """LoRA + extras parameters, their gradients and AdamW states, as DeepSpeed lays them out."""
    params = shape.lora_params * ADAPTER_BYTES + shape.extras_params * EXTRAS_BYTES
    n = shape.trainable_params
    if setup.zero_stage == 0:
        return [Term("lora + extras (fp32)", params, "trainable, fp32"),
                Term("optimizer states", n * ADAM_BYTES, "AdamW exp_avg + exp_avg_sq, fp32")]
    # DeepSpeed bf16: the module holds bf16 copies; fp32 master + Adam live in the optimizer
    shard = setup.world
    working = n * setup.dtype_bytes / (shard if setup.zero_stage == 3 else 1)
    states = n * (4 + ADAM_BYTES) / shard
    where = "host (offload)" if setup.offload else f"1/{shard} shard"
    return [Term("lora + extras (bf16 working copy)", working, "DeepSpeed casts the module"),
            Term("fp32 master + optimizer states", 0 if setup.offload else states, where)]


def _gradient_bytes(shape: ModelShape, setup: Setup) -> tuple[float, str]:
    n = shape.trainable_params
    if setup.zero_stage == 0:
        return n * 4, "fp32, one per trainable parameter"
    if setup.offload:
        return n * setup.dtype_bytes / setup.world, "reduced to a shard, then copied to the host"
    return n * 4 / setup.world, f"fp32, ZeRO-{setup.zero_stage}: 1/{setup.world} shard"


# ----------------------------------------------------------------------------- activations


def layer_activation_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    """Bytes autograd saves for one decoder layer per token (checkpointing off)."""
    e, d, f = setup.dtype_bytes, shape.hidden, shape.intermediate
    norms = 2 * (4 * d + 4)  # RMSNorm keeps its fp32-upcast input and 1/rms per norm
    if "norms" in setup.extras:
        norms += 2 * d * e  # the normalized input, for the norm weight's gradient
    attention = e * (2 * shape.head_dim + 2 * d + 2 * shape.kv_dim) + 4 * shape.heads
    mlp = 3 * f * e  # gate output, its activation, up output
    if setup.tiled_mlp:  # TiledMLP saves only its input; backward recomputes tile by tile
        mlp = d * e
    return norms + attention + mlp + _lora_bytes_per_token(shape, setup)


def _lora_bytes_per_token(shape: ModelShape, setup: Setup) -> float:
    """peft casts each adapter's input to fp32; dropout keeps its mask (input dtype on CPU)."""
    features = shape.lora_input_features  # the r-sized outputs (r*4 bytes) are negligible
    if setup.lora_dropout == 0:
        return 0 if setup.dtype_bytes == ADAPTER_BYTES else features * ADAPTER_BYTES
    mask = ADAPTER_BYTES if setup.device_kind == "cpu" else 1  # CUDA keeps a bool mask
    return features * (ADAPTER_BYTES + mask)


def attention_working_bytes(shape: ModelShape, setup: Setup) -> tuple[float, str]:
    """Extra bytes while one layer's attention runs backward (whole micro-batch)."""
    tokens = setup.local_tokens  # under Ulysses: all T tokens of H/N heads, the same bytes
    span = setup.attention_span
    if setup.attn == "eager":
        scores = setup.batch * shape.heads * setup.seq_len * span * (4 + setup.dtype_bytes)
        return scores, f"eager: [B,H,T,{span}] scores fp32 + probabilities"
    grads = tokens * (4 * shape.hidden + 2 * ulysses_kv_dim(shape, setup) * setup.dtype_bytes)
    if setup.s2_attn:
        grads += tokens * (shape.hidden + 2 * shape.kv_dim) * setup.dtype_bytes
        return grads, f"fused kernel per group of {span}; grouped copies of q, k, v"
    return grads, "fused kernel: fp32 dQ accumulator + dK, dV"


def ulysses_kv_dim(shape: ModelShape, setup: Setup) -> int:
    """Key/value width after Ulysses' exchange: with fewer KV heads than processes each KV
    head is repeated to N/kv_heads copies before the all-to-all."""
    return shape.kv_dim * max(1, setup.sequence_parallel // shape.kv_heads)


def _ulysses_terms(shape: ModelShape, setup: Setup) -> list[Term]:
    """The all-to-all's send and receive copies of q, k, v (forward) or of their gradients
    (backward) while one layer's attention runs: the same bytes as the local slice's."""
    if setup.sequence_parallel == 1:
        return []
    width = shape.hidden + 2 * ulysses_kv_dim(shape, setup)
    return [Term("Ulysses all-to-all buffers", 2 * setup.local_tokens * width * setup.dtype_bytes,
                 f"q, k, v sent and received: T/{setup.sequence_parallel} x "
                 f"(D + 2 kv) x 2 copies")]


def layer_gradient_bytes(shape: ModelShape, setup: Setup) -> float:
    """Gradient temporaries while one layer runs backward (MLP grads dominate). A tiled MLP
    holds one tile's intermediates and their gradients instead (tiles of ~D tokens per row)."""
    tokens, e = setup.local_tokens, setup.dtype_bytes
    if not setup.tiled_mlp:
        return tokens * e * (3 * shape.intermediate + 2 * shape.hidden)
    tile = min(tokens, setup.batch * shape.hidden)
    return tokens * e * 2 * shape.hidden + tile * e * 6 * shape.intermediate


# ----------------------------------------------------------------------------- loss


def loss_bytes(shape: ModelShape, setup: Setup) -> tuple[float, float, str]:
    """(forward peak, backward peak, note) of lm_head + cross-entropy for the micro-batch."""
    tokens, v, e = setup.local_tokens, shape.vocab, setup.dtype_bytes
    if not setup.chunked_loss:
        upcast = 4 if e < 4 else 0  # transformers upcasts half-precision logits to fp32
        forward = tokens * v * (e + upcast + 4)  # logits, fp32 copy, log-softmax output
        backward = tokens * v * (4 + 4 + 4 + (e if e < 4 else 0))  # saved, grad in, grad out
        if shape.head_trainable:  # tied to trained embeddings: its gradient is made here
            backward += v * shape.hidden * 4
        return forward, backward, f"plain: [B*T, V] logits, {tokens:,} x {v:,}"
    chunk = min(setup.chunk_tokens, tokens)
    # fp32 logits + logsumexp's two fp32 temporaries (x - max, exp) on the chunk
    working = chunk * v * 12
    stored = tokens * shape.hidden * e  # d loss / d hidden, computed during forward
    if shape.head_trainable:
        stored += shape.vocab * shape.hidden * 4  # head weight gradient, fp32 accumulator
    note = f"chunked: {chunk} tokens x {v:,} at a time, no [T, V] logits"
    if setup.device_kind == "cpu" and e < 4:
        # pi_lora.train.loss runs the head matmuls in fp32 on CPU: an fp32 copy of the head weight
        # lives for the loss's forward (where the gradients are computed too)
        working += v * shape.hidden * 4 + chunk * shape.hidden * 4
        note += "; fp32 head copy on CPU"
    return stored + working, stored, note


# ----------------------------------------------------------------------------- assembly


def plan_memory(shape: ModelShape, setup: Setup, device: Device) -> MemoryPlan:
    """Terms at the peak moment of a step, and the verdict against `device`."""
    tokens = setup.local_tokens
    e = setup.dtype_bytes
    weights, weights_note = _weights_on_device(shape, setup)
    persistent = [Term(f"weights ({_weights_format(setup)})", weights, weights_note),
                  *_trainable_terms(shape, setup)]
    per_layer = layer_activation_bytes_per_token(shape, setup) * tokens
    if setup.checkpointing:
        sliced = "T" if setup.sequence_parallel == 1 else f"T/{setup.sequence_parallel}"
        stored = Term("checkpointed layer inputs", checkpoint_bytes(shape, setup),
                      f"L x B x {sliced} x D x {e} bytes")
        if setup.offload_checkpoints:  # one layer's input is back on the device at a time
            stored = Term("checkpointed layer inputs (offloaded)", tokens * shape.hidden * e,
                          f"host keeps L x B x T x D x {e}; one layer's copy on the device")
        if not setup.recompute_attention:
            stored = Term(stored.name + " + kept attention outputs",
                          int(stored.bytes + kept_attention_bytes(shape, setup)),
                          stored.note + f"; + L x B x T x (H x hd x {e} + H x 4) kept attention")
    else:
        stored = Term("saved activations (no checkpointing)", shape.layers * per_layer,
                      "every layer keeps what autograd saved")
    loss_forward, loss_backward, loss_note = loss_bytes(shape, setup)
    grads, grads_note = _gradient_bytes(shape, setup)
    attention, attention_note = attention_working_bytes(shape, setup)
    moments = {
        "end of forward": [stored, Term("logits / loss (forward)", loss_forward, loss_note)],
        "loss backward": [stored, Term("logits / loss (backward)", loss_backward, loss_note)],
        "backward of the last layer": [
            stored,
            Term("gradient of the hidden states", tokens * shape.hidden * e,
                 "what the loss hands to the last layer; the loss's own buffers are freed"),
            Term("recompute working set (1 layer)" if setup.checkpointing
                 else "layer gradient temporaries",
                 (per_layer if setup.checkpointing else 0) + layer_gradient_bytes(shape, setup),
                 "one layer's saved activations + its gradient temporaries"),
            Term("attention workspace", attention, attention_note),
            *_ulysses_terms(shape, setup),
            Term("gradients", grads, grads_note)],
        "optimizer step": [Term("gradients", grads, grads_note),
                           Term("AdamW temporaries", shape.trainable_params * 8,
                                "sqrt and division buffers, fp32 (single-tensor path)")],
    }
    moment, transient = max(moments.items(), key=lambda item: _total(item[1]))
    overhead = _overhead(device, _total(transient))
    terms = persistent + transient + overhead
    return MemoryPlan(
        terms=terms, step_peak_bytes=int(_total(terms)),
        load_peak_bytes=_load_peak(shape, setup, device, persistent), peak_moment=moment,
        host_bytes_per_node=_host_bytes(shape, setup), device_bytes=device.memory_bytes,
        moments=moments)


def _total(terms: list[Term]) -> float:
    return sum(t.bytes for t in terms)


def _weights_format(setup: Setup) -> str:
    if setup.quant_bits == 4:
        return "nf4 + bf16 embeddings/head"
    if setup.quant_bits == 8:
        return "int8 + bf16 embeddings/head"
    return {2: "bf16", 4: "fp32"}[setup.dtype_bytes]


_NOT_ALLOCATED = ("CUDA context", "allocator fragmentation")  # the GPU terms of _overhead


def _overhead(device: Device, transient: float) -> list[Term]:
    if device.kind == "cpu":
        return [Term("python/torch runtime", CPU_RUNTIME_BYTES, "calibrated constant (CPU)"),
                Term("allocator slack", transient * CPU_ALLOCATOR_SLACK,
                     f"{CPU_ALLOCATOR_SLACK:.0%} of the transient bytes; glibc with "
                     "pi-lora's fixed mmap threshold (pi_lora.core.allocator)")]
    return [Term("CUDA context", CUDA_CONTEXT_BYTES, "outside torch's allocator"),
            Term("allocator fragmentation", transient * CUDA_FRAGMENTATION,
                 f"{CUDA_FRAGMENTATION:.0%} of the transient bytes")]


def _load_peak(shape: ModelShape, setup: Setup, device: Device, persistent: list[Term]) -> int:
    """CPU only: loading can peak above the step (GGUF files are dequantized through fp32)."""
    if device.kind != "cpu" or not setup.gguf:
        return 0
    fp32_copy = shape.total_params * 4 * GGUF_LOAD_FP32_SHARE
    return int(CPU_RUNTIME_BYTES + _total(persistent[:1]) + fp32_copy)


def _host_bytes(shape: ModelShape, setup: Setup) -> int:
    """Host RAM per node: ZeRO-3 offload (bf16 weights + fp32 master, Adam and gradients)
    and offloaded checkpoints (every device's layer inputs, pinned)."""
    total = 0.0
    if setup.offload:
        per_node = 1 / setup.nodes
        weights = frozen_weight_bytes(shape, setup) * per_node
        total += weights + shape.trainable_params * (4 + ADAM_BYTES + 4) * per_node
    if setup.offload_checkpoints and setup.checkpointing:
        total += checkpoint_bytes(shape, setup) * setup.gpus_per_node
    return int(total)


def kept_attention_bytes(shape: ModelShape, setup: Setup) -> float:
    """training.recompute_attention false: every layer's attention output and softmax
    log-sum-exp (fp32) stay from forward to backward (pi_lora/train/recompute.py)."""
    tokens = setup.local_tokens
    return shape.layers * tokens * shape.heads * (shape.head_dim * setup.dtype_bytes + 4)


def checkpoint_bytes(shape: ModelShape, setup: Setup) -> float:
    """The checkpointed layer inputs of one device: L x B x T x D x e (T/N per device
    under sequence parallelism)."""
    return shape.layers * setup.local_tokens * shape.hidden * setup.dtype_bytes
