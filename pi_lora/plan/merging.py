"""RAM of `pi-lora merge` on the machine that holds the checkpoint (no GPU needed).

The merge streams (pi_lora.release.fold): resident at once are one release shard being filled, the
tensor being folded (read, upcast to fp32, its LoRA delta), the adapter and the trained extras
in fp32. The layer-by-layer check holds one decoder layer in fp32 and the probe's activations
for both halves; the whole-model check holds the fp32 model twice over (merge.full_check_bytes).
Validated against benchmarks/bench_merge.py (docs/merge.md has the table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pi_lora.plan.devices import GIB
from pi_lora.plan.memory import CPU_RUNTIME_BYTES
from pi_lora.plan.shape import ModelShape
from pi_lora.recipe.loading import Recipe

HUB_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size: what hub checkpoints use
RELEASE_SHARD_BYTES = 5 * 10**9  # pi-lora merge's default --max-shard-size
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# besides the runtime: safetensors/json buffers, the skeletons, glibc slack (bench_merge, 20M)
MERGE_SLACK_BYTES = 200 * 2**20


@dataclass(frozen=True)
class MergePlan:
    base_shard_bytes: int
    base_shard_source: str  # "measured in model.name" or "assumed (hub default)"
    fold_bytes: int  # peak of writing the release
    layers_check_bytes: int  # peak of the layer-by-layer check
    full_check_bytes: int  # RAM the whole-model check needs
    probe_tokens: int

    @property
    def peak_bytes(self) -> int:
        return max(self.fold_bytes, self.layers_check_bytes)

    @property
    def auto_full_below_ram(self) -> int:
        """`--verify auto` runs the whole-model check on machines with at least this RAM."""
        return 2 * self.full_check_bytes


def plan_merge(recipe: Recipe, shape: ModelShape, probe_tokens: int) -> MergePlan:
    """The merge's RAM for this recipe's model, on any machine (GPU or not)."""
    from pi_lora.release.merge_checks import full_check_bytes

    shard, source = _base_shard_bytes(recipe)
    out = DTYPE_BYTES[recipe.model.dtype]
    release_bytes = shape.total_params * out - shape.lora_params * out
    head = 0 if shape.tied else shape.vocab * shape.hidden
    largest = max(shape.embedding_params, head, shape.hidden * shape.intermediate)
    fixed = CPU_RUNTIME_BYTES + MERGE_SLACK_BYTES
    kept = shape.lora_params * 4 + shape.extras_params * 4
    # the shard being filled; the tensor read (stored dtype), its fp32 copy, its release cast
    fold = fixed + kept + min(RELEASE_SHARD_BYTES, release_bytes) + largest * (2 + 4 + 2)
    layer = (shape.total_params - shape.lora_params - shape.embedding_params - head) // max(
        shape.layers, 1)
    t = probe_tokens
    activations = 4 * t * (2 * 2 * shape.hidden + shape.intermediate * 3)  # both rows, MLP
    head_chunk = 2 * 4 * (8192 * shape.hidden + t * 8192)  # weights + logits, both halves
    check = fixed + kept + layer * 4 + max(shape.embedding_params * 4, head_chunk) + activations
    return MergePlan(shard, source, fold, check, full_check_bytes(shape.total_params), t)


def _base_shard_bytes(recipe: Recipe) -> tuple[int, str]:
    path = Path(recipe.model.name).expanduser()
    files = list(path.glob("*.safetensors")) if path.is_dir() else []
    if path.suffix == ".gguf" and path.is_file():
        files = [path]
    if files:
        return max(f.stat().st_size for f in files), f"measured in {path}"
    return HUB_SHARD_BYTES, "assumed: the hub's 5 GB shards"


def render_merge(plan: MergePlan) -> list[str]:
    return [
        "",
        "merge (pi-lora merge, host RAM; streams shard by shard, no GPU needed):",
        f"  writing the release      {plan.fold_bytes / GIB:8.2f} GiB   one 5 GB release shard, "
        "the tensor being folded, adapter + extras in fp32",
        f"  layer-by-layer check     {plan.layers_check_bytes / GIB:8.2f} GiB   one decoder layer "
        f"in fp32, {plan.probe_tokens:,}-token probe",
        f"  peak                     {plan.peak_bytes / GIB:8.2f} GiB   (base shards: "
        f"{plan.base_shard_bytes / GIB:.1f} GiB, {plan.base_shard_source})",
        f"  whole-model check needs  {plan.full_check_bytes / GIB:8.2f} GiB   `--verify auto` "
        f"uses it on machines with >= {plan.auto_full_below_ram / GIB:.0f} GiB RAM",
    ]


def merge_to_dict(plan: MergePlan) -> dict[str, Any]:
    from dataclasses import asdict

    return {**asdict(plan), "peak_bytes": plan.peak_bytes,
            "auto_full_below_ram": plan.auto_full_below_ram}
