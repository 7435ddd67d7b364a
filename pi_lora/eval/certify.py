"""`pi-lora certify`'s protocol and rules: what is measured, the effective length, the verdict.

A context extension promises two things: the model uses the longer window, and it kept what
it could do at short range. So a release is measured against its own base on the same
prompts: a RULER-style suite at every length up to the target window (pi_lora.eval.ruler_tasks),
and perplexity at the original window. The rules below turn those numbers into the
certificate's verdict; pi_lora.eval.certify_run measures them, pi_lora.eval.certificate
writes them down. Nothing here loads a model, so every rule is tested on numbers alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from pi_lora.eval.ruler_tasks import TASK_NAMES
from pi_lora.recipe.loading import MAX_CONTEXT

TaskName = Literal["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt",
                   "cwe", "fwe"]
Length = Annotated[int, Field(ge=1, le=MAX_CONTEXT)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]


class CertifySettings(BaseModel):
    """The whole protocol of `pi-lora certify`: every default once, all of it in the
    certificate. Descriptions are the command's --help."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    lengths: list[Length] | None = Field(None, description=(
        "suite lengths in tokens (prompt + answer budget), a comma list such as 2k,4k,8k,16k; "
        "none past the release's window (default: a quarter and half of the original window "
        "but at least 2k, the original window, then doubling up to the target window)"))
    trials: int = Field(5, ge=1, le=10_000, description="samples per task and length")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of every sample")
    tasks: list[TaskName] = Field(list(TASK_NAMES), description="tasks of the suite, a comma list")
    layout: Literal["shared", "per-task"] = Field("shared", description=(
        "shared: one context per (length, trial) holding every task's needles, chain and word "
        "blocks, read once and asked every question; per-task: RULER's one context per task "
        "(7 prefills per trial instead of 1: about 6x the time)"))
    haystack: list[str] = Field([], description=(
        "text files or directories to hide the needles in, or `shipped` (the held-out plays "
        "pi-lora ships) (default: RULER's noise sentences)"))
    documents: list[Path] = Field([], description=(
        "held-out text for perplexity, files or directories (default: the held-out plays "
        "pi-lora ships)"))
    ppl_windows: int = Field(2, ge=1, le=10_000, description=(
        "whole windows of the original length scored for perplexity"))
    threshold_ratio: Fraction = Field(0.85, description=(
        "the suite threshold as a fraction of the base's own mean at its original window "
        "(RULER's reference rule)"))
    threshold: Fraction | None = Field(None, description=(
        "an absolute suite threshold instead of --threshold-ratio"))
    min_threshold: float = Field(0.1, ge=0.0, le=1.0, description=(
        "the least threshold: a base that cannot do the suite certifies no window"))
    min_retention: float = Field(0.97, gt=0.0, le=10.0, description=(
        "retention the verdict asks for: suite score at short lengths and inverse perplexity "
        "at the original window, each release / base"))
    required_length: Length | None = Field(None, description=(
        "effective length the verdict asks for (default: the release's target window)"))
    dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description=(
        "auto: bf16 on GPUs and CPUs that compute it natively, else fp32"))
    device: str = Field("auto", description="cuda, cuda:N or cpu; auto: cuda when there is one")
    chunk_tokens: Length = 1024  # lm_head rows per chunk when scoring perplexity
    progress: bool = True

    @field_validator("lengths")
    @classmethod
    def _sorted_unique(cls, lengths: list[int] | None) -> list[int] | None:
        return sorted(set(lengths)) if lengths is not None else None

    @field_validator("tasks")
    @classmethod
    def _tasks_once(cls, tasks: list[str]) -> list[str]:
        if not tasks:
            raise ValueError("name at least one task")
        return [t for t in TASK_NAMES if t in tasks]  # the suite's order, each once


# the shortest default length: the shared context's needles, word blocks and questions take
# ~1.5k tokens with a 49k-vocabulary tokenizer (SmolLM2 fits from 2k, not at 1k)
SHORTEST_DEFAULT = 2048


