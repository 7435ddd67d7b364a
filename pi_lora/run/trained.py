"""One way to load what a run trained: the base as the run saw it (rope plan, quantization),
its trained extras, its LoRA adapter. Merge and eval both load through here."""

from __future__ import annotations

from typing import Any

from pi_lora.model.loading import compute_4bit_as_trained, load_model
from pi_lora.model.rope import RopePlan
from pi_lora.recipe.dtypes import torch_dtype
from pi_lora.recipe.loading import DType, Recipe
from pi_lora.run.directory import apply_extras
from pi_lora.run.finished import Run


def load_trained(run: Run, dtype: DType | None = None, *, dequantize: bool = False) -> Any:
    """A peft model (eval mode): base with the run's rope plan and extras, plus its adapter.

    A QLoRA run's base is 4-bit; `dequantize=True` gives the dequantized weights the adapter
    was trained against (what merge folds into), otherwise the 4-bit layers computing as
    they did in training.
    """
    from peft import PeftModel

    recipe, plan = run.recipe, run.plan
    work_dtype: DType = dtype or recipe.model.dtype
    if recipe.model.quantization is not None and dequantize:
        base = dequantized_base(recipe, plan, work_dtype)
    else:
        base = load_model(recipe.model, plan, dtype=work_dtype)
        compute_4bit_as_trained(base)
    apply_extras(base, run.extras)
    model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    model.eval()
    return model


def dequantized_base(recipe: Recipe, plan: RopePlan, dtype: DType) -> Any:
    """The 4/8-bit weights a QLoRA adapter corrects, unpacked to `dtype`.

    Never the packed weights (merging into them is lossy), and never the original
    full-precision weights, which the adapter never saw.
    """
    quantized = load_model(recipe.model, plan, dtype=dtype)
    return quantized.dequantize(dtype=torch_dtype(dtype))
