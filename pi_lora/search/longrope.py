"""`pi-lora search`: LongRoPE's evolutionary search of per-frequency rescale factors.

The base is loaded once; a candidate is scored by writing its factors into the model's rotary
frequencies (inv_freq / f, with LongRoPE's attention factor on cos/sin: exactly what
transformers' `longrope` computes past the original window) and measuring perplexity on
held-out windows of the target length with the evaluator's scorer. The population starts from
linear PI, YaRN and NTK-aware curves and evolves by mutation (a pair resampled between its
neighbours) and crossover (pairs swapped, non-monotone children rejected); elitism keeps the
best, so the best fitness never rises. Writes factors.json (what recipes and `pi-lora eval
--rope longrope:FILE` read), search_log.jsonl and two plots.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.eval.perplexity import score_window
from pi_lora.model.loading import load_model, load_tokenizer
from pi_lora.model.longrope_factors import (
    crossover,
    longrope_attention_factor,
    mutate,
    ntk_factors,
    pi_factors,
    snap,
    write_factors_file,
    yarn_factors,
)
from pi_lora.model.rope import detect_existing, plan_rope
from pi_lora.recipe.loading import Recipe, RopeSection


@dataclass(frozen=True)
class SearchSettings:
    """LongRoPE's budget (population 64, 40 generations, 16 + 16 children, 32 parents)."""

    population: int = 64
    generations: int = 40
    mutations: int = 16
    crossovers: int = 16
    parents: int = 32
    probability: float = 0.3
    samples: int = 4
    seed: int = 0
    minutes: float | None = None  # stop after the generation that passes this


@dataclass
class SearchResult:
    original_context: int
    target_context: int
    scale: float
    long_factor: list[float]
    attention_factor: float
    fitness: float  # perplexity at the target length
    baselines: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0


class Fitness:
    """Perplexity of the loaded base with a factor curve in its rotary embeddings; cached."""

    def __init__(self, model: Any, samples: list[torch.Tensor], original: int, scale: float):
        self.model, self.samples = model, samples
        self.rotary = [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None),
                                                                torch.Tensor)]
        if not self.rotary or any(getattr(m, "rope_type", "default") != "default"
                                  for m in self.rotary):
            raise PiLoraError("the search needs a base with plain rotary embeddings",
                              field="model.name", fix="start from the unscaled base model")
        self.base = [m.inv_freq.detach().clone() for m in self.rotary]
        self.attention = longrope_attention_factor(scale, original)
        self.cache: dict[tuple[float, ...], float] = {}

    def __call__(self, factors: list[float]) -> float:
        key = tuple(factors)
        if key not in self.cache:
            self.cache[key] = self._perplexity(factors)
        return self.cache[key]

    def _perplexity(self, factors: list[float]) -> float:
        for module, base in zip(self.rotary, self.base, strict=True):
            scale = torch.tensor(factors, dtype=base.dtype, device=base.device)
            module.inv_freq = base / scale
            module.attention_scaling = self.attention
        nll, tokens = 0.0, 0
        for ids in self.samples:
            value, count = score_window(self.model, ids.unsqueeze(0), 1)
            nll, tokens = nll + value, tokens + count
        ppl = math.exp(nll / tokens)
        return ppl if math.isfinite(ppl) else float("inf")


def held_out_samples(tokenizer: Any, documents: list[str], length: int, count: int
                     ) -> list[torch.Tensor]:
    """Up to `count` non-overlapping windows of `length` tokens from the documents."""
    samples: list[torch.Tensor] = []
    for text in documents:
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        for start in range(0, ids.numel() - length + 1, length):
            samples.append(ids[start:start + length])
            if len(samples) == count:
                return samples
    if not samples:
        raise PiLoraError(f"no held-out document reaches {length} tokens", field="--docs",
                          fix="give longer text files (or several concatenated)")
    return samples


def search(fitness: Callable[[list[float]], float], seeds: dict[str, list[float]], scale: float,
           settings: SearchSettings,
           on_generation: Callable[[dict[str, float]], None] | None = None) -> tuple[
               list[float], float, list[dict[str, float]]]:
    """Evolve factor curves from `seeds`; returns (best, its fitness, per-generation log)."""
    rng = random.Random(settings.seed)
    started = time.time()
    population = {tuple(curve) for curve in seeds.values()}
    seed_curves = list(seeds.values())
    tries = 0
    while len(population) < settings.population and tries < 50 * settings.population:
        tries += 1
        population.add(tuple(mutate(rng.choice(seed_curves), scale, rng, settings.probability)))
    scored = sorted((fitness(list(c)), c) for c in population)
    history: list[dict[str, float]] = []
    for generation in range(1, settings.generations + 1):
        parents = [c for _, c in scored[: settings.parents]]
        children = _children(parents, scale, settings, rng, {c for _, c in scored})
        scored = sorted(scored + [(fitness(list(c)), c) for c in children])
        scored = scored[: settings.population]
        finite = [f for f, _ in scored if math.isfinite(f)]
        record = {"generation": generation, "best": scored[0][0],
                  "mean": sum(finite) / len(finite) if finite else float("inf"),
                  "children": len(children), "seconds": time.time() - started}
        history.append(record)
        if on_generation is not None:
            on_generation(record)
        if settings.minutes is not None and time.time() - started > 60 * settings.minutes:
            break
    best_fitness, best = scored[0]
    return list(best), best_fitness, history


