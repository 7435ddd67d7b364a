"""`plan_recipe`: a recipe on a device -> `Plan` (shape, setup, memory, time, advice).

The parts live beside it (shape, setup, memory, compute, advice); render.py turns a `Plan`
into text or JSON, and the package `__init__` only re-exports.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from pi_lora.core.errors import PiLoraError
from pi_lora.plan.advice import SEQUENCE_PARALLEL, candidates
from pi_lora.plan.compute import TimePlan, plan_time
from pi_lora.plan.devices import Device
from pi_lora.plan.memory import MemoryPlan, plan_memory
from pi_lora.plan.merging import MergePlan, plan_merge
from pi_lora.plan.setup import Setup, setup_from_recipe
from pi_lora.plan.shape import ModelShape, model_shape
from pi_lora.recipe.loading import Recipe
from pi_lora.train.sequence_parallel import sequence_parallel_problems

FITS, FITS_WITH_OFFLOAD, DOES_NOT_FIT = "fits", "fits with offload", "does not fit"


@dataclass(frozen=True)
class Recommendation:
    name: str
    overrides: tuple[str, ...]
    why: str
    peak_bytes: int
    peak_delta_bytes: int
    step_seconds: float
    step_delta_seconds: float
    fits: bool


@dataclass
class Plan:
    recipe_name: str
    config_source: str
    device: Device
    shape: ModelShape
    setup: Setup
    memory: MemoryPlan
    time: TimePlan
    recommendations: list[Recommendation] = field(default_factory=list)
    merge: MergePlan | None = None

    @property
    def verdict(self) -> str:
        if not self.memory.fits:
            return DOES_NOT_FIT
        return FITS_WITH_OFFLOAD if self.setup.offload or self.setup.offload_checkpoints else FITS


def plan_recipe(recipe: Recipe, device: Device, *, gpus: int = 1, nodes: int = 1,
                config: Any = None, advise: bool = True) -> Plan:
    """Memory, time and recommendations for `recipe` on `gpus` x `nodes` of `device`."""
    source = "given"
    if config is None:
        config, source = _config(recipe)
    if gpus < 1 or nodes < 1:
        raise PiLoraError("--gpus and --nodes must be >= 1", fix="--gpus 8 --nodes 1")
    problems = sequence_parallel_problems(recipe, config)
    if problems:
        raise problems[0]
    shape = model_shape(recipe, config)
    plan = _plan(recipe, shape, device, gpus, nodes, source)
    if advise:
        plan.recommendations = _recommend(recipe, plan, gpus, nodes)
    plan.merge = plan_merge(recipe, shape, _probe_tokens(recipe, config))
    return plan


def _probe_tokens(recipe: Recipe, config: Any) -> int:
    """The merge check's default probe: 128 tokens past the original window."""
    from pi_lora.model.rope import plan_rope

    rope = plan_rope(recipe.rope, config)
    return min(rope.target_context, rope.original_context + 128)


def _config(recipe: Recipe) -> tuple[Any, str]:
    from pi_lora.model.known_models import config_for_planning

    config, source = config_for_planning(recipe)
    if config is None:
        raise PiLoraError(f"no config for {recipe.model.name}: {source}", field="model.name",
                          fix="download the model's config.json and point model.name at it")
    return config, source


def _plan(recipe: Recipe, shape: ModelShape, device: Device, gpus: int, nodes: int,
          source: str) -> Plan:
    setup = setup_from_recipe(recipe, gpus=gpus, nodes=nodes, device_kind=device.kind)
    if setup.chunked_loss and setup.zero_stage == 3 and shape.head_trainable:
        # as training does (pi_lora.train.trainer.loss_route): a sharded trainable head needs logits
        setup = dataclasses.replace(setup, chunked_loss=False)
    return Plan(recipe.output_dir, source, device, shape, setup,
                plan_memory(shape, setup, device), plan_time(shape, setup, device))


def _recommend(recipe: Recipe, plan: Plan, gpus: int, nodes: int) -> list[Recommendation]:
    found = []
    for candidate in candidates(recipe, plan.setup, plan.shape, plan.memory.fits):
        other = _plan(candidate.apply(recipe), plan.shape, plan.device, gpus, nodes, "")
        found.append(Recommendation(
            candidate.name, candidate.overrides, candidate.why, other.memory.peak_bytes,
            other.memory.peak_bytes - plan.memory.peak_bytes, other.time.step_seconds,
            other.time.step_seconds - plan.time.step_seconds, other.memory.fits))
    # what fits first, then the fastest
    return sorted(_smallest_sequence_parallel(found),
                  key=lambda r: (not r.fits, r.step_seconds, r.peak_bytes))


def _smallest_sequence_parallel(found: list[Recommendation]) -> list[Recommendation]:
    """Of the sequence-parallel sizes (ascending), the smallest that fits, else the largest:
    more devices per sequence only add all-to-all traffic once the slices fit."""
    sizes = [r for r in found if r.name.startswith(SEQUENCE_PARALLEL)]
    if len(sizes) <= 1:
        return found
    keep = next((r for r in sizes if r.fits), sizes[-1])
    return [r for r in found if r not in sizes or r is keep]

