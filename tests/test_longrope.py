"""rope method `longrope`: factor checks, search operators, the search on the demo base, and a
longrope run that trains, merges and reloads in plain transformers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.longrope_factors import (
    check_factors,
    crossover,
    mutate,
    ntk_factors,
    snap,
    write_factors_file,
    yarn_factors,
)
from pi_lora.model.rope import plan_rope
from pi_lora.recipe.loading import LongropeOptions, RopeSection

DEMO_BASE = Path(__file__).resolve().parents[1] / "pi_lora" / "demo" / "base"


def _section(**longrope) -> RopeSection:
    return RopeSection(method="longrope", target_context=512,
                       longrope=LongropeOptions(**longrope))


def test_factor_checks_name_what_is_wrong(tiny_models, tmp_path: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_models("llama"))  # head_dim 16: 8 pairs
    with pytest.raises(PiLoraError, match="has 3 values; this model has 8"):
        plan_rope(_section(long_factor=[1.0, 2.0, 4.0]), config)
    with pytest.raises(PiLoraError, match="decreases at pair 2"):
        plan_rope(_section(long_factor=[1, 2, 1.5, 3, 4, 4, 4, 4]), config)
    with pytest.raises(PiLoraError, match="below 1"):
        plan_rope(_section(long_factor=[0.5] + [4.0] * 7), config)
    with pytest.raises(PiLoraError, match="pi-lora search"):
        plan_rope(_section(), config)
    file = tmp_path / "factors.json"
    write_factors_file(file, {"original_context": 128, "target_context": 1024,
                              "long_factor": [4.0] * 8})
    with pytest.raises(PiLoraError, match="target_context 1024, this recipe has 512"):
        plan_rope(_section(factors=str(file)), config)
    with pytest.raises(PiLoraError, match="both"):
        plan_rope(_section(factors=str(file), long_factor=[4.0] * 8), config)
    plan = plan_rope(_section(long_factor=[1, 1.5, 2, 2.5, 3, 3.5, 4, 4]), config)
    params = plan.rope_parameters
    assert params["rope_type"] == "longrope" and params["short_factor"] == [1.0] * 8
    assert params["original_max_position_embeddings"] == 128
    assert params["attention_factor"] == pytest.approx((1 + torch.log(torch.tensor(4.0)).item()
                                                        / torch.log(torch.tensor(128.0)).item()) ** 0.5)


def test_operators_keep_candidates_on_the_grid_and_monotone() -> None:
    rng = random.Random(0)
    parent = snap(ntk_factors(16, 8.0), 8.0)
    others = [snap(yarn_factors(16, 8.0, 10000.0, 2048), 8.0), [8.0] * 16]
    rejected = 0
    for _ in range(500):
        child = mutate(parent, 8.0, rng)
        assert child == sorted(child) and child[0] >= 1.0 and child[-1] <= 8.0
        assert all(abs(v * 100 - round(v * 100)) < 1e-6 for v in child)
        crossed = crossover(child, rng.choice(others), rng)
        if crossed is None:
            rejected += 1
        else:
            assert crossed == sorted(crossed)
        parent = child
    assert check_factors(parent, 16, "f", monotone=True) == parent
    assert rejected < 500


def test_known_curves_match_transformers_frequencies() -> None:
    """YaRN's and NTK's per-pair factors reproduce transformers' own inverse frequencies."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    def inv_freq(params: dict, max_pos: int = 2048) -> torch.Tensor:
        config = LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=max_pos,
                             rope_parameters=params)
        kind = params["rope_type"]
        function = ROPE_INIT_FUNCTIONS[kind] if kind != "default" else None
        if function is None:
            return 1.0 / (params["rope_theta"] ** (torch.arange(0, 64, 2).float() / 64))
        return function(config, "cpu")[0]

    base = inv_freq({"rope_type": "default", "rope_theta": 10000.0})
    yarn = inv_freq({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                     "original_max_position_embeddings": 2048, "beta_fast": 32.0,
                     "beta_slow": 1.0})
    ours = base / torch.tensor(yarn_factors(32, 8.0, 10000.0, 2048))
    torch.testing.assert_close(ours, yarn, rtol=1e-5, atol=0)
    ntk = 1.0 / ((10000.0 * 8.0 ** (64 / 62)) ** (torch.arange(0, 64, 2).float() / 64))
    torch.testing.assert_close(base / torch.tensor(ntk_factors(32, 8.0)), ntk,
                               rtol=1e-4, atol=0)


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pi_lora.demo.corpus import EVAL_PLAYS, load_plays

    play = next(p for p in load_plays() if p.name == EVAL_PLAYS[1])
    path = tmp_path_factory.mktemp("heldout") / f"{play.name}.txt"
    path.write_text(play.text)
    return path


