"""Run directory -> release checkpoint that loads in plain transformers, verified.

Released long-context models that lost their rope scaling produced garbage (LongLoRA #181,
LLaMA-Factory #3370). So the release config carries the scaling, and before the directory
is published we reload it with plain `from_pretrained` and compare its logits with base +
adapter on a probe longer than the original window, where lost scaling would show.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pi_lora.dtypes import TORCH_DTYPES
from pi_lora.errors import PiLoraError
from pi_lora.model import load_tokenizer
from pi_lora.recipe import DType, Recipe
from pi_lora.release import (
    MERGE_REPORT_FILE,
    PROVENANCE_FILE,
    RELEASE_RECIPE_FILE,
    model_card,
    release_provenance,
)
from pi_lora.rope import RopePlan
from pi_lora.rundir import RunDir, RunFacts
from pi_lora.trained import load_trained

# max |logit difference| relative to max |logit|, by release dtype (rounding of merged weights)
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}


@dataclass
class MergeReport:
    release_dir: str
    dtype: str
    probe_tokens: int
    max_abs_diff: float
    max_abs_logit: float
    relative_diff: float
    tolerance: float
    top1_agreement: float
    seconds: float
    quantized_base: bool = False
    # release vs the quantized model as trained (QLoRA runs only)
    quantized_max_abs_diff: float | None = None
    quantized_top1_agreement: float | None = None


def merge_run(run_path: str | Path, output_dir: str | Path | None = None, *,
              dtype: DType | None = None, probe_tokens: int | None = None,
              overwrite: bool = False) -> MergeReport:
    """Fold adapter + extras into the base, write the release atomically, verify it."""
    started = time.time()
    run = RunDir(run_path)
    run.check_complete()
    recipe = run.load_recipe()
    facts = run.read_facts()
    plan = facts.rope_plan
    out = Path(output_dir) if output_dir else Path("release") / run.path.resolve().name
    release_dtype: DType = dtype or recipe.model.dtype
    _check_output(out, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        report = _merge_into(tmp, run, recipe, plan, facts, release_dtype, probe_tokens, started)
        report.release_dir = str(out)
        (tmp / MERGE_REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PiLoraError(f"{out} already exists", field="--output",
                          fix="choose another --output, or pass --overwrite")


def _merge_into(tmp: Path, run: RunDir, recipe: Recipe, plan: RopePlan, facts: RunFacts,
                release_dtype: DType, probe_tokens: int | None, started: float) -> MergeReport:
    work_dtype = _work_dtype(facts, release_dtype)
    model = load_trained(run, work_dtype, dequantize=True)
    probe = _probe_ids(model.config, plan, probe_tokens)
    with torch.no_grad():
        reference = model(probe).logits.float()
    merged = model.merge_and_unload(safe_merge=True)
    merged = merged.to(TORCH_DTYPES[release_dtype])
    _save_release(merged, tmp, recipe, plan, facts, release_dtype, run)
    del merged, model
    quantized = _quantized_logits(run, probe, work_dtype) if recipe.model.quantization else None
    return _verify(tmp, probe, reference, release_dtype, started, quantized)


def _quantized_logits(run: RunDir, probe: torch.Tensor, work_dtype: DType) -> torch.Tensor:
    """Probe logits of the model as trained (quantized base + extras + adapter)."""
    model = load_trained(run, work_dtype)
    with torch.no_grad():
        return model(probe).logits.float()


def _work_dtype(facts: RunFacts, release_dtype: DType) -> DType:
    """Merge in fp32 when it fits in half the RAM: the verification then sees only rounding."""
    total = facts.total_parameters
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 0
    return "fp32" if total and total * 4 * 2 < ram / 2 else release_dtype


def _probe_ids(config: Any, plan: RopePlan, probe_tokens: int | None) -> torch.Tensor:
    """Random tokens reaching past the original window, where rope scaling matters."""
    length = probe_tokens or min(plan.target_context, plan.original_context + 128)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, config.vocab_size, (1, length), generator=generator)


def _save_release(model: Any, out: Path, recipe: Recipe, plan: RopePlan, facts: RunFacts,
                  dtype: DType, run: RunDir) -> None:
    model.config.max_position_embeddings = plan.max_position_embeddings
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size="5GB")
    load_tokenizer(recipe.model).save_pretrained(str(out))
    _mirror_legacy_rope_scaling(out / "config.json", plan)
    shutil.copy(run.recipe_path, out / RELEASE_RECIPE_FILE)
    provenance = release_provenance(facts, dtype)
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card(recipe, plan, facts, dtype, provenance))


def _mirror_legacy_rope_scaling(config_path: Path, plan: RopePlan) -> None:
    """transformers < 5 reads `rope_scaling` + `rope_theta`; 5.x reads `rope_parameters`."""
    config = json.loads(config_path.read_text())
    params = dict(plan.rope_parameters)
    if params.get("rope_type", "default") != "default":
        config["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_theta"},
                                  "type": params["rope_type"]}
    config["rope_theta"] = params.get("rope_theta", plan.rope_theta)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _verify(out: Path, probe: torch.Tensor, reference: torch.Tensor, dtype: DType,
            started: float, quantized: torch.Tensor | None = None) -> MergeReport:
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(probe).logits.float()
    diff = (logits - reference).abs().max().item()
    scale = reference.abs().max().item() or 1.0
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    report = MergeReport(str(out), dtype, probe.shape[1], diff, scale, diff / scale,
                         RELATIVE_TOLERANCE[dtype], agreement, time.time() - started)
    if quantized is not None:  # stated, not enforced: the release is deliberately unquantized
        report.quantized_base = True
        report.quantized_max_abs_diff = (logits - quantized).abs().max().item()
        report.quantized_top1_agreement = (
            (logits.argmax(-1) == quantized.argmax(-1)).float().mean().item())
    if not (report.relative_diff <= report.tolerance) or not torch.isfinite(logits).all():
        raise PiLoraError(
            f"merged release disagrees with base + adapter: max |diff| {diff:.4g} "
            f"({report.relative_diff:.2%} of max |logit|, tolerance {report.tolerance:.2%})",
            field="RUN_DIR", fix="nothing was written; report this with the run directory")
    return report
