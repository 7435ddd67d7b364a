"""Recipe rope section -> transformers `rope_parameters`.

We never patch rotary code: transformers already implements linear, dynamic, yarn and
llama3 scaling, and a release only works in plain transformers if the scaling lives in its
config. Our job is the arithmetic nobody checks: the true original window, an exact factor,
and refusing to scale an already-scaled model twice by accident.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from pi_lora.core.errors import PiLoraError
from pi_lora.model.families import (
    layer_scaling_note,
    nested_rope,
    own_longrope,
    refuse_composite,
    scaled_layer_types,
    trained_window,
)
from pi_lora.recipe.loading import LongropeOptions, RopeSection

# rope types that rescale positions; "default" (plain RoPE, possibly NTK-raised theta) does not
SCALED_TYPES = ("linear", "dynamic", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class ExistingScaling:
    """Scaling a checkpoint already carries (e.g. Llama 3.1, CodeLlama, an earlier pi-lora run)."""

    rope_type: str
    factor: float
    original_context: int
    source: str


@dataclass(frozen=True)
class RopePlan:
    """Everything derived from the rope section; written to run.json and config.json."""

    method: str
    original_context: int
    original_source: str
    target_context: int
    factor: float
    rope_theta: float
    rotary_dim: int
    rope_parameters: dict[str, Any]
    max_position_embeddings: int
    existing: ExistingScaling | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RopePlan:
        data = dict(data)
        if data.get("existing"):
            data["existing"] = ExistingScaling(**data["existing"])
        return cls(**data)


# --------------------------------------------------------------------------- reading a config


def flat_rope_parameters(config: Any) -> dict[str, Any]:
    """The rope dict that long-range layers use (full_attention for nested configs)."""
    params = getattr(config, "rope_parameters", None) or {}
    nested = [k for k, v in params.items() if isinstance(v, dict)]
    if not nested:
        return dict(params)
    key = "full_attention" if "full_attention" in nested else nested[0]
    return dict(params[key])


def rotary_dim(config: Any) -> int:
    """Dimensions that rotate: head_dim times the partial rotary fraction (GPT-NeoX, Phi)."""
    params = flat_rope_parameters(config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    return int(head_dim * (partial or 1.0))


def detect_existing(config: Any) -> ExistingScaling | None:
    """The scaling a checkpoint already carries, with its true pretraining window."""
    params = flat_rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SCALED_TYPES:
        return None
    max_pos = int(config.max_position_embeddings)
    original = params.get("original_max_position_embeddings")
    source = "rope_parameters.original_max_position_embeddings"
    if original is None and getattr(config, "original_max_position_embeddings", None):
        original = config.original_max_position_embeddings
        source = "config.original_max_position_embeddings"
    if original is None and rope_type == "linear":
        # released PI checkpoints carry max_position_embeddings = extended window (Gemma 3 4B+:
        # x8 at 131072, 16384 positions per rotation; x16 keeps that at 262144)
        original = round(max_pos / float(params.get("factor") or 1.0))
        source = "max_position_embeddings / factor (assumed)"
    if original is None:
        original, source = max_pos, "max_position_embeddings"
    # Phi-3/4 longrope states no factor: transformers reads it as max / original
    factor = float(params.get("factor") or max_pos / int(original))
    return ExistingScaling(rope_type, factor, int(original), source)


def with_legacy_rope_scaling(config: dict[str, Any], plan: RopePlan) -> dict[str, Any]:
    """A config.json dict that transformers < 5 reads with the scaling too: it knows only
    `rope_scaling` + `rope_theta`, and without them runs a 5.x config unscaled, silently."""
    params = dict(plan.rope_parameters)
    mirrored = dict(config)
    if params.get("rope_type", "default") != "default":
        mirrored["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_theta"},
                                    "type": params["rope_type"]}
    mirrored["rope_theta"] = params.get("rope_theta", plan.rope_theta)
    local = (config.get("rope_parameters") or {}).get("sliding_attention")
    if isinstance(local, dict):  # Gemma 3 in transformers 4: the local layers' own base
        mirrored["rope_local_base_freq"] = local.get("rope_theta", 10000.0)
    return mirrored


# --------------------------------------------------------------------------- planning


def plan_rope(rope: RopeSection, config: Any) -> RopePlan:
    """Turn the recipe's rope section into rope parameters for this model config."""
    require_rope(config)
    existing = detect_existing(config)
    original, source = _original_context(rope, config, existing)
    _guard_double_scaling(rope, config, existing, original)
    factor = rope.target_context / original
    if rope.method != "none" and factor <= 1.0:
        raise PiLoraError(
            f"target {rope.target_context} is not longer than the original window {original}",
            field="rope.target_context", fix=f"use a target above {original}, or method: none")
    base = flat_rope_parameters(config)
    theta = float(base.get("rope_theta") or getattr(config, "rope_theta", 10000.0))
    dim = rotary_dim(config)
    params, max_pos, notes = _method_parameters(rope, base, theta, dim, original, factor,
                                                int(config.max_position_embeddings))
    notes = [*notes, *_replacement_note(rope, existing, factor), layer_scaling_note(config)]
    return RopePlan(
        method=rope.method, original_context=original, original_source=source,
        target_context=rope.target_context, factor=factor, rope_theta=theta, rotary_dim=dim,
        rope_parameters=params, max_position_embeddings=max_pos, existing=existing, notes=notes,
    )


