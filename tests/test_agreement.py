"""`pi-lora plan` and `pi-lora train` make the same decisions for every shipped recipe: loss
path, attention path, per-layer attention window and global batch (8 GPUs and 4)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from pi_lora.model.known_models import config_for_planning
from pi_lora.model.loading import apply_sliding_window, attention_window, wrap_lora
from pi_lora.plan import get_device, plan_recipe
from pi_lora.recipe.loading import load_recipe
from pi_lora.train.sequence_parallel import data_parallel_size
from pi_lora.train.trainer import loss_route

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
SHIPPED = sorted(p for p in RECIPE_DIR.glob("*.yaml") if p.name != "tiny.yaml")


def _training_model(recipe, config):
    """The model train builds, on the meta device; a ZeRO-3 run's parameters carry ds_id."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = wrap_lora(AutoModelForCausalLM.from_config(config), recipe.lora,
                          gradient_checkpointing=False)
    if recipe.training.deepspeed and "zero3" in recipe.training.deepspeed:
        for param in model.parameters():
            param.ds_id = 0
    return model


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("gpus", [8, 4])
def test_plan_and_train_agree(path: Path, gpus: int) -> None:
    recipe = load_recipe(path)
    if gpus % recipe.training.sequence_parallel:  # both commands refuse it (own test)
        pytest.skip(f"sequence_parallel {recipe.training.sequence_parallel} needs a multiple")
    config, _ = config_for_planning(recipe)
    plan = plan_recipe(recipe, get_device("h100-80gb"), gpus=gpus)
    setup = plan.setup

    groups = data_parallel_size(recipe.training, gpus)  # as train counts them (SP groups)
    assert setup.batch * setup.grad_accum * groups == recipe.training.global_batch(groups)
    trained = copy.deepcopy(config)
    apply_sliding_window(trained, recipe.model)
    assert plan.shape.attention_window == attention_window(trained)
    chunked, _ = loss_route(_training_model(recipe, trained), recipe.training.chunked_loss)
    assert setup.chunked_loss == chunked
    if recipe.training.s2_attn:  # S2-Attn runs on sdpa: no FA2 credit, no FA2 advice
        assert setup.attn != "flash_attention_2"
        assert "FlashAttention-2" not in {r.name for r in plan.recommendations}
