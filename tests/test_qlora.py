"""QLoRA: a 4-bit nf4 base (bitsandbytes, CPU) with LoRA and the extras, under ZeRO-3 started
without any launcher (a one-process group), merged into a dequantized base, reloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pi_lora.model.loading import quantization_config
from pi_lora.recipe.loading import load_recipe
from pi_lora.release.merge import merge_run
from pi_lora.run.directory import RunDir
from pi_lora.train.distributed import prebuild_deepspeed_ops

pytest.importorskip("bitsandbytes")
pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    prebuild_deepspeed_ops(REPO / ".cache" / "torch_extensions")


def test_quant_storage_is_the_compute_dtype(tiny_models, write_recipe) -> None:
    """ZeRO-3 shards tensors of one dtype: packed 4-bit storage must match the compute dtype."""
    recipe = load_recipe(write_recipe(tiny_models("llama"),
                                      model={"dtype": "bf16", "quantization": {"bits": 4}}))
    config = quantization_config(recipe.model)
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_quant_storage == config.bnb_4bit_compute_dtype == torch.bfloat16


@pytest.fixture(scope="module")
def qlora_run(tiny_models, corpus: Path, tmp_path_factory: pytest.TempPathFactory,
              deepspeed_ops: None) -> RunDir:
    """A 2-step QLoRA run under ZeRO-3 (one process), trained once for this module."""
    root = tmp_path_factory.mktemp("qlora")
    recipe = {
        "model": {"name": str(tiny_models("llama")), "dtype": "fp32", "quantization": {"bits": 4}},
        "rope": {"method": "linear", "target_context": 256},
        "lora": {"r": 4, "alpha": 8, "trainable_extras": ["embeddings", "norms"]},
        "data": {"files": [str(corpus)], "cache_dir": str(root / "cache")},
        "training": {"max_steps": 2, "learning_rate": 3e-3, "warmup_steps": 0, "save_steps": 2,
                     "per_device_batch_size": 1, "precision": "fp32", "logging_steps": 1,
                     "report_to": "none", "seed": 0, "deepspeed": "zero3"},
        "output_dir": str(root / "run"),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    # a subprocess: DeepSpeed's process group must not outlive the run in the test process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "pi_lora.cli", "train", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = RunDir(root / "run")
    assert run.read_facts().status == "complete"
    return run


# The release is merged into the dequantized 4-bit weights and the quantized model is run with
# the arithmetic it was trained with (fp32 here), so the two differ only by fp32 rounding of
# the folded LoRA delta (measured: 0 to 2e-7). Merging into the original full-precision weights
# instead (the classic QLoRA merge mistake) differs by the nf4 quantisation error (measured
# ~1e-2 on this model), so the limit sits between the two by orders of magnitude.
QUANTIZED_LIMIT = 1e-5


def test_qlora_zero3_trains_merges_reloads(qlora_run: RunDir, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    report = merge_run(qlora_run.path, tmp_path / "release", dtype="fp32")
    assert report.quantized_base and report.relative_diff <= report.tolerance
    assert report.quantized_max_abs_diff < QUANTIZED_LIMIT
    assert report.quantized_top1_agreement == 1.0
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert "quantization_config" not in config
    release = AutoModelForCausalLM.from_pretrained(str(tmp_path / "release"))
    assert not getattr(release, "is_quantized", False)
    assert release.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32


def test_merging_into_the_original_weights_is_caught(qlora_run: RunDir, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The classic QLoRA merge mistake (folding the adapter into the full-precision weights it
    never saw) differs from base + adapter by the nf4 error: the whole-model check, whose
    reference transformers quantizes and dequantizes itself, refuses it. (The layer check
    shares the fold's quantization code, which tests/test_merge_stream.py pins bit-identical
    to transformers' own.)"""
    import pi_lora.release.fold as fold
    from pi_lora.core.errors import PiLoraError

    real = fold.requantizer

    def original_weights(model: Any, skeleton: Any) -> Any:
        _, quantized = real(model, skeleton)
        return (lambda weight: weight.float()), quantized

    monkeypatch.setattr("pi_lora.release.merge.requantizer", original_weights)
    with pytest.raises(PiLoraError, match="disagrees"):
        merge_run(qlora_run.path, tmp_path / "release", dtype="fp32", verify="full")
    assert not (tmp_path / "release").exists()


def test_4bit_inference_runs_the_training_arithmetic(tiny_models) -> None:
    """On AVX512-BF16 CPUs bitsandbytes would run eval in bf16; the merge check must not."""
    from transformers import AutoModelForCausalLM

    from pi_lora.model.loading import compute_4bit_as_trained

    config = quantization_config(load_recipe_model(tiny_models("llama")))
    quantized = AutoModelForCausalLM.from_pretrained(str(tiny_models("llama")), dtype=torch.float32,
                                                     quantization_config=config)
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_models("llama")), dtype=torch.float32,
                                                 quantization_config=config)
    dense = dense.dequantize(dtype=torch.float32)
    from pi_lora.recipe.dtypes import cpu_has_native_bf16

    # bitsandbytes marks its packed bf16 kernel only on CPUs with the units; elsewhere there
    # is nothing to switch and the 4-bit layers already compute as in training
    expected = 7 * quantized.config.num_hidden_layers if cpu_has_native_bf16() else 0
    assert compute_4bit_as_trained(quantized) == expected
    probe = torch.randint(0, quantized.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(quantized(probe).logits, dense(probe).logits)


def load_recipe_model(model_dir: Path) -> Any:
    from pi_lora.recipe.loading import ModelSection

    return ModelSection(name=str(model_dir), dtype="fp32", quantization={"bits": 4})
