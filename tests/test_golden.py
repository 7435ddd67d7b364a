"""The tiny recipe's first 10 losses, pinned at rtol 1e-5 (torchtune's recipe tests do this).

"The loss went down" cannot catch a dependency upgrade or a refactor that changes the numbers;
these values can. If a deliberate change moves them (a new default, a new torch), re-pin them
from the printed values and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi_lora.recipe.loading import load_recipe
from pi_lora.testing import build_tiny
from pi_lora.train.assembly import train

RECIPE = Path(__file__).resolve().parents[1] / "pi_lora" / "recipes" / "tiny.yaml"

# metrics.jsonl losses, steps 1-10 of recipes/tiny.yaml (logging_steps 1), torch 2.13.0 CPU;
# the same with 1 and 2 threads (AMD EPYC, AVX2)
GOLDEN_LOSSES = [5.956460, 5.937427, 5.848352, 5.647842, 5.449058,
                 5.281065, 5.095973, 4.967724, 4.835730, 4.730065]


def tiny_losses(root: Path, steps: int = 10) -> list[float]:
    """Train the shipped tiny recipe on the model and corpus `make tiny` builds; its losses."""
    model, corpus = build_tiny(root)
    recipe = load_recipe(RECIPE, [f"model.name={model}", f"data.files=[{corpus}]",
                                  f"data.cache_dir={root / 'cache'}", f"output_dir={root / 'run'}",
                                  f"training.max_steps={steps}", "training.logging_steps=1",
                                  f"training.save_steps={steps}"])
    run = Path(train(recipe))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_the_tiny_recipe_trains_to_the_pinned_losses(tmp_path: Path) -> None:
    losses = tiny_losses(tmp_path)
    assert len(losses) == 10, losses
    assert losses == pytest.approx(GOLDEN_LOSSES, rel=1e-5), f"now: {losses}"
