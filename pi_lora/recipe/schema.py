"""The recipe schema: typed sections where every default lives (pydantic, extra keys are
errors). Loading, inheritance, overrides and cross-section checks are pi_lora.recipe.loading's."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field

from pi_lora.core.errors import PiLoraError

DType = Literal["bf16", "fp16", "fp32"]
RopeMethod = Literal["linear", "ntk", "dynamic", "yarn", "llama3", "longrope", "none"]
# the methods that extend the window (every RopeMethod but "none"): the one list of them
SCALING_METHODS: tuple[str, ...] = tuple(m for m in get_args(RopeMethod) if m != "none")
Extra = Literal["embeddings", "norms", "lm_head"]
# package data (the repository's top-level deepspeed_configs/ links here), so a wheel has them
SHIPPED_DEEPSPEED_DIR = Path(__file__).resolve().parents[1] / "deepspeed_configs"


# Every number a recipe holds is finite and bounded: an infinite learning rate or a dropout
# of 1.5 is a validation error here, not a NaN loss or a hang hours into a run.
MAX_CONTEXT = 1 << 25  # tokens (32M): beyond any model's window
MAX_COUNT = 2**31 - 1  # steps, sequences: what int32 counters and schedulers hold
Tokens = Annotated[int, Field(ge=1, le=MAX_CONTEXT)]
Count = Annotated[int, Field(ge=1, le=MAX_COUNT)]
NonNegativeCount = Annotated[int, Field(ge=0, le=MAX_COUNT)]
TokenBudget = Annotated[int, Field(ge=1, le=10**15)]  # tokens read in all
Name = Annotated[str, Field(min_length=1)]  # an empty name or path would mean something else
PositiveFactor = Annotated[float, Field(gt=0.0, le=1e6)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class QuantizationSection(_Section):
    """bitsandbytes quantization of the frozen base (QLoRA)."""

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class ModelSection(_Section):
    name: str = Field(min_length=1, description="hub id, local directory, or directory holding `gguf_file`")
    gguf_file: str | None = None
    revision: str | None = None
    tokenizer: str | None = Field(None, description="defaults to `name`")
    dtype: DType = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    quantization: QuantizationSection | None = None
    sliding_window: Tokens | Literal["none"] | None = Field(
        None, description="tokens each layer attends back: unset keeps the model's, `none` "
                          "attends over the whole (extended) context")


class YarnOptions(_Section):
    beta_fast: PositiveFactor = 32.0
    beta_slow: PositiveFactor = 1.0
    attention_factor: PositiveFactor | None = None


class Llama3Options(_Section):
    low_freq_factor: PositiveFactor = 1.0
    high_freq_factor: PositiveFactor = 4.0


class LongropeOptions(_Section):
    """Per-frequency factors: a `pi-lora search` result file, or the lists themselves."""

    factors: str | None = Field(None, description="factors.json written by `pi-lora search`")
    long_factor: list[float] | None = Field(None, description="one per rotary pair, >= 1, "
                                                               "non-decreasing")
    short_factor: list[float] | None = Field(None, description="within the original window; "
                                                                "default 1.0 each")
    attention_factor: PositiveFactor | None = None


class RopeSection(_Section):
    method: RopeMethod
    target_context: Tokens
    original_context: Tokens | None = Field(
        None, description="pretraining window; read from the model config when omitted"
    )
    yarn: YarnOptions = YarnOptions()
    llama3: Llama3Options = Llama3Options()
    longrope: LongropeOptions = LongropeOptions()


class LoraSection(_Section):
    r: int = Field(8, ge=1, le=65536)
    alpha: PositiveFactor = 16.0
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[Name] | None = Field(None, min_length=1,
                                               description="per-architecture default")
    trainable_extras: list[Extra] = Field(
        default_factory=list, description="LongLoRA 'LoRA+': also train embeddings / norms"
    )


class DatasetSource(_Section):
    """A split of a hub dataset: a recipe's training data, and `pi-lora eval`'s documents."""

    name: Name
    config: str | None = None
    split: Name = "train"
    revision: str | None = None


class LengthMix(_Section):
    """A share of training sequences cut at a shorter length (keeps short-range skills)."""

    seq_len: Tokens
    fraction: float = Field(gt=0.0, lt=1.0)


class PoseOptions(_Section):
    """PoSE: positions skip ahead inside each training row, so a short row teaches the
    whole target window (Zhu et al. 2024); needs data.seq_len below rope.target_context."""

    chunks: Annotated[int, Field(ge=2, le=64)] = Field(
        2, description="pieces per row, at least 2 (one piece has no skip: it would train "
                       "only positions below seq_len); the paper uses 2")


class InstructionFields(_Section):
    """Columns of alpaca-style instruction data (LongAlpaca ships this way)."""

    instruction: Name = "instruction"
    input: Name = "input"
    output: Name = "output"


class DataSection(_Section):
    files: list[str] = Field(default_factory=list, description=".txt, .jsonl/.json, .parquet")
    dataset: DatasetSource | None = None
    format: Literal["pretrain", "chat", "instruction"] = Field(
        "pretrain", description="pretrain: concatenate + chunk; chat: `messages` with loss on the "
                                "assistant turns; instruction: alpaca-style columns, as chat")
    text_field: Name = "text"
    messages_field: Name = "messages"
    instruction_fields: InstructionFields = InstructionFields()
    num_proc: Annotated[int, Field(ge=1, le=1024)] | None = Field(
        None, description="tokenizer processes; default one per core (up to 16) for large data")
    streaming: bool = Field(
        False, description="read files / the hub dataset as a stream, tokenized and packed on "
                           "the fly, nothing cached (data too large to download or copy)")
    seq_len: Tokens | None = Field(None, description="defaults to rope.target_context")
    short_mix: LengthMix | None = None
    pose: PoseOptions | None = Field(
        None, description="positional skip-wise training: rows of seq_len, positions up to "
                          "rope.target_context (pretrain text)")
    max_tokens: TokenBudget | None = Field(None, description="stop reading after this many")
    validation_sequences: NonNegativeCount = Field(
        0, description="sequences held out of training; their loss is logged every eval_steps")
    cache_dir: str | None = None


class TrainingSection(_Section):
    max_steps: Count = 1000
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0)
    warmup_steps: NonNegativeCount = 20
    lr_scheduler: Literal["constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    adam_beta1: float = Field(0.9, gt=0.0, lt=1.0)
    adam_beta2: float = Field(0.95, gt=0.0, lt=1.0)
    max_grad_norm: float = Field(1.0, ge=0.0, le=1e6)
    per_device_batch_size: Annotated[int, Field(ge=1, le=1 << 20)] = 1
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=1 << 20)] = 1
    global_batch_size: Annotated[int, Field(ge=1, le=1 << 30)] | None = Field(
        None, description="sequences per optimizer step over all processes; accumulation is "
                          "derived from the process count (instead of gradient_accumulation_steps)")
    gradient_checkpointing: bool = True
    offload_checkpoints: bool = Field(
        False, description="GPU only: keep the checkpointed layer inputs in pinned host memory")
    recompute_attention: bool = Field(
        True, description="with checkpointing: false keeps each layer's attention output "
                          "(+ seq_len x hidden x dtype bytes per layer) so backward does not "
                          "run attention again; less compute at long context")
    precision: DType = "bf16"
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy's seed range
    save_steps: Count = 100
    eval_steps: Count | None = Field(
        None, description="loss on data.validation_sequences every N steps; default save_steps")
    save_total_limit: Count | None = 2
    save_on_each_node: bool = Field(
        False, description="multi-node without shared storage: each node keeps its own run "
                           "directory and checkpoints, so every node can resume")
    logging_steps: Count = 1
    deepspeed: str | None = Field(None, description="zero2 | zero3 | zero3_offload | a json path")
    report_to: Literal["auto", "none", "tensorboard", "wandb"] = "auto"
    chunked_loss: bool = True
    loss_chunk_tokens: Tokens = Field(
        256, description="tokens per lm_head + cross-entropy chunk: chunk x vocab x 12 bytes "
                         "transient (256 x 49k vocab: 0.15 GB); 1024 cost 0.35 GB more on "
                         "SmolLM2 and was no faster")
    s2_attn: bool = False
    s2_group_fraction: float = Field(0.25, gt=0.0, le=1.0)
    sequence_parallel: Annotated[int, Field(ge=1, le=1024)] = Field(
        1, description="processes that share one sequence (DeepSpeed Ulysses): each holds "
                       "1/N of its tokens; needs training.deepspeed, heads divisible by N")
    tiled_mlp: bool = Field(
        False, description="ALST's tiled MLP: each layer's MLP runs over row tiles of about "
                           "hidden-size tokens and is recomputed in backward (no [T, F] saved)")


    def accumulation_steps(self, processes: int) -> int:
        """Micro-steps per optimizer step on `processes` data-parallel processes."""
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_micro_step = self.per_device_batch_size * processes
        if self.global_batch_size % per_micro_step:
            raise PiLoraError(
                f"global batch {self.global_batch_size} is not a multiple of {per_micro_step} "
                f"({self.per_device_batch_size} per device x {processes} processes)",
                field="training.global_batch_size",
                fix="choose a global batch divisible by per_device_batch_size x processes")
        return self.global_batch_size // per_micro_step

    def global_batch(self, processes: int) -> int:
        return self.per_device_batch_size * processes * self.accumulation_steps(processes)


def training_length(data: DataSection | None, rope: RopeSection | None) -> int | None:
    """data.seq_len, defaulting to rope.target_context: the one home of that default (None
    while neither section is valid yet, in the cross-section checks)."""
    return (data.seq_len if data is not None else None) or (
        rope.target_context if rope is not None else None)


class Recipe(_Section):
    model: ModelSection
    rope: RopeSection
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    training: TrainingSection = TrainingSection()
    output_dir: Name

    @property
    def seq_len(self) -> int:
        """Training sequence length: the target window unless the recipe says otherwise."""
        return training_length(self.data, self.rope)  # type: ignore[return-value]

    def to_yaml(self) -> str:
        """Every setting, as a file that loads back to the same recipe (the run's copy)."""
        dumped = self.model_dump(mode="json")
        if self.training.global_batch_size is not None:  # accumulation follows from it
            del dumped["training"]["gradient_accumulation_steps"]
        return yaml.safe_dump(dumped, sort_keys=False)

    def with_absolute_paths(self) -> Recipe:
        """Local paths made absolute (hub ids and shipped names left alone), so the copy a
        run directory keeps works from any directory: `pi-lora merge RUN` from elsewhere."""
        model, data, training = self.model, self.data, self.training
        updates = {
            "model": model.model_copy(update={"name": _absolute_if_local(model.name),
                                              "tokenizer": _absolute_if_local(model.tokenizer)}),
            "data": data.model_copy(update={
                "files": [_absolute(f) for f in data.files],
                "cache_dir": _absolute(data.cache_dir) if data.cache_dir else None,
                "dataset": data.dataset and data.dataset.model_copy(
                    update={"name": _absolute_if_local(data.dataset.name)})}),
            "training": training.model_copy(
                update={"deepspeed": _absolute_if_local(training.deepspeed)}),
            "rope": self.rope.model_copy(update={"longrope": self.rope.longrope.model_copy(
                update={"factors": _absolute_if_local(self.rope.longrope.factors)})}),
        }
        return self.model_copy(update=updates)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _absolute_if_local(value: str | None) -> str | None:
    """A path that exists here becomes absolute; anything else (a hub id) is kept."""
    if value is None or not os.path.exists(os.path.expanduser(value)):
        return value
    return _absolute(value)