def require_rope(config: Any) -> None:
    """A model without rotary embeddings (GPT-2, OPT, BLOOM: learned or ALiBi positions) has
    nothing to scale: refuse it instead of planning a scaling that nothing would apply."""
    refuse_composite(config)
    if flat_rope_parameters(config) or getattr(config, "rope_theta", None):
        return
    kind = getattr(config, "model_type", None) or type(config).__name__
    name = getattr(config, "_name_or_path", "") or kind
    raise PiLoraError(
        f"{name} ({kind}) has no rotary position embeddings (no rope_parameters or rope_theta "
        "in its config): pi-lora extends RoPE models only", field="model.name",
        fix="choose a RoPE model (Llama, Mistral, Qwen2, Gemma, Phi, GPT-NeoX ...)")


def _original_context(
    rope: RopeSection, config: Any, existing: ExistingScaling | None
) -> tuple[int, str]:
    if rope.original_context is not None:
        return rope.original_context, "recipe rope.original_context"
    if existing is not None:
        return existing.original_context, existing.source
    return trained_window(config) or (int(config.max_position_embeddings),
                                      "config.max_position_embeddings")


def _guard_double_scaling(
    rope: RopeSection, config: Any, existing: ExistingScaling | None, original: int
) -> None:
    """An already-scaled model is extended from its true original window: the new scaling is
    measured from there and replaces the old one, so nothing is ever scaled twice. LongRoPE
    is the exception: its short and long factors are continued, never replaced."""
    if existing is None:
        return
    fix = f"omit rope.original_context (pretraining window is {existing.original_context})"
    if original != existing.original_context:
        raise PiLoraError(
            f"the model is already scaled x{existing.factor:g} ({existing.rope_type}) from "
            f"{existing.original_context}; original_context {original} would scale it twice",
            field="rope.original_context", fix=fix)
    if existing.rope_type == "longrope" and rope.method not in ("longrope", "none"):
        raise PiLoraError(
            f"the model carries LongRoPE short and long factors (x{existing.factor:g} from "
            f"{existing.original_context}); {rope.method} would replace them and drop its "
            "short_factor, which it runs with inside the original window", field="rope.method",
            fix="use method: longrope (its long factors are scaled to the target; or give "
                "rope.longrope.factors from `pi-lora search`, which is seeded with them)")
    if rope.target_context <= config.max_position_embeddings and rope.method != "none":
        raise PiLoraError(
            f"the model already covers {config.max_position_embeddings} tokens",
            field="rope.target_context", fix="choose a longer target")


def _replacement_note(rope: RopeSection, existing: ExistingScaling | None,
                      factor: float) -> list[str]:
    if existing is None or rope.method == "none":
        return []
    verb = "continues" if rope.method == existing.rope_type else "replaces"
    return [f"{rope.method} x{factor:g} {verb} the checkpoint's {existing.rope_type} "
            f"x{existing.factor:g}, both measured from the pretraining window "
            f"{existing.original_context} ({existing.source}): nothing is scaled twice"]


def _method_parameters(
    rope: RopeSection, base: dict[str, Any], theta: float, dim: int, original: int, factor: float,
    window: int,
) -> tuple[dict[str, Any], int, list[str]]:
    """Dispatch on rope.method: (rope_parameters, max_position_embeddings, notes)."""
    keep = {k: v for k, v in base.items() if k in ("rope_theta", "partial_rotary_factor")}
    keep["rope_theta"] = theta
    target = rope.target_context
    if rope.method == "none":
        return dict(base), target, ["no interpolation: positions extrapolate past the window"]
    if rope.method == "linear":
        return {**keep, "rope_type": "linear", "factor": factor}, target, []
    if rope.method == "ntk":
        raised = theta * factor ** (dim / (dim - 2))
        note = f"NTK-aware: rope_theta {theta:g} -> {raised:.6g} (b * s^(d/(d-2)), d={dim})"
        return {**keep, "rope_type": "default", "rope_theta": raised}, target, [note]
    if rope.method == "dynamic":
        # transformers' dynamic NTK treats max_position_embeddings as the trained window
        note = "dynamic NTK: max_position_embeddings stays at the original window by design"
        return {**keep, "rope_type": "dynamic", "factor": factor}, original, [note]
    if rope.method == "yarn":
        params = {**keep, "rope_type": "yarn", "factor": factor,
                  "original_max_position_embeddings": original,
                  "beta_fast": rope.yarn.beta_fast, "beta_slow": rope.yarn.beta_slow}
        if rope.yarn.attention_factor is not None:
            params["attention_factor"] = rope.yarn.attention_factor
        return params, target, [f"YaRN attention temperature {yarn_temperature(factor):.4f}"]
    if rope.method == "longrope":
        return _longrope_parameters(rope, keep, dim, original, factor, own_longrope(base), window)
    if rope.method == "llama3":
        return {**keep, "rope_type": "llama3", "factor": factor,
                "original_max_position_embeddings": original,
                "low_freq_factor": rope.llama3.low_freq_factor,
                "high_freq_factor": rope.llama3.high_freq_factor}, target, []
    raise AssertionError(f"unhandled rope method {rope.method}")


