"""The recipe: a typed, validated description of one context-extension run.

YAML becomes `Recipe` here and nowhere else. Every default lives in this file. Teams share
a base through `extends:` (deep merge, child wins) and tweak a run with `--set a.b=value`.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
)

from pi_lora.errors import PiLoraError, RecipeErrors

DType = Literal["bf16", "fp16", "fp32"]
RopeMethod = Literal["linear", "ntk", "dynamic", "yarn", "llama3", "none"]
# the methods that extend the window (every RopeMethod but "none"): the one list of them
SCALING_METHODS: tuple[str, ...] = tuple(m for m in get_args(RopeMethod) if m != "none")
Extra = Literal["embeddings", "norms", "lm_head"]
# package data (the repository's top-level deepspeed_configs/ links here), so a wheel has them
SHIPPED_DEEPSPEED_DIR = Path(__file__).resolve().parent / "deepspeed_configs"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class QuantizationSection(_Section):
    """bitsandbytes quantization of the frozen base (QLoRA)."""

    bits: Literal[4, 8]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class ModelSection(_Section):
    name: str = Field(description="hub id, local directory, or directory holding `gguf_file`")
    gguf_file: str | None = None
    revision: str | None = None
    tokenizer: str | None = Field(None, description="defaults to `name`")
    dtype: DType = "bf16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    trust_remote_code: bool = False
    quantization: QuantizationSection | None = None


class YarnOptions(_Section):
    beta_fast: PositiveFloat = 32.0
    beta_slow: PositiveFloat = 1.0
    attention_factor: PositiveFloat | None = None


class Llama3Options(_Section):
    low_freq_factor: PositiveFloat = 1.0
    high_freq_factor: PositiveFloat = 4.0


class RopeSection(_Section):
    method: RopeMethod
    target_context: PositiveInt
    original_context: PositiveInt | None = Field(
        None, description="pretraining window; read from the model config when omitted"
    )
    yarn: YarnOptions = YarnOptions()
    llama3: Llama3Options = Llama3Options()


class LoraSection(_Section):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: NonNegativeFloat = 0.05
    target_modules: list[str] | None = Field(None, description="per-architecture default")
    trainable_extras: list[Extra] = Field(
        default_factory=list, description="LongLoRA 'LoRA+': also train embeddings / norms"
    )


class DatasetSource(_Section):
    """A split of a hub dataset: a recipe's training data, and `pi-lora eval`'s documents."""

    name: str
    config: str | None = None
    split: str = "train"
    revision: str | None = None


class LengthMix(_Section):
    """A share of training sequences cut at a shorter length (keeps short-range skills)."""

    seq_len: PositiveInt
    fraction: float = Field(gt=0.0, lt=1.0)


class InstructionFields(_Section):
    """Columns of alpaca-style instruction data (LongAlpaca ships this way)."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"


class DataSection(_Section):
    files: list[str] = Field(default_factory=list, description=".txt, .jsonl/.json, .parquet")
    dataset: DatasetSource | None = None
    format: Literal["pretrain", "chat", "instruction"] = Field(
        "pretrain", description="pretrain: concatenate + chunk; chat: `messages` with loss on the "
                                "assistant turns; instruction: alpaca-style columns, as chat")
    text_field: str = "text"
    messages_field: str = "messages"
    instruction_fields: InstructionFields = InstructionFields()
    num_proc: PositiveInt | None = Field(
        None, description="tokenizer processes; default one per core (up to 16) for large data")
    streaming: bool = Field(
        False, description="read files / the hub dataset as a stream, tokenized and packed on "
                           "the fly, nothing cached (data too large to download or copy)")
    seq_len: PositiveInt | None = Field(None, description="defaults to rope.target_context")
    short_mix: LengthMix | None = None
    max_tokens: PositiveInt | None = Field(None, description="stop reading after this many")
    validation_sequences: NonNegativeInt = Field(
        0, description="sequences held out of training; their loss is logged every eval_steps")
    cache_dir: str | None = None


