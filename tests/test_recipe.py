"""Recipe schema, inheritance, overrides and the error messages users see."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError, RecipeErrors
from pi_lora.recipe.loading import Recipe, deep_merge, load_recipe

RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("**/*.yaml"))
CONCRETE = [p for p in RECIPES if "base" not in p.parts]


@pytest.mark.parametrize("path", CONCRETE, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe


def test_flagship_validate_prints_factor_offline(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    assert main(["validate", str(root / "recipes/llama2-13b-16k.yaml")]) == 0
    out = capsys.readouterr().out
    assert "factor: 4 (4096 -> 16384)" in out
    assert "max_position_embeddings: 16384" in out
    assert "trainable parameters:" in out


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BASE = {"model": {"name": "org/model"}, "rope": {"method": "linear", "target_context": 8192},
        "data": {"files": ["x.txt"]}, "output_dir": "runs/x"}


def test_misspelled_key_exits_2_with_did_you_mean(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bad = deep_merge(BASE, {"training": {"lerning_rate": 1e-4}})
    code = main(["validate", str(_write(tmp_path, bad))])
    err = capsys.readouterr().err
    assert code == 2
    assert "training.lerning_rate" in err and "did you mean 'learning_rate'" in err
    assert "Traceback" not in err


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    bad = deep_merge(BASE, {"rope": {"method": "pi", "target_contxt": 3},
                            "lora": {"r": -1}, "training": {"max_steps": 0}})
    with pytest.raises(RecipeErrors) as info:
        load_recipe(_write(tmp_path, bad))
    fields = {e.field for e in info.value.errors}
    assert {"rope.method", "rope.target_contxt", "lora.r", "training.max_steps"} <= fields


def test_missing_sections_and_no_data(tmp_path: Path) -> None:
    with pytest.raises(RecipeErrors) as info:
        load_recipe(_write(tmp_path, {"output_dir": "x"}))
    assert {"model", "rope"} <= {e.field for e in info.value.errors}
    no_data = {k: v for k, v in BASE.items() if k != "data"}
    with pytest.raises(RecipeErrors) as info:
        load_recipe(_write(tmp_path, no_data))
    assert [e.field for e in info.value.errors] == ["data"]


def test_extends_deep_merges_and_set_overrides(tmp_path: Path) -> None:
    _write(tmp_path, {**BASE, "training": {"max_steps": 50, "learning_rate": 1e-4}}, "base.yaml")
    child = _write(tmp_path, {"extends": "base.yaml", "training": {"max_steps": 7}}, "child.yaml")
    recipe = load_recipe(child, ["rope.target_context=16384", "lora.trainable_extras=[norms]"])
    assert recipe.training.max_steps == 7
    assert recipe.training.learning_rate == 1e-4
    assert recipe.rope.target_context == 16384
    assert recipe.lora.trainable_extras == ["norms"]
    assert Recipe.model_validate(yaml.safe_load(recipe.to_yaml())) == recipe


def test_extends_cycle_and_missing_parent(tmp_path: Path) -> None:
    _write(tmp_path, {"extends": "b.yaml"}, "a.yaml")
    _write(tmp_path, {"extends": "a.yaml"}, "b.yaml")
    with pytest.raises(PiLoraError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(PiLoraError, match="not found"):
        load_recipe(_write(tmp_path, {"extends": "nope.yaml"}, "c.yaml"))


def test_bad_yaml_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    assert main(["validate", str(path)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cross_section_checks(tmp_path: Path) -> None:
    bad = deep_merge(BASE, {"data": {"seq_len": 9000},
                            "training": {"deepspeed": "zero9"}})
    with pytest.raises(RecipeErrors) as info:
        load_recipe(_write(tmp_path, bad))
    fields = {e.field for e in info.value.errors}
    assert {"data.seq_len", "training.deepspeed"} <= fields


def test_unsafe_yaml_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(PiLoraError, match="not valid YAML"):
        load_recipe(path)


def test_a_stream_cannot_short_mix(tmp_path: Path) -> None:
    bad = deep_merge(BASE, {"data": {"streaming": True,
                                     "short_mix": {"seq_len": 1024, "fraction": 0.3}}})
    with pytest.raises(RecipeErrors) as info:
        load_recipe(_write(tmp_path, bad))
    assert [e.field for e in info.value.errors] == ["data.short_mix"]


def test_cross_section_errors_come_with_the_schema_errors(tmp_path: Path) -> None:
    """One pass shows every problem: a schema error elsewhere does not hide these."""
    bad = deep_merge(BASE, {"lora": {"r": -1}, "data": {"seq_len": 20000},
                            "training": {"deepspeed": "zero9"}})
    with pytest.raises(RecipeErrors) as info:
        load_recipe(_write(tmp_path, bad))
    assert {e.field for e in info.value.errors} == {"lora.r", "data.seq_len", "training.deepspeed"}


def test_global_batch_follows_the_process_count(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The paper's global batch 64 on any GPU count that divides it; plan shows it."""
    recipe = load_recipe(RECIPE_DIR / "llama2-13b-16k.yaml")
    training = recipe.training
    assert [training.accumulation_steps(n) for n in (1, 4, 8, 16)] == [64, 16, 8, 4]
    assert {training.global_batch(n) for n in (1, 4, 8, 16)} == {64}
    with pytest.raises(PiLoraError, match="not a multiple") as info:
        training.accumulation_steps(3)
    assert info.value.field == "training.global_batch_size"
    assert main(["plan", str(RECIPE_DIR / "llama2-13b-16k.yaml"), "--gpus", "4"]) == 0
    assert "accumulation 16, global batch 64" in capsys.readouterr().out
    assert main(["plan", str(RECIPE_DIR / "llama2-13b-16k.yaml"), "--gpus", "3"]) == 2
    both = deep_merge(BASE, {"training": {"global_batch_size": 64,
                                          "gradient_accumulation_steps": 8}})
    with pytest.raises(RecipeErrors) as errors:
        load_recipe(_write(tmp_path, both))
    assert [e.field for e in errors.value.errors] == ["training.gradient_accumulation_steps"]
    # the copy a run directory keeps loads back (it once wrote both and failed at train end)
    copy = tmp_path / "copy.yaml"
    copy.write_text(recipe.to_yaml())
    assert load_recipe(copy).training == training


def test_shipped_recipes_attend_over_their_target(capsys: pytest.CaptureFixture[str]) -> None:
    """validate states every shipped recipe's per-layer attention reach; none is capped
    below its target by a sliding window it forgot (Mistral-7B-v0.1: 4096)."""
    for path in RECIPES:
        if path.parent.name in ("base", "demo") or path.name == "tiny.yaml":
            continue
        assert main(["validate", str(path)]) == 0
        out = capsys.readouterr().out
        assert "attention window per layer:" in out and "below the target" not in out, path.name
