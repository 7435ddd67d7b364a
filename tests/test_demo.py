"""The demo: its corpus, base fixture, passkey documents, recipes, and (slow) the whole run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pi_lora.demo import run as demo_run
from pi_lora.demo.base import BaseSpec, make_config, train_tokenizer
from pi_lora.demo.corpus import EVAL_PLAYS, load_plays, markdown_to_text, split_plays
from pi_lora.demo.passkey import passkey_document, passkey_text
from pi_lora.eval.passkey import SEPARATOR, build_prompt
from pi_lora.recipe.loading import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "demo"


@pytest.fixture(scope="module")
def tokenizer():
    train, _ = split_plays(load_plays())
    return train_tokenizer([play.text for play in train[:4]], vocab_size=2048)


def test_corpus_holds_out_the_eval_plays():
    plays = load_plays()
    train, held_out = split_plays(plays)
    assert len(plays) == 38
    assert sorted(p.name for p in held_out) == sorted(EVAL_PLAYS)
    assert not {p.name for p in train} & set(EVAL_PLAYS)


def test_markdown_to_text_strips_markup():
    text = markdown_to_text("# Hamlet\n\n**HAMLET**  \nTo be, or _not_ to be\n")
    assert text == "Hamlet\n\nHAMLET.\nTo be, or not to be\n"


def test_tokenizer_adds_bos_and_splits_digits(tokenizer):
    ids = tokenizer("key 12345")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids)[-5:] == list("12345")


@pytest.mark.parametrize("length", [80, 128, 256, 1024])
def test_passkey_document_has_the_length_and_ends_with_the_answer(tokenizer, length):
    ids = passkey_document(tokenizer, length, random.Random(length))
    assert len(ids) == length
    text = tokenizer.decode(ids, skip_special_tokens=True)
    key = text.split("The pass key is ")[1][:5]
    assert text.endswith(f"What is the pass key? The pass key is {key}.")


def test_training_documents_are_laid_out_like_the_evaluator_prompts(tokenizer):
    """The base must learn the skill the evaluator measures: same text up to the answer."""
    prompt = build_prompt(tokenizer, 300, 0.4, "31415")
    _, before, _, after, _ = prompt.text.split(SEPARATOR)
    document = passkey_text("31415", len(before.split()), len(after.split()))
    assert document == prompt.text + " 31415."


def test_base_config_has_the_short_window(tokenizer):
    config = make_config(BaseSpec(), tokenizer)
    assert config.max_position_embeddings == 256
    assert config.rope_parameters["rope_type"] == "default"


@pytest.mark.parametrize(
    ("stem", "method"),
    [("linear", "linear"), ("yarn", "yarn"), ("direct", "none"), ("linear-short-mix", "linear"),
     ("linear-pose", "linear"), ("yarn-pose", "yarn"), ("direct-pose", "none")],
)
def test_demo_recipes_validate(stem, method):
    recipe = load_recipe(RECIPES / f"{stem}.yaml")
    assert recipe.rope.method == method
    assert recipe.rope.target_context == demo_run.TARGET_CONTEXT
    assert recipe.output_dir.endswith(stem)
    pose = stem.endswith("-pose")
    assert (recipe.data.pose is not None) == pose
    assert recipe.seq_len == (demo_run.TRAINED_CONTEXT if pose else demo_run.TARGET_CONTEXT)


def test_recipes_share_the_step_budget():
    recipes = [load_recipe(RECIPES / f"{stem}.yaml") for stem, _ in demo_run.FINE_TUNES]
    steps = {recipe.training.max_steps for recipe in recipes}
    assert len(steps) == 1


def test_table_renders_a_report():
    target = {
        "label": "base (plain RoPE)",
        "perplexity": {"by_length": {"256": {"ppl": 9.5, "seconds": 1.0}}},
        "passkey": {"accuracy_by_length": {"256": 0.9, "512": 0.1}, "k_max": 256,
                    "seconds_by_length": {"256": 2.0, "512": 3.0}},
    }
    text = demo_run.table({"targets": [target]}, {})
    assert "| base (plain RoPE) | 9.50 | 90% | 10% | 256 | - | 6 |" in text


def _by_label(report: dict) -> dict[str, dict]:
    return {target["label"]: target for target in report["targets"]}


def _ppl(target: dict, length: int) -> float:
    return target["perplexity"]["by_length"][str(length)]["ppl"]


def _pk(target: dict, length: int) -> float:
    return target["passkey"]["accuracy_by_length"][str(length)]


def test_quick_demo_shows_the_extension(tmp_path):
    """The orderings the full demo established (docs/demo.md); they break if rope scaling,
    merging or evaluation regress."""
    report = demo_run.run_demo(tmp_path, quick=True, rebuild_base=False)
    rows = _by_label(report)
    plain, untuned_pi = rows["base (plain RoPE)"], rows["base + linear x4 (untuned)"]
    untuned_yarn = rows["base + yarn x4 (untuned)"]
    tuned_pi, direct = rows["linear PI x4, fine-tuned"], rows["direct fine-tune at 4L (no interpolation)"]
    short, long = demo_run.TRAINED_CONTEXT, demo_run.TARGET_CONTEXT
    # the base has a window: it retrieves at L, not at 4L
    assert _pk(plain, short) >= 0.5 and _pk(plain, long) <= 0.1
    # untuned PI x4 compresses short distances: retrieval gone and perplexity worse at L
    assert _pk(untuned_pi, short) == 0.0
    assert _ppl(untuned_pi, short) > 1.5 * _ppl(plain, short)
    # YaRN leaves the fast rotary pairs alone: it retrieves at 4L without training
    assert _pk(untuned_yarn, long) > _pk(plain, long)
    # the PI fine-tune repairs perplexity at 4L; direct fine-tuning does not extend retrieval
    assert _ppl(tuned_pi, long) < min(_ppl(plain, long), _ppl(untuned_pi, long))
    assert _pk(direct, long) <= 0.1
    config = json.loads((tmp_path / "release" / "linear" / "config.json").read_text())
    scaling = config.get("rope_parameters") or config["rope_scaling"]
    assert scaling["rope_type"] == "linear" and scaling["factor"] == pytest.approx(4.0)
    assert config["max_position_embeddings"] == long
    assert (tmp_path / "report" / "report.md").is_file()
    assert (tmp_path / "demo.md").is_file()
