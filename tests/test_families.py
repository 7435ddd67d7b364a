"""The current families, each with its rope twist in miniature (pi_lora.testing.CURRENT_FAMILIES):
the plan starts from the true pretraining window, training and merge run, and the release's
config.json read by plain transformers gives the rope each family must have, with logits equal
to the trained model's past the original window."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.known_models import known_config
from pi_lora.model.rope import plan_rope, yarn_temperature
from pi_lora.recipe.loading import RopeSection, load_recipe
from pi_lora.release.merge import merge_run
from pi_lora.run.finished import Run
from pi_lora.run.trained import load_trained
from pi_lora.testing import CURRENT_FAMILIES, make_tiny_family, tiny_config
from pi_lora.train.assembly import train

FAMILIES = sorted(CURRENT_FAMILIES)


def _plain(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _rotary(model: Any) -> Any:
    return next(m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding"))


def _llama3(plain: torch.Tensor, factor: float, original: int) -> torch.Tensor:
    """Meta's llama3 frequencies (low 1, high 4), written out: one scaling from `original`."""
    wavelen = 2 * math.pi / plain
    smooth = (original / wavelen - 1.0) / (4.0 - 1.0)
    mid = (1 - smooth) * plain / factor + smooth * plain
    return torch.where(wavelen < original / 4.0, plain,
                       torch.where(wavelen > original, plain / factor, mid))