def _children(parents: list[tuple[float, ...]], scale: float, settings: SearchSettings,
              rng: random.Random, seen: set[tuple[float, ...]]) -> list[tuple[float, ...]]:
    """New, unseen, monotone candidates: mutations of parents, then crossovers of two."""
    children: list[tuple[float, ...]] = []
    for wanted, make in ((settings.mutations, _mutant), (settings.crossovers, _cross)):
        made, tries = 0, 0
        while made < wanted and tries < 20 * wanted:
            tries += 1
            child = make(parents, scale, settings, rng)
            if child is None or child in seen:
                continue
            seen.add(child)
            children.append(child)
            made += 1
    return children


def _mutant(parents: list[tuple[float, ...]], scale: float, settings: SearchSettings,
            rng: random.Random) -> tuple[float, ...] | None:
    return tuple(mutate(list(rng.choice(parents)), scale, rng, settings.probability))


def _cross(parents: list[tuple[float, ...]], scale: float, settings: SearchSettings,
           rng: random.Random) -> tuple[float, ...] | None:
    if len(parents) < 2:
        return None
    a, b = rng.sample(parents, 2)
    child = crossover(list(a), list(b), rng, settings.probability)
    return tuple(child) if child is not None else None


# --------------------------------------------------------------------------- the command


def run_search(recipe: Recipe, documents: list[str], out_dir: Path, settings: SearchSettings,
               log: Callable[[str], None] = print) -> SearchResult:
    """Search factors for the recipe's base and target; write the results into `out_dir`."""
    from pi_lora.model.loading import load_config

    config = load_config(recipe.model)
    # a checkpoint with its own LongRoPE factors (Phi-4-mini) is planned as longrope: its
    # long factors scaled to the target seed the search, its short_factor is kept
    existing = detect_existing(config)
    own = existing is not None and existing.rope_type == "longrope"
    plan = plan_rope(RopeSection(method="longrope" if own else "linear",
                                 target_context=recipe.rope.target_context,
                                 original_context=recipe.rope.original_context), config)
    pairs, scale, original = plan.rotary_dim // 2, plan.factor, plan.original_context
    seeds = {
        "linear PI": snap(pi_factors(pairs, scale), scale),
        "YaRN": snap(yarn_factors(pairs, scale, plan.rope_theta, original,
                                  recipe.rope.yarn.beta_fast, recipe.rope.yarn.beta_slow), scale),
        "NTK-aware": snap(ntk_factors(pairs, scale), scale),
    }
    if own:
        seeds["checkpoint's own, scaled"] = snap(plan.rope_parameters["long_factor"], scale)
    short = plan.rope_parameters.get("short_factor") or [1.0] * pairs
    model = load_model(recipe.model, None, dtype="fp32").eval()
    tokenizer = load_tokenizer(recipe.model)
    samples = held_out_samples(tokenizer, documents, plan.target_context, settings.samples)
    fitness = Fitness(model, samples, original, scale)
    baselines = {name: fitness(curve) for name, curve in seeds.items()}
    log(f"pi-lora search: {pairs} pairs, x{scale:g} ({original} -> {plan.target_context}), "
        f"{len(samples)} sample(s) of {plan.target_context} tokens; start: "
        + ", ".join(f"{k} ppl {v:.3f}" for k, v in baselines.items()))
    started = time.time()

    def progress(record: dict[str, float]) -> None:
        log(f"generation {record['generation']:.0f}/{settings.generations}: best ppl "
            f"{record['best']:.4f}, mean {record['mean']:.4f} ({record['seconds']:.0f} s)")

    best, best_fitness, history = search(fitness, seeds, scale, settings, progress)
    result = SearchResult(original, plan.target_context, scale, best, fitness.attention,
                          best_fitness, baselines, history, len(fitness.cache),
                          time.time() - started)
    _write(out_dir, result, seeds, settings, recipe, short)
    return result


def _write(out: Path, result: SearchResult, seeds: dict[str, list[float]],
           settings: SearchSettings, recipe: Recipe, short_factor: list[float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_factors_file(out / "factors.json", {
        "model": recipe.model.name, "original_context": result.original_context,
        "target_context": result.target_context, "long_factor": result.long_factor,
        "short_factor": short_factor,
        "attention_factor": result.attention_factor, "perplexity": result.fitness,
        "baselines": result.baselines, "evaluations": result.evaluations,
        "seconds": result.seconds, "settings": asdict(settings)})
    with (out / "search_log.jsonl").open("w") as f:
        for record in result.history:
            f.write(json.dumps(record) + "\n")
    from pi_lora.eval.plots import plot_factors, plot_search

    plot_search(result.history, result.baselines, out / "fitness.png")
    plot_factors({**seeds, "searched": result.long_factor}, out / "factors.png")