class TrainingSection(_Section):
    max_steps: PositiveInt = 1000
    learning_rate: PositiveFloat = 2e-5
    warmup_steps: NonNegativeInt = 20
    lr_scheduler: Literal["constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    weight_decay: NonNegativeFloat = 0.0
    adam_beta1: float = Field(0.9, gt=0.0, lt=1.0)
    adam_beta2: float = Field(0.95, gt=0.0, lt=1.0)
    max_grad_norm: NonNegativeFloat = 1.0
    per_device_batch_size: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    gradient_checkpointing: bool = True
    offload_checkpoints: bool = Field(
        False, description="GPU only: keep the checkpointed layer inputs in pinned host memory")
    precision: DType = "bf16"
    seed: int = 42
    save_steps: PositiveInt = 100
    eval_steps: PositiveInt | None = Field(
        None, description="loss on data.validation_sequences every N steps; default save_steps")
    save_total_limit: PositiveInt | None = 2
    logging_steps: PositiveInt = 1
    deepspeed: str | None = Field(None, description="zero2 | zero3 | zero3_offload | a json path")
    report_to: Literal["auto", "none", "tensorboard", "wandb"] = "auto"
    chunked_loss: bool = True
    loss_chunk_tokens: PositiveInt = 1024
    s2_attn: bool = False
    s2_group_fraction: float = Field(0.25, gt=0.0, le=1.0)


class Recipe(_Section):
    model: ModelSection
    rope: RopeSection
    lora: LoraSection = LoraSection()
    data: DataSection = DataSection()
    training: TrainingSection = TrainingSection()
    output_dir: str

    @property
    def seq_len(self) -> int:
        """Training sequence length: the target window unless the recipe says otherwise."""
        return self.data.seq_len or self.rope.target_context

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

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
        }
        return self.model_copy(update=updates)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _absolute_if_local(value: str | None) -> str | None:
    """A path that exists here becomes absolute; anything else (a hub id) is kept."""
    if value is None or not os.path.exists(os.path.expanduser(value)):
        return value
    return _absolute(value)


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, inherit, override and validate a recipe; report every problem at once."""
    source = str(path)
    raw = _read_with_extends(Path(path), chain=())
    errors: list[PiLoraError] = []
    for item in overrides:
        try:
            _apply_override(raw, item)
        except PiLoraError as err:
            errors.append(err)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errors += _translate(exc)
        raise RecipeErrors(source, errors) from None
    errors += _cross_checks(recipe)
    if errors:
        raise RecipeErrors(source, errors)
    return recipe


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PiLoraError(f"recipe file {path} not found", fix="check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PiLoraError(f"{path} is not valid YAML: {exc}", fix="fix the YAML syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PiLoraError(f"{path} must hold a mapping of sections", fix="see recipes/tiny.yaml")
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise PiLoraError(f"extends cycle: {cycle}", field="extends", fix="break the cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise PiLoraError("must be a file path", field="extends", fix="extends: base.yaml")
    parent_path = (path.parent / parent).resolve()
    if not parent_path.is_file():
        raise PiLoraError(
            f"{parent_path} not found (relative to {path.parent})",
            field="extends",
            fix="give the parent recipe's path relative to this recipe file",
        )
    return deep_merge(_read_with_extends(parent_path, (*chain, path)), data)


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Child values win; mappings merge key by key; lists are replaced whole."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`training.learning_rate=1e-4`: the value is parsed as YAML so types come out right."""
    if "=" not in item:
        raise PiLoraError(f"--set {item!r} is not KEY=VALUE", fix="--set training.max_steps=10")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise PiLoraError(f"--set {key}: {part} is not a section", field=key)
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(text)
    except yaml.YAMLError:
        node[parts[-1]] = text


# --------------------------------------------------------------------------- errors


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc`, for did-you-mean suggestions."""
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(cls.model_fields)


def _translate(exc: ValidationError) -> list[PiLoraError]:
    errors = []
    for item in exc.errors():
        loc = tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _fields_at(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.5)
            fix = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            errors.append(PiLoraError(f"unknown key '{loc[-1]}'", field=field, fix=fix))
        elif item["type"] == "missing":
            errors.append(PiLoraError("is required", field=field, fix=f"add `{loc[-1]}:`"))
        else:
            errors.append(PiLoraError(f"{item['msg']} (got {item.get('input')!r})", field=field))
    return errors


def _cross_checks(recipe: Recipe) -> list[PiLoraError]:
    """Constraints between sections that single fields cannot express."""
    errors = []
    if recipe.data.seq_len and recipe.data.seq_len > recipe.rope.target_context:
        errors.append(PiLoraError(
            f"{recipe.data.seq_len} exceeds rope.target_context {recipe.rope.target_context}",
            field="data.seq_len", fix="train at or below the target window"))
    if recipe.data.short_mix and recipe.data.short_mix.seq_len >= recipe.seq_len:
        errors.append(PiLoraError(
            "must be shorter than the training length", field="data.short_mix.seq_len",
            fix=f"use a length below {recipe.seq_len}"))
    if recipe.data.streaming and recipe.data.short_mix:
        errors.append(PiLoraError(
            "short_mix chooses blocks to cut among all of them, which a stream does not have",
            field="data.short_mix", fix="drop short_mix, or set data.streaming: false"))
    if not recipe.data.files and recipe.data.dataset is None:
        errors.append(PiLoraError(
            "no training data", field="data",
            fix="give data.files (txt/jsonl/parquet) or data.dataset.name"))
    if recipe.training.deepspeed and recipe.model.quantization and recipe.model.quantization.bits == 8:
        errors.append(PiLoraError(
            "8-bit quantization cannot be sharded by ZeRO", field="model.quantization.bits",
            fix="use bits: 4 with ZeRO-3, or drop training.deepspeed"))
    if recipe.training.offload_checkpoints and not recipe.training.gradient_checkpointing:
        errors.append(PiLoraError(
            "offloads the checkpointed layer inputs, so it needs checkpointing",
            field="training.offload_checkpoints",
            fix="set training.gradient_checkpointing: true, or drop offload_checkpoints"))
    errors += _check_deepspeed_path(recipe.training.deepspeed)
    return errors


def _check_deepspeed_path(value: str | None) -> list[PiLoraError]:
    if value is None or resolve_deepspeed_config(value) is not None:
        return []
    shipped = sorted(p.stem for p in SHIPPED_DEEPSPEED_DIR.glob("*.json"))
    return [PiLoraError(f"{value} is neither a shipped config nor a file",
                        field="training.deepspeed", fix=f"use one of {shipped} or a JSON path")]


def resolve_deepspeed_config(value: str) -> Path | None:
    """A shipped name (zero3) or a JSON path; None when neither exists."""
    path = Path(value)
    if path.is_file():
        return path.resolve()
    shipped = SHIPPED_DEEPSPEED_DIR / f"{Path(value).stem}.json"
    return shipped if shipped.is_file() else None
