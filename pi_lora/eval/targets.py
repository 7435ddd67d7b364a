"""Command-line target specs -> `EvalTarget`s: base models (with rope overrides), runs, releases.

    pi-lora eval BASE --rope none --rope linear:16384 --rope yarn:16384   # zero-shot methods
    pi-lora eval runs/llama2-13b-16k                                      # base + adapter
    pi-lora eval release/llama2-13b-16k                                   # merged release
    pi-lora eval "PI x4=release/a" "YaRN=release/b"                       # LABEL=SPEC

Every loader call builds a fresh model, so a stateful rotary (dynamic NTK) starts clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.eval.runner import EvalTarget, ModelPair
from pi_lora.model.loading import load_config, load_model, load_tokenizer
from pi_lora.model.rope import RopePlan, detect_existing, rope_override
from pi_lora.recipe.dtypes import dtype_name
from pi_lora.recipe.loading import MAX_CONTEXT, SCALING_METHODS, ModelSection
from pi_lora.release.files import is_release
from pi_lora.run.directory import RunDir
from pi_lora.run.finished import Run
from pi_lora.run.trained import load_trained


@dataclass(frozen=True)
class RopeSpec:
    """`none` (the model as it is), METHOD:TARGET_CONTEXT, or longrope:FACTORS_FILE."""

    method: str
    target_context: int | None
    factors: str | None = None  # longrope: the factors.json of `pi-lora search`

    @classmethod
    def parse(cls, text: str) -> RopeSpec:
        if text in ("none", "plain"):
            return cls("none", None)
        method, _, length = text.partition(":")
        if method == "longrope":
            return cls._longrope(length)
        if method not in SCALING_METHODS or not length:
            raise PiLoraError(f"--rope {text!r} is not METHOD:LENGTH", field="--rope",
                              fix=f"e.g. --rope linear:16384; methods: none, {', '.join(SCALING_METHODS)}")
        return cls(method, parse_length(length, "--rope"))

    @classmethod
    def _longrope(cls, file: str) -> RopeSpec:
        """The target is the one the factors were searched for."""
        import json
        from pathlib import Path

        try:
            target = int(json.loads(Path(file).expanduser().read_text())["target_context"])
        except (OSError, ValueError, KeyError, TypeError):
            raise PiLoraError(f"--rope longrope:{file[:80]}: not a factors file",
                              field="--rope", fix="e.g. --rope longrope:search/factors.json "
                                                  "(written by `pi-lora search`)") from None
        return cls("longrope", target, str(Path(file).expanduser().resolve()))


def parse_length(text: str, field: str) -> int:
    """`16384`, `16k` or `16K` (k = 1024, as context windows are counted)."""
    text = text.strip().lower()
    try:
        length = int(float(text[:-1]) * 1024) if text.endswith("k") else int(text)
    except (ValueError, OverflowError):
        raise PiLoraError(f"{text[:40]!r} is not a length", field=field,
                          fix="e.g. 4096 or 4k") from None
    if not 1 <= length <= MAX_CONTEXT:
        raise PiLoraError(f"{text[:40]!r} is not a length in 1..{MAX_CONTEXT} tokens",
                          field=field, fix="e.g. 4096 or 4k")
    return length


def parse_fraction(text: str, field: str) -> float:
    """A key depth: a number in [0, 1] (range checked with the rest of the settings)."""
    try:
        return float(text)
    except ValueError:
        raise PiLoraError(f"{text.strip()[:40]!r} is not a number", field=field,
                          fix="fractions of the filler, e.g. 0,0.25,0.5,0.75,1") from None


def resolve_targets(specs: list[str], ropes: list[str], dtype: torch.dtype,
                    trust_remote_code: bool = False) -> list[EvalTarget]:
    """One target per run/release, and one per --rope for each base model."""
    rope_specs = [RopeSpec.parse(r) for r in ropes] or [RopeSpec("none", None)]
    targets: list[EvalTarget] = []
    for raw in specs:
        label, spec = _split_label(raw)
        kind = _kind(spec)
        if kind == "run":
            targets.append(_run_target(spec, label, dtype))
        elif kind == "release":
            targets.append(_model_target(spec, label, dtype, None, "release", trust_remote_code))
        else:
            for rope in rope_specs:
                targets.append(_model_target(spec, label, dtype, rope, "base", trust_remote_code))
    return targets


def _split_label(raw: str) -> tuple[str | None, str]:
    label, sep, spec = raw.partition("=")
    if sep and not Path(raw).exists():
        return label, spec
    return None, raw


def _kind(spec: str) -> str:
    path = Path(spec)
    if RunDir.is_run(path):
        return "run"
    if is_release(path):
        return "release"
    if path.exists() or spec.endswith(".gguf") or spec.count("/") == 1:
        return "base"
    raise PiLoraError(f"{spec} is neither a run directory, a model directory nor a hub id",
                      field="TARGET", fix="give a path written by pi-lora train/merge, or a model")


def _short_name(spec: str) -> str:
    return Path(spec.rstrip("/")).name or spec


def _model_section(spec: str, dtype: torch.dtype, trust_remote_code: bool) -> ModelSection:
    return ModelSection(name=spec, dtype=dtype_name(dtype), trust_remote_code=trust_remote_code)


def _model_target(spec: str, label: str | None, dtype: torch.dtype, rope: RopeSpec | None,
                  kind: str, trust_remote_code: bool) -> EvalTarget:
    section = _model_section(spec, dtype, trust_remote_code)
    plan = None
    config = load_config(section)
    if rope is not None and rope.method != "none":
        assert rope.target_context is not None
        plan = rope_override(rope.method, rope.target_context, config, factors=rope.factors)
    name = label or _default_label(spec, kind, plan)
    window = (plan.original_context, plan.target_context) if plan else _config_window(config)
    describe: dict[str, Any] = {"kind": kind, "model": spec,
                                "rope": plan.to_dict() if plan else "as in the model config",
                                "window": {"original": window[0], "extended": window[1]}}

    def load() -> ModelPair:
        return load_model(section, plan), load_tokenizer(section)

    return EvalTarget(name, load, describe, window)


def _config_window(config: Any) -> tuple[int, int]:
    """(original, extended) as a checkpoint's config says: a release or a Llama 3.1 carries
    its scaling and the window it was pretrained at; a plain model has one window."""
    extended = int(config.max_position_embeddings)
    existing = detect_existing(config)
    return (existing.original_context if existing else extended), extended


def _default_label(spec: str, kind: str, plan: RopePlan | None) -> str:
    name = _short_name(spec)
    if kind == "release":
        return f"{name} [release]"
    if plan is None:
        return f"{name} (plain RoPE)"
    return f"{name} + {plan.method} x{plan.factor:g} (untuned)"


def _run_target(spec: str, label: str | None, dtype: torch.dtype) -> EvalTarget:
    """Base + adapter + extras from a run directory, merged in memory for speed."""
    run = Run.open(spec)
    recipe, plan = run.recipe, run.plan
    section = recipe.model.model_copy(update={"dtype": dtype_name(dtype)})

    def load() -> ModelPair:
        model = load_trained(run, section.dtype)
        if section.quantization is None:
            model = model.merge_and_unload()
        return model, load_tokenizer(section)

    window = (plan.original_context, plan.target_context)
    describe = {"kind": "run", "run_dir": spec, "base_model": recipe.model.name,
                "rope": plan.to_dict(), "window": {"original": window[0], "extended": window[1]}}
    return EvalTarget(label or f"{_short_name(spec)} [run]", load, describe, window)