def _check_release_rope(name: str, release: Path, base_dir: Path) -> None:
    """What transformers builds from the release's config.json, against each family's rule."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    spec = CURRENT_FAMILIES[name]
    written = json.loads((release / "config.json").read_text())
    config = AutoConfig.from_pretrained(str(release))
    base = json.loads((base_dir / "config.json").read_text())
    assert config.max_position_embeddings == spec.target_context
    model = AutoModelForCausalLM.from_pretrained(str(release))
    rotary = _rotary(model)
    factor = spec.target_context / spec.original_context
    if name == "llama3.1":  # llama3 x8 from 64: never x4 then x8
        assert config.rope_parameters["factor"] == factor == 8.0
        assert config.rope_parameters["original_max_position_embeddings"] == 64
        torch.testing.assert_close(rotary.inv_freq, _llama3(_plain(5e5, 16), 8.0, 64))
    elif name == "qwen3":  # YaRN x8 from 32 (its card's x4 continued)
        assert config.rope_parameters["rope_type"] == "yarn"
        assert config.rope_parameters["factor"] == factor == 8.0
        assert config.rope_parameters["original_max_position_embeddings"] == 32
        assert rotary.attention_scaling == pytest.approx(yarn_temperature(8.0))
    elif name == "gemma3":  # only the global layers: linear x16; the local ones untouched
        full = {k: v for k, v in config.rope_parameters["full_attention"].items() if k != "type"}
        assert full == {"rope_type": "linear", "factor": 16.0, "rope_theta": 1e6}
        assert config.rope_parameters["sliding_attention"] == base["rope_parameters"][
            "sliding_attention"]
        assert config.sliding_window == 16 and config.layer_types == base["layer_types"]
        torch.testing.assert_close(rotary.full_attention_inv_freq, _plain(1e6, 32) / 16)
        torch.testing.assert_close(rotary.sliding_attention_inv_freq, _plain(1e4, 32))
        assert written["rope_local_base_freq"] == 1e4 and written["rope_theta"] == 1e6
    elif name == "phi4":  # its short factors kept, long factors x2, 6 rotary pairs
        own = base["rope_parameters"]
        params = config.rope_parameters
        assert params["short_factor"] == own["short_factor"]
        assert params["long_factor"] == pytest.approx([f * 2 for f in own["long_factor"]])
        assert config.original_max_position_embeddings == 32
        long, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=200)
        short, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=16)
        expected = _plain(1e4, 12)
        torch.testing.assert_close(long, expected / torch.tensor(params["long_factor"]))
        torch.testing.assert_close(short, expected / torch.tensor(own["short_factor"]))
        assert attention == pytest.approx(math.sqrt(1 + math.log(8) / math.log(32)))
    elif name == "mistral-nemo":  # head_dim 32 (not 64 / 4): 16 frequencies, YaRN x2
        assert config.head_dim == 32 and rotary.inv_freq.shape == (16,)
        assert config.rope_parameters["factor"] == 2.0
        assert config.rope_parameters["original_max_position_embeddings"] == 128
    # transformers 4 reads rope_scaling + rope_theta: the same scaling, mirrored
    flat = written["rope_parameters"].get("full_attention", written["rope_parameters"])
    assert written["rope_scaling"] == {**{k: v for k, v in flat.items() if k != "rope_theta"},
                                       "type": flat["rope_type"]}
    assert written["rope_theta"] == flat["rope_theta"]


@pytest.mark.parametrize("name", FAMILIES)
def test_family_plans_from_its_true_window(name: str, tmp_path: Path) -> None:
    from transformers import AutoConfig

    spec = CURRENT_FAMILIES[name]
    config = AutoConfig.from_pretrained(str(make_tiny_family(tmp_path / name, name)))
    plan = plan_rope(RopeSection(method=spec.method, target_context=spec.target_context),
                     config)  # type: ignore[arg-type]
    assert plan.original_context == spec.original_context
    assert plan.factor == spec.target_context / spec.original_context
    assert any(n.startswith("scaled layers:") for n in plan.notes)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_merges_and_reloads_with_its_rope(name: str, write_recipe,
                                                        tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    spec = CURRENT_FAMILIES[name]
    base_dir = make_tiny_family(tmp_path / "base", name)
    recipe = load_recipe(write_recipe(
        base_dir, rope={"method": spec.method, "target_context": spec.target_context},
        training={"max_steps": 2, "save_steps": 2}))
    run = train(recipe)
    report = merge_run(run, tmp_path / "release")
    assert report.probe_tokens > spec.original_context
    _check_release_rope(name, tmp_path / "release", base_dir)
    trained = load_trained(Run.open(run))
    release = AutoModelForCausalLM.from_pretrained(str(tmp_path / "release")).eval()
    ids = torch.randint(3, 300, (1, spec.target_context),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # every position, past the original window to the target
        torch.testing.assert_close(release(ids).logits, trained(ids).logits,
                                   atol=1e-4, rtol=1e-4)


def test_gemma3_validate_names_the_scaled_layers(capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora.cli import main

    root = Path(__file__).resolve().parent.parent
    assert main(["validate", str(root / "recipes/gemma3-1b-128k.yaml")]) == 0
    out = capsys.readouterr().out
    assert "scaled layers: 4 of 26 (full_attention: 5, 11, 17, 23)" in out
    assert "22 sliding_attention layers keep rope_theta 10000" in out
    assert "512 tokens on the sliding layers, whole context on the full_attention" in out


def test_llama31_every_method_starts_from_8192() -> None:
    """Llama 3.1 to 256k: each method measured from 8192, the llama3 x8 replaced, not stacked."""
    config = known_config("meta-llama/Llama-3.1-8B")
    for method in ("linear", "ntk", "dynamic", "yarn", "llama3"):
        plan = plan_rope(RopeSection(method=method, target_context=262144), config)
        assert plan.original_context == 8192 and plan.factor == 32.0, method
        assert plan.rope_parameters.get("factor", 32.0) == 32.0, method
    with pytest.raises(PiLoraError, match="twice"):
        plan_rope(RopeSection(method="linear", target_context=262144,
                              original_context=131072), config)


def test_known_windows_are_not_the_config_maximum() -> None:
    qwen = plan_rope(RopeSection(method="yarn", target_context=262144),
                     known_config("Qwen/Qwen3-8B"))
    assert (qwen.original_context, qwen.factor) == (32768, 8.0)
    nemo = known_config("mistralai/Mistral-Nemo-Base-2407")
    plan = plan_rope(RopeSection(method="yarn", target_context=262144), nemo)
    assert (plan.original_context, plan.factor, plan.rotary_dim) == (131072, 2.0, 128)


def test_phi4_mini_continues_its_longrope_and_refuses_others() -> None:
    config = known_config("microsoft/Phi-4-mini-instruct")
    plan = plan_rope(RopeSection(method="longrope", target_context=262144), config)
    params = plan.rope_parameters
    assert plan.rotary_dim == 96 and len(params["long_factor"]) == 48
    assert params["long_factor"][-1] == pytest.approx(47.77 * 2)
    assert params["short_factor"] == [1.0] * 48  # its own, never dropped
    with pytest.raises(PiLoraError, match="short_factor") as info:
        plan_rope(RopeSection(method="yarn", target_context=262144), config)
    assert info.value.field == "rope.method"


def test_image_text_checkpoints_are_refused() -> None:
    from transformers import AutoConfig

    composite = AutoConfig.for_model("gemma3", text_config=tiny_config("gemma3_text").to_dict())
    with pytest.raises(PiLoraError, match="image-text") as info:
        plan_rope(RopeSection(method="linear", target_context=262144), composite)
    assert info.value.field == "model.name" and "gemma3_text" in info.value.message


CURRENT = ("gemma3-1b-128k", "llama3.1-8b-256k", "mistral-nemo-12b-256k", "phi4-mini-256k",
           "qwen3-8b-256k")
ONE_CARD = ("gemma3-270m-64k-24gb", "llama3.2-1b-256k-24gb", "qwen3-0.6b-128k-24gb")


@pytest.mark.parametrize("name", CURRENT + ONE_CARD)
def test_current_family_recipes_fit_where_they_say(name: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Each family's recipe fits 8 x H100 (`h100` is the 80 GB card), or one 24 GB card."""
    import json

    from pi_lora.cli import main

    root = Path(__file__).resolve().parent.parent
    card = ["--gpu", "rtx4090", "--gpus", "1"] if name in ONE_CARD else ["--gpu", "h100", "--gpus", "8"]
    assert main(["plan", str(root / "recipes" / f"{name}.yaml"), *card, "--json"]) == 0
    out = capsys.readouterr().out
    plan = json.loads(out[out.index("{"):])
    assert plan["memory"]["verdict"] == "fits", (name, plan["memory"]["peak_bytes"])


def test_gemma3_plan_keeps_the_local_window(capsys: pytest.CaptureFixture[str]) -> None:
    """The local layers' 512-token window is Gemma 3's design, not a setting to fix."""
    from pi_lora.cli import main

    root = Path(__file__).resolve().parent.parent
    assert main(["plan", str(root / "recipes/gemma3-270m-64k-24gb.yaml"), "--gpu", "rtx4090"]) == 0
    out = capsys.readouterr().out
    assert "512 tokens in 15 local layers, whole context in 3 global layers" in out
    assert "set model.sliding_window" not in out
