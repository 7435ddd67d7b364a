"""QLoRA: a 4-bit nf4 base (bitsandbytes, CPU) with LoRA and the extras, under ZeRO-3 started
without any launcher (a one-process group), merged into a dequantized base, reloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pi_lora.distributed import prebuild_deepspeed_ops
from pi_lora.merge import merge_run
from pi_lora.model import quantization_config
from pi_lora.recipe import load_recipe
from pi_lora.rundir import RunDir

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


def test_qlora_zero3_trains_merges_reloads(tiny_models, write_recipe, tmp_path: Path,
                                           deepspeed_ops: None) -> None:
    from transformers import AutoModelForCausalLM

    path = write_recipe(tiny_models("llama"), model={"quantization": {"bits": 4}},
                        training={"deepspeed": "zero3", "max_steps": 2, "save_steps": 2,
                                  "per_device_batch_size": 1})
    # a subprocess: DeepSpeed's process group must not outlive the run in the test process
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "pi_lora.cli", "train", str(path)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    run = RunDir(tmp_path / "run")
    assert run.read_facts()["status"] == "complete"

    report = merge_run(run.path, tmp_path / "release", dtype="fp32")
    assert report.quantized_base and report.relative_diff <= report.tolerance
    # fp32 compute: the dequantized merge reproduces the 4-bit model it was trained as
    assert report.quantized_max_abs_diff < 1e-3 and report.quantized_top1_agreement == 1.0
    config = json.loads((tmp_path / "release" / "config.json").read_text())
    assert "quantization_config" not in config
    release = AutoModelForCausalLM.from_pretrained(str(tmp_path / "release"))
    assert not getattr(release, "is_quantized", False)
    assert release.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