def _longrope_parameters(rope: RopeSection, keep: dict[str, Any], dim: int, original: int,
                         factor: float, own: dict[str, Any] | None,
                         window: int) -> tuple[dict[str, Any], int, list[str]]:
    """transformers' `longrope`: the long factors beyond the original window, short within.
    A checkpoint with its own factors (Phi-4-mini) keeps its short_factor, and by default its
    long factors times target / its window (PI on top of its LongRoPE)."""
    from pathlib import Path

    from pi_lora.model.longrope_factors import (
        check_factors,
        longrope_attention_factor,
        read_factors_file,
    )

    options, pairs = rope.longrope, dim // 2
    if options.factors and options.long_factor is not None:
        raise PiLoraError("both a factors file and long_factor are given",
                          field="rope.longrope", fix="keep one of them")
    if options.factors:
        found = read_factors_file(Path(options.factors).expanduser(), pairs=pairs,
                                  original=original, target=rope.target_context,
                                  field="rope.longrope.factors")
        source = f"searched ({options.factors})"
    elif options.long_factor is not None:
        found = {"long_factor": check_factors(options.long_factor, pairs,
                                              "rope.longrope.long_factor", monotone=True),
                 "short_factor": None, "attention_factor": None}
        source = "given in the recipe"
    elif own is not None:
        scale = rope.target_context / window
        found = {"long_factor": [f * scale for f in own["long_factor"]],
                 "short_factor": None, "attention_factor": None}
        source = f"the checkpoint's own x{scale:g} ({window} -> {rope.target_context})"
    else:
        raise PiLoraError("longrope needs its per-frequency factors", field="rope.longrope",
                          fix="run `pi-lora search RECIPE`, then set rope.longrope.factors "
                              "to the factors.json it writes")
    short, short_source = _short_factor(options, pairs, own, found["short_factor"])
    attention = (options.attention_factor or found["attention_factor"]
                 or longrope_attention_factor(factor, original))
    params = {**keep, "rope_type": "longrope", "factor": factor,
              "original_max_position_embeddings": original,
              "long_factor": found["long_factor"], "short_factor": short,
              "attention_factor": attention}
    note = (f"LongRoPE factors {source}: long {min(found['long_factor']):g}.."
            f"{max(found['long_factor']):g} over {pairs} pairs, short {short_source}, "
            f"attention factor {attention:.4f}")
    return params, rope.target_context, [note]


def _short_factor(options: LongropeOptions, pairs: int, own: dict[str, Any] | None,
                  searched: list[float] | None) -> tuple[list[float], str]:
    """(short_factor, where it came from): the recipe's, else the checkpoint's own (never
    dropped: the model runs with it inside its original window), else the search's or 1.0."""
    from pi_lora.model.longrope_factors import check_factors

    if options.short_factor is not None:
        return check_factors(options.short_factor, pairs, "rope.longrope.short_factor",
                             monotone=False), "given in the recipe"
    if own is not None:
        return own["short_factor"], "the checkpoint's own"
    short = searched or [1.0] * pairs
    return short, "1.0 (the original window unchanged)" if set(short) == {1.0} else "searched"


def yarn_temperature(factor: float) -> float:
    """sqrt(1/t) = 0.1 ln(s) + 1 (YaRN paper); transformers applies it to cos/sin."""
    return 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


# --------------------------------------------------------------------------- applying


def apply_rope(config: Any, plan: RopePlan) -> Any:
    """Write the plan into a config in place (transformers 5 `rope_parameters`)."""
    if nested_rope(config):
        # only the global layers' rope; keys of the old scaling (a linear factor under a new
        # yarn or NTK entry) must not linger, so the entry is replaced whole
        params = copy.deepcopy(config.rope_parameters)
        for key in scaled_layer_types(config):
            params[key] = copy.deepcopy(plan.rope_parameters)
    else:
        params = copy.deepcopy(plan.rope_parameters)
    config.rope_parameters = params
    config.max_position_embeddings = plan.max_position_embeddings
    if getattr(config, "original_max_position_embeddings", None) is not None:
        # Phi-3 reads this attribute before rope_parameters
        config.original_max_position_embeddings = plan.original_context
    return config


def rope_override(method: str, target_context: int, config: Any,
                  factors: str | None = None) -> RopePlan:
    """A zero-shot rope plan for evaluation (`pi-lora eval --rope yarn:16384`)."""
    section = RopeSection(method=method, target_context=target_context,  # type: ignore[arg-type]
                          longrope=LongropeOptions(factors=factors))
    return plan_rope(section, config)
