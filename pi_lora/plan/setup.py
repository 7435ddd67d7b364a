"""The launch as the planner sees it: recipe settings that move memory or time, plus the world."""

from __future__ import annotations

from dataclasses import dataclass

from pi_lora.core.errors import PiLoraError
from pi_lora.recipe.loading import Recipe, resolve_deepspeed_config
from pi_lora.train.distributed import load_deepspeed_config, offload_sections, zero_stage
from pi_lora.train.sequence_parallel import data_parallel_size

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class Setup:
    """Everything but the model shape that decides a step's memory and time."""

    seq_len: int
    batch: int  # sequences per device per micro-step
    grad_accum: int
    max_steps: int
    gpus_per_node: int
    nodes: int
    zero_stage: int  # 0 = no DeepSpeed
    offload: bool
    checkpointing: bool
    offload_checkpoints: bool  # checkpointed layer inputs in pinned host memory (GPU)
    chunked_loss: bool
    chunk_tokens: int
    s2_attn: bool
    group_fraction: float
    attn: str
    dtype_bytes: int
    quant_bits: int | None
    double_quant: bool
    lora_dropout: float
    extras: tuple[str, ...]
    device_kind: str  # "gpu" or "cpu"
    gguf: bool  # weights come from a GGUF file (dequantized while loading)
    sequence_parallel: int = 1  # processes sharing each sequence (DeepSpeed Ulysses)
    tiled_mlp: bool = False  # ALST's TiledMLP: no [T, F] intermediates saved
    recompute_attention: bool = True  # False: attention outputs kept through checkpointing

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def groups(self) -> int:
        """Data-parallel groups: the processes, or groups of sequence_parallel of them."""
        return self.world // self.sequence_parallel

    @property
    def local_tokens(self) -> int:
        """Tokens whose activations one device holds per micro-step: B x T, or its 1/N
        slice under sequence parallelism."""
        return self.batch * self.seq_len // self.sequence_parallel

    @property
    def global_batch(self) -> int:
        return self.batch * self.grad_accum * self.groups

    @property
    def attention_span(self) -> int:
        """Keys each query attends to at most: the sequence, or the S2-Attn group."""
        if not self.s2_attn:
            return self.seq_len
        return max(2, round(self.seq_len * self.group_fraction))

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.global_batch


def setup_from_recipe(recipe: Recipe, *, gpus: int, nodes: int, device_kind: str) -> Setup:
    t, m = recipe.training, recipe.model
    stage, offload = deepspeed_stage(t.deepspeed)
    quant = m.quantization
    groups = data_parallel_size(t, gpus * nodes)
    return Setup(
        seq_len=recipe.seq_len, batch=t.per_device_batch_size,
        grad_accum=t.accumulation_steps(groups), max_steps=t.max_steps,
        gpus_per_node=gpus, nodes=nodes, zero_stage=stage, offload=offload,
        checkpointing=t.gradient_checkpointing, offload_checkpoints=t.offload_checkpoints,
        chunked_loss=t.chunked_loss,
        chunk_tokens=t.loss_chunk_tokens, s2_attn=t.s2_attn, group_fraction=t.s2_group_fraction,
        attn=m.attn_implementation, dtype_bytes=DTYPE_BYTES[m.dtype],
        quant_bits=quant.bits if quant else None, double_quant=bool(quant and quant.double_quant),
        lora_dropout=recipe.lora.dropout, extras=tuple(recipe.lora.trainable_extras),
        device_kind=device_kind, gguf=bool(m.gguf_file or m.name.endswith(".gguf")),
        sequence_parallel=t.sequence_parallel, tiled_mlp=t.tiled_mlp,
        recompute_attention=t.recompute_attention,
    )


def deepspeed_stage(value: str | None) -> tuple[int, bool]:
    """(ZeRO stage, offload) of a shipped name or a JSON file; (0, False) without DeepSpeed."""
    if value is None:
        return 0, False
    path = resolve_deepspeed_config(value)
    if path is None:
        raise PiLoraError(f"{value} is neither a shipped config nor a file",
                          field="training.deepspeed", fix="zero2 | zero3 | zero3_offload | a path")
    config = load_deepspeed_config(path)
    return zero_stage(config), bool(offload_sections(config))
