"""What other people's software reads from a run and a release: the adapter directory's
README (its code reproduces the release), a portable tokenizer config, a publishable card."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from pi_lora.model.rope import RopePlan
from pi_lora.recipe.loading import ModelSection, load_recipe
from pi_lora.release.merge import merge_run
from pi_lora.release.model_card import base_license, hub_id, serving_notes
from pi_lora.run.directory import RunDir
from pi_lora.run.finished import Run
from pi_lora.train.assembly import train


@pytest.fixture(scope="module")
def released(tiny_models, corpus: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[RunDir, Path]:
    import yaml

    root = tmp_path_factory.mktemp("release-files")
    model = tiny_models("llama", tie=True)
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    recipe = {
        "model": {"name": str(model), "dtype": "fp32"},
        "rope": {"method": "linear", "target_context": 256},
        "lora": {"r": 4, "alpha": 8, "trainable_extras": ["embeddings", "norms"]},
        "data": {"files": [str(corpus)], "cache_dir": str(root / "cache")},
        "training": {"max_steps": 4, "learning_rate": 1e-2, "warmup_steps": 0, "save_steps": 4,
                     "per_device_batch_size": 2, "precision": "fp32", "logging_steps": 1,
                     "report_to": "none", "seed": 0},
        "output_dir": str(root / "run"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run = RunDir(train(load_recipe(root / "recipe.yaml")))
    merge_run(run.path, root / "release")
    return run, root / "release"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_adapter_readme_code_reproduces_the_release(released) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, release = released
    readme = (run.adapter_dir / "README.md").read_text()
    assert "pi-lora merge" in readme and "not the whole model" in readme
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "adapter/README.md", "exec"), namespace)  # as a peft user would run it
    ids = torch.randint(0, 300, (1, 250), generator=torch.Generator().manual_seed(3))
    shipped = _logits(AutoModelForCausalLM.from_pretrained(str(release)), ids)
    torch.testing.assert_close(_logits(namespace["model"], ids), shipped, atol=1e-4, rtol=1e-4)
    # the trap the README prevents: the adapter on the plain base computes something else
    recipe = run.load_recipe()
    naive = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.name),
                                      str(run.adapter_dir))
    assert (_logits(naive, ids) - shipped).abs().max() > 1e-2


def test_adapter_base_config_carries_the_legacy_scaling(released) -> None:
    """transformers 4.x reads only `rope_scaling`: without it the README's code ran the adapter
    unscaled there (the client matrix measured 11.6 off in log-probabilities, docs/clients.md)."""
    run, release = released
    base = json.loads((run.adapter_dir / "base_config" / "config.json").read_text())
    shipped = json.loads((release / "config.json").read_text())
    assert base["rope_scaling"] == shipped["rope_scaling"] == {
        "rope_type": "linear", "factor": 2.0, "type": "linear"}
    assert base["rope_theta"] == shipped["rope_theta"]


def test_tokenizer_config_is_portable(released) -> None:
    from transformers import AutoTokenizer

    _, release = released
    config = json.loads((release / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # known to transformers 4.x
    assert config["model_max_length"] == 256
    assert "is_local" not in config and "local_files_only" not in config
    assert AutoTokenizer.from_pretrained(str(release)).model_max_length == 256


def test_model_card_is_publishable(released) -> None:
    _, release = released
    card = (release / "README.md").read_text()
    front = card.split("---")[1]
    assert "license: apache-2.0" in front
    assert "base_model" not in front  # a local path is not a hub id
    assert "extended to 256 tokens (linear rope scaling)" in card
    assert "--max-model-len 256" in card and "-c 256" in card


def test_hub_ids_and_licences(tmp_path: Path) -> None:
    assert hub_id(ModelSection(name="meta-llama/Llama-2-7b-hf")) == "meta-llama/Llama-2-7b-hf"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_id(ModelSection(name=str(snapshot))) == "org/name"
    assert hub_id(ModelSection(name=str(tmp_path))) is None
    assert base_license(ModelSection(name=str(tmp_path))) is None
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert base_license(ModelSection(name=str(tmp_path))) is None  # unreadable: left out


def test_dynamic_ntk_gets_a_serving_warning() -> None:
    plan = RopePlan("dynamic", 4096, "config", 16384, 4.0, 10000.0, 128,
                    {"rope_type": "dynamic", "factor": 4.0}, 16384)
    assert "does not survive" in serving_notes(plan)
    linear = RopePlan("linear", 4096, "config", 16384, 4.0, 10000.0, 128,
                      {"rope_type": "linear", "factor": 4.0}, 16384)
    assert "does not survive" not in serving_notes(linear)


def test_vllm_defaults_a_release_to_its_trained_window(released) -> None:
    """vLLM multiplies its length key by the rope factor (linear): unpinned, this x2 release
    would default to 512 tokens. transformers and llama.cpp read max_position_embeddings."""
    import json

    from transformers import AutoConfig

    from pi_lora.model.serving import VLLM_PIN_KEY, vllm_default_window

    _, release = released
    config = json.loads((release / "config.json").read_text())
    assert config["max_position_embeddings"] == 256 and config[VLLM_PIN_KEY] == 128
    assert vllm_default_window(config) == 256
    unpinned = {k: v for k, v in config.items() if k != VLLM_PIN_KEY}
    assert vllm_default_window(unpinned) == 512
    assert AutoConfig.from_pretrained(release).max_position_embeddings == 256


def test_validate_warns_about_methods_serving_loses(tiny_models, write_recipe,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora.cli import main

    for method, warned in (("dynamic", True), ("yarn", False)):
        path = write_recipe(tiny_models("llama"), rope={"method": method, "target_context": 256})
        assert main(["validate", str(path)]) == 0
        assert ("warning: dynamic NTK does not survive" in capsys.readouterr().out) == warned


@pytest.mark.parametrize(("method", "params", "max_pos", "pinned"), [
    ("linear", {"rope_type": "linear", "factor": 4.0}, 16384, True),
    ("dynamic", {"rope_type": "dynamic", "factor": 4.0}, 4096, False),  # already 4096 x 4
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
     16384, False),
    ("llama3", {"rope_type": "llama3", "factor": 4.0}, 16384, False),  # vLLM does not scale
])
def test_vllm_window_rule_per_method(method: str, params: dict, max_pos: int,
                                     pinned: bool) -> None:
    from pi_lora.model.serving import VLLM_PIN_KEY, pin_vllm_window, vllm_default_window

    plan = RopePlan(method, 4096, "config", 16384, 4.0, 10000.0, 128, params, max_pos)
    config = {"max_position_embeddings": max_pos, "rope_scaling": {**params, "type": method}}
    out = pin_vllm_window(config, plan)
    assert vllm_default_window(out) == 16384
    assert (VLLM_PIN_KEY in out) == pinned


def test_a_pickled_adapter_is_refused_by_merge_and_eval(released, tmp_path: Path) -> None:
    import shutil

    from pi_lora.core.errors import PiLoraError
    from pi_lora.run.trained import load_trained

    run, _ = released
    copy = tmp_path / "run"
    shutil.copytree(run.path, copy)
    (copy / "adapter" / "adapter_model.safetensors").unlink()
    (copy / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
    with pytest.raises(PiLoraError, match="pickled"):
        load_trained(Run.open(copy))
    with pytest.raises(PiLoraError, match="pickled"):
        merge_run(copy, tmp_path / "rel")
    assert not (tmp_path / "rel").exists()
