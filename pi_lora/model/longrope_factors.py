"""LongRoPE rescale factors: one per rotary frequency pair, what the search varies.

A factor f_i divides the frequency of pair i (transformers' `rope_type: longrope` computes
inv_freq_i = 1 / (f_i * theta^(2i/d))). Linear PI is every f_i = s; YaRN and NTK-aware are
particular monotone curves from 1 (fast pairs, left alone) to s (slow pairs, interpolated).
LongRoPE (Ding et al. 2024) searches the curve itself: each factor on a 0.01 grid in [1, s],
non-decreasing with i, by evolution with perplexity at the target length as the fitness.
Here: the factor curves, their validation, the search operators and the factors file.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError

GRID = 0.01
FACTORS_FORMAT = 1


# --------------------------------------------------------------------------- known curves


def pi_factors(pairs: int, scale: float) -> list[float]:
    """Linear PI: every pair interpolated by s."""
    return [scale] * pairs


def ntk_factors(pairs: int, scale: float) -> list[float]:
    """NTK-aware (base b -> b s^(d/(d-2))) as per-pair factors: s^(i/(pairs-1)), 1 .. s."""
    if pairs == 1:
        return [scale]
    return [scale ** (i / (pairs - 1)) for i in range(pairs)]


def yarn_factors(pairs: int, scale: float, theta: float, original: int,
                 beta_fast: float = 32.0, beta_slow: float = 1.0,
                 truncate: bool = True) -> list[float]:
    """YaRN's NTK-by-parts as per-pair factors, as transformers computes it: pairs below the
    one turning beta_fast times in the original window keep 1, pairs past the one turning
    beta_slow times get s, a ramp linear in the pair index between (floored/ceiled bounds)."""
    dim = 2 * pairs

    def pair_turning(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if high == low:
        high += 0.001  # transformers' guard against a zero-width ramp
    out = []
    for i in range(pairs):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        keep = 1.0 - ramp  # share of the original frequency kept
        # inv_freq_yarn = keep * inv_freq + (1 - keep) * inv_freq / s
        out.append(1.0 / (keep + (1.0 - keep) / scale))
    return out


def longrope_attention_factor(scale: float, original: int) -> float:
    """LongRoPE's (and transformers' default) sqrt(1 + ln s / ln L)."""
    return math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0


# --------------------------------------------------------------------------- validation


def snap(factors: list[float], scale: float) -> list[float]:
    """On the 0.01 grid, inside [1, s], non-decreasing: what a search candidate must be."""
    out, low = [], 1.0
    for value in factors:
        value = min(max(round(value / GRID) * GRID, low, 1.0), math.floor(scale / GRID) * GRID)
        value = round(value, 2)
        out.append(value)
        low = value
    return out


def check_factors(values: Any, pairs: int, field: str, *, monotone: bool) -> list[float]:
    """A user's factor list: right length, finite, >= 1 (long) or > 0, monotone if asked."""
    if not isinstance(values, list) or len(values) != pairs:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise PiLoraError(f"{field} has {got} values; this model has {pairs} rotary frequency "
                          f"pairs (rotary dim / 2)", field=field,
                          fix=f"give {pairs} factors, or produce them with `pi-lora search`")
    try:
        floats = [float(v) for v in values]
    except (TypeError, ValueError):
        raise PiLoraError(f"{field} holds a non-number", field=field,
                          fix="give numbers") from None
    bad = [v for v in floats if not math.isfinite(v) or v <= 0 or v > 1e6]
    if bad:
        raise PiLoraError(f"{field} holds {bad[0]!r}", field=field,
                          fix="factors are finite and positive")
    if monotone:
        if any(v < 1.0 for v in floats):
            raise PiLoraError(f"{field} has a factor below 1 (that would extrapolate)",
                              field=field, fix="long factors are >= 1")
        drops = [i for i in range(1, pairs) if floats[i] < floats[i - 1]]
        if drops:
            raise PiLoraError(f"{field} decreases at pair {drops[0]} ({floats[drops[0] - 1]} -> "
                              f"{floats[drops[0]]})", field=field,
                              fix="long factors are non-decreasing from fast to slow pairs")
    return floats


def read_factors_file(path: Path, *, pairs: int, original: int, target: int,
                      field: str) -> dict[str, Any]:
    """The JSON `pi-lora search` writes, checked against the model and recipe using it."""
    try:
        data = json.loads(path.read_text())
        assert isinstance(data, dict)
    except (OSError, ValueError, AssertionError):
        raise PiLoraError(f"{path} is not a factors file written by `pi-lora search`",
                          field=field, fix="run `pi-lora search RECIPE` and point at its "
                                           "factors.json") from None
    for key, expected in (("original_context", original), ("target_context", target)):
        if data.get(key) != expected:
            raise PiLoraError(
                f"{path} was searched for {key} {data.get(key)}, this recipe has {expected}",
                field=field, fix="search again for this window, or match rope.target_context")
    long = check_factors(data.get("long_factor"), pairs, f"{field}: long_factor", monotone=True)
    short = check_factors(data.get("short_factor", [1.0] * pairs), pairs,
                          f"{field}: short_factor", monotone=False)
    attention = data.get("attention_factor")
    if attention is not None and not (isinstance(attention, int | float)
                                      and 0 < attention < 100):
        raise PiLoraError(f"{path}: attention_factor {attention!r}", field=field,
                          fix="a positive number, or leave it out")
    return {"long_factor": long, "short_factor": short, "attention_factor": attention}


def write_factors_file(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps({"format": FACTORS_FORMAT, **record}, indent=1) + "\n")


# --------------------------------------------------------------------------- search operators


def mutate(parent: list[float], scale: float, rng: random.Random, p: float = 0.3) -> list[float]:
    """Each pair with probability p: resampled on the grid between its neighbours' values,
    so the child stays monotone and inside [1, s]."""
    child = list(parent)
    top = math.floor(scale / GRID) * GRID
    for i in range(len(child)):
        if rng.random() >= p:
            continue
        low = child[i - 1] if i > 0 else 1.0
        high = child[i + 1] if i + 1 < len(child) else top
        steps = round((high - low) / GRID)
        child[i] = round(low + GRID * rng.randint(0, max(steps, 0)), 2)
    return child


def crossover(a: list[float], b: list[float], rng: random.Random,
              p: float = 0.3) -> list[float] | None:
    """Pairs taken from b with probability p; None when the mix is not monotone (rejected)."""
    child = [y if rng.random() < p else x for x, y in zip(a, b, strict=True)]
    if any(child[i] < child[i - 1] for i in range(1, len(child))):
        return None
    return child