def default_lengths(original: int, target: int) -> list[int]:
    """original/4, original/2, the original window, then doubling, and the target itself,
    none under SHORTEST_DEFAULT (but the original window always): SmolLM2 8k -> 16k gives
    2k, 4k, 8k, 16k; Llama 2 4k -> 32k gives 2k, 4k, 8k, 16k, 32k."""
    lengths = {original // 4, original // 2, original, target}
    length = original * 2
    while length < target:
        lengths.add(length)
        length *= 2
    return sorted(n for n in lengths if (n >= SHORTEST_DEFAULT or n == original) and n <= target)


@dataclass(frozen=True)
class Plan:
    """Which lengths each model is measured at: the release at all, the base at those within
    its window plus the window itself (the threshold's reference)."""

    original: int
    target: int
    release_lengths: list[int]
    base_lengths: list[int]

    @property
    def short_lengths(self) -> list[int]:
        """Where retention is measured: lengths both models run."""
        return [n for n in self.release_lengths if n in self.base_lengths]


def plan_lengths(settings: CertifySettings, original: int, target: int) -> Plan:
    lengths = settings.lengths or default_lengths(original, target)
    base = sorted({n for n in lengths if n <= original} | {original})
    return Plan(original, target, lengths, base)


# ---------------------------------------------------------------------------- rules


def suite_threshold(base_mean_at_original: float | None, settings: CertifySettings
                    ) -> tuple[float, str]:
    """The suite mean a length must reach, and the rule in words for the certificate."""
    if settings.threshold is not None:
        return settings.threshold, f"given: {settings.threshold:g}"
    relative = settings.threshold_ratio * (base_mean_at_original or 0.0)
    rule = (f"{settings.threshold_ratio:g} x the base's mean at its original window "
            f"({base_mean_at_original or 0.0:.3f}) = {relative:.3f}")
    if relative < settings.min_threshold:
        return settings.min_threshold, f"{rule}, raised to the floor {settings.min_threshold:g}"
    return relative, rule


def effective_length(means: Mapping[int, float | None], threshold: float) -> int:
    """Largest tested length such that the suite mean reaches the threshold at it and at every
    shorter tested length (a length without a score fails); 0 when the shortest fails."""
    from pi_lora.eval.passkey import k_max  # torch: not at `pi-lora --help` time

    return k_max({n: (-1.0 if m is None else m) for n, m in means.items()}, threshold)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None when either is missing or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Retention:
    """Short range, release against base: perplexity at the original window and the suite at
    the short lengths, each as release / base; `*_retention` reads 1.0 = kept all of it."""

    ppl_ratio: float | None  # release ppl / base ppl (lower is better)
    suite_ratio_by_length: dict[int, float | None]
    suite_ratio: float | None  # sum of release means / sum of base means at short lengths

    @property
    def ppl_retention(self) -> float | None:
        return None if not self.ppl_ratio else 1.0 / self.ppl_ratio

    @property
    def suite_retention(self) -> float | None:
        return self.suite_ratio


def retention(release_ppl: float | None, base_ppl: float | None,
              release_means: Mapping[int, float | None], base_means: Mapping[int, float | None],
              short_lengths: list[int]) -> Retention:
    by_length = {n: ratio(release_means.get(n), base_means.get(n)) for n in short_lengths}
    release_sum = sum(release_means.get(n) or 0.0 for n in short_lengths)
    base_sum = sum(base_means.get(n) or 0.0 for n in short_lengths)
    return Retention(ratio(release_ppl, base_ppl), by_length, ratio(release_sum, base_sum))


@dataclass(frozen=True)
class Verdict:
    passed: bool
    effective_length: int
    required_length: int
    threshold: float
    threshold_rule: str
    retention: Retention
    reasons: list[str] = field(default_factory=list)  # why it failed; empty on a pass


def decide(release_means: Mapping[int, float | None], threshold: tuple[float, str],
           kept: Retention, required_length: int, min_retention: float,
           base_mean: float | None = None) -> Verdict:
    """Pass when the effective length reaches the required length and both retentions reach
    `min_retention`; every unmet condition is a reason. A base that itself scores under the
    threshold at its own window is named: then no release of it can pass, whatever it learnt."""
    value, rule = threshold
    effective = effective_length(release_means, value)
    reasons = []
    if base_mean is not None and base_mean < value:
        reasons.append(f"the base itself scores {base_mean:.3f} at its original window, under "
                       f"the threshold {value:.3f}: this suite cannot certify a release of it "
                       "(a model this small barely does the tasks); compare perplexity and "
                       "passkey (pi-lora eval), or set --threshold knowingly")
    if effective < required_length:
        reasons.append(f"effective length {effective} is below the required {required_length} "
                       f"(suite mean under {value:.3f})")
    for name, kept_value in (("perplexity", kept.ppl_retention), ("suite", kept.suite_retention)):
        if kept_value is None:
            reasons.append(f"{name} retention cannot be measured (the base scores nothing)")
        elif kept_value < min_retention:
            reasons.append(f"{name} retention {kept_value:.3f} is below {min_retention:g}")
    return Verdict(not reasons, effective, required_length, value, rule, kept, reasons)