def test_search_lowers_perplexity_and_feeds_longrope(held_out: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from pi_lora.eval.perplexity import score_window
    from pi_lora.model.loading import load_tokenizer
    from pi_lora.model.rope import apply_rope
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.search.longrope import Fitness, SearchSettings, held_out_samples, run_search

    recipe_path = Path(__file__).resolve().parents[1] / "pi_lora" / "recipes" / "demo" / "linear.yaml"
    recipe = load_recipe(recipe_path, [f"model.name={DEMO_BASE}", f"data.files=[{held_out}]"])
    settings = SearchSettings(population=12, generations=4, mutations=6, crossovers=6,
                              parents=6, samples=1)
    result = run_search(recipe, [held_out.read_text()], tmp_path / "s", settings,
                        log=lambda _: None)
    assert result.fitness < min(result.baselines.values())  # better than every start curve
    bests = [h["best"] for h in result.history]
    assert bests == sorted(bests, reverse=True)  # elitism: never worse
    for name in ("factors.json", "search_log.jsonl", "fitness.png", "factors.png"):
        assert (tmp_path / "s" / name).is_file()
    # the factors file drives transformers' own longrope to the same perplexity
    factors = tmp_path / "s" / "factors.json"
    config = AutoConfig.from_pretrained(DEMO_BASE)
    plan = plan_rope(RopeSection(method="longrope", target_context=1024,
                                 longrope=LongropeOptions(factors=str(factors))), config)
    model = AutoModelForCausalLM.from_pretrained(DEMO_BASE, config=apply_rope(config, plan))
    (sample,) = held_out_samples(load_tokenizer(recipe.model), [held_out.read_text()], 1024, 1)
    nll, count = score_window(model.eval(), sample.unsqueeze(0), 1)
    assert torch.exp(torch.tensor(nll / count)).item() == pytest.approx(result.fitness, rel=1e-4)
    assert json.loads(factors.read_text())["target_context"] == 1024
    fitness = Fitness(AutoModelForCausalLM.from_pretrained(DEMO_BASE).eval(), [sample], 256, 4.0)
    assert fitness(result.long_factor) == pytest.approx(result.fitness, rel=1e-6)


def test_longrope_run_trains_merges_and_reloads(tiny_models, write_recipe, tmp_path: Path) -> None:
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.release.merge import merge_run
    from pi_lora.train.assembly import train

    factors = [1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    path = write_recipe(tiny_models("llama"), rope={"method": "longrope", "target_context": 512,
                                                    "longrope": {"long_factor": factors}},
                        training={"max_steps": 2, "save_steps": 2})
    run = train(load_recipe(path))
    report = merge_run(run, tmp_path / "rel", verify="layers")
    assert report.relative_diff <= report.tolerance and report.probe_tokens > 128
    config = json.loads((tmp_path / "rel" / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["long_factor"] == factors


def test_eval_reads_the_target_from_the_factors_file(tmp_path: Path) -> None:
    from pi_lora.eval.targets import RopeSpec

    file = tmp_path / "factors.json"
    write_factors_file(file, {"original_context": 256, "target_context": 1024,
                              "long_factor": [4.0] * 32})
    spec = RopeSpec.parse(f"longrope:{file}")
    assert (spec.method, spec.target_context, spec.factors) == ("longrope", 1024, str(file))
    with pytest.raises(PiLoraError, match="not a factors file"):
        RopeSpec.parse(f"longrope:{tmp_path / 'missing.json'}")
