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
from pi_lora.model import compute_4bit_as_trained, load_model, load_tokenizer
from pi_lora.recipe import DType, Recipe
from pi_lora.release import (
    MERGE_REPORT_FILE,
    PROVENANCE_FILE,
    RELEASE_RECIPE_FILE,
    model_card,
    release_provenance,
)
from pi_lora.rope import RopePlan
from pi_lora.rundir import RunDir, apply_extras

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
    plan = RopePlan.from_dict(facts["rope"])
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


def _merge_into(tmp: Path, run: RunDir, recipe: Recipe, plan: RopePlan, facts: dict[str, Any],
                release_dtype: DType, probe_tokens: int | None, started: float) -> MergeReport:
    from peft import PeftModel

    work_dtype = _work_dtype(facts, release_dtype)
    base = _merge_base(recipe, plan, work_dtype)
    apply_extras(base, run.extras_path)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    model.eval()
    probe = _probe_ids(base.config, plan, probe_tokens)
    with torch.no_grad():
        reference = model(probe).logits.float()
    merged = model.merge_and_unload(safe_merge=True)
    merged = merged.to(TORCH_DTYPES[release_dtype])
    _save_release(merged, tmp, recipe, plan, facts, release_dtype, run)
    del merged, model, base
    quantized = _quantized_logits(recipe, plan, run, probe, work_dtype)
    return _verify(tmp, probe, reference, release_dtype, started, quantized)


def _merge_base(recipe: Recipe, plan: RopePlan, work_dtype: DType) -> Any:
    """The weights the adapter was trained against, unquantized, in the working dtype.

    A QLoRA adapter corrects the 4/8-bit weights, so it is folded into those weights
    dequantized (never into the packed ones, and not into the original full-precision
    weights, which the adapter never saw).
    """
    if recipe.model.quantization is None:
        return load_model(recipe.model, plan, dtype=work_dtype, quantize=False)
    quantized = load_model(recipe.model, plan, dtype=work_dtype)
    return quantized.dequantize(dtype=TORCH_DTYPES[work_dtype])


def _quantized_logits(recipe: Recipe, plan: RopePlan, run: RunDir, probe: torch.Tensor,
                      work_dtype: DType) -> torch.Tensor | None:
    """Probe logits of the model as trained (quantized base + extras + adapter)."""
    if recipe.model.quantization is None:
        return None
    from peft import PeftModel

    base = load_model(recipe.model, plan, dtype=work_dtype)
    compute_4bit_as_trained(base)  # not bf16 activations, which the release never computes
    apply_extras(base, run.extras_path)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(probe).logits.float()


def _work_dtype(facts: dict[str, Any], release_dtype: DType) -> DType:
    """Merge in fp32 when it fits in half the RAM: the verification then sees only rounding."""
    total = int(facts.get("total_parameters") or 0)
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


def _save_release(model: Any, out: Path, recipe: Recipe, plan: RopePlan, facts: dict[str, Any],
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
