"""The streaming merge: shard by shard, bit-identical to peft's whole-model merge, verified
layer by layer with the same verdict as the whole-model check."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError
from pi_lora.recipe.dtypes import TORCH_DTYPES
from pi_lora.recipe.loading import load_recipe
from pi_lora.release.merge import merge_run, verify_release
from pi_lora.run.directory import RunDir
from pi_lora.run.finished import Run
from pi_lora.run.trained import load_trained
from pi_lora.train.assembly import train


def _release_tensors(release: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(release.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def _whole_model_merge(run: RunDir, dtype: str) -> dict[str, torch.Tensor]:
    """What merge did before it streamed: peft's merge_and_unload on the whole fp32 model."""
    merged = load_trained(Run.open(run.path), "fp32", dequantize=True).merge_and_unload(safe_merge=True)
    merged = merged.to(TORCH_DTYPES[dtype])
    names = {n for n, _ in merged.named_parameters(remove_duplicate=True)}
    return {k: v for k, v in merged.state_dict().items() if k in names}


@pytest.fixture(scope="module")
def tied_run(tiny_models, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> RunDir:
    import yaml

    root = tmp_path_factory.mktemp("stream")
    recipe = {
        "model": {"name": str(tiny_models("llama", tie=True)), "dtype": "fp32"},
        "rope": {"method": "linear", "target_context": 256},
        "lora": {"r": 4, "alpha": 8, "trainable_extras": ["embeddings", "norms"]},
        "data": {"files": [str(corpus)], "cache_dir": str(root / "cache")},
        "training": {"max_steps": 3, "learning_rate": 3e-3, "warmup_steps": 0, "save_steps": 3,
                     "per_device_batch_size": 2, "precision": "fp32", "logging_steps": 1,
                     "report_to": "none", "seed": 0},
        "output_dir": str(root / "run"),
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return RunDir(train(load_recipe(root / "recipe.yaml")))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_streamed_release_is_bit_identical(tied_run: RunDir, dtype: str, tmp_path: Path) -> None:
    report = merge_run(tied_run.path, tmp_path / "rel", dtype=dtype, verify="layers",
                       max_shard_size="60KB")
    release = tmp_path / "rel"
    assert report.shards > 3 and (release / "model.safetensors.index.json").is_file()
    index = json.loads((release / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in release.glob("*.safetensors")}
    streamed, whole = _release_tensors(release), _whole_model_merge(tied_run, dtype)
    assert set(streamed) == set(whole)  # the tied head is not written twice
    for name, tensor in whole.items():
        assert streamed[name].dtype == tensor.dtype and torch.equal(streamed[name], tensor), name
    assert report.lora_folded == 4 * 2 and report.extras_applied > 0
    config = json.loads((release / "config.json").read_text())
    assert config["dtype"] == str(TORCH_DTYPES[dtype]).removeprefix("torch.")
    assert config["rope_scaling"]["factor"] == 2.0 and config["max_position_embeddings"] == 256


def test_layer_check_agrees_with_whole_model_check(tied_run: RunDir, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    full = merge_run(tied_run.path, tmp_path / "a", verify="full")
    capsys.readouterr()
    layers = verify_release(tied_run.path, tmp_path / "a", verify="layers")
    shown = capsys.readouterr().err  # minutes on a real model: never silent
    assert "verifying layer by layer" in shown and "2/2" in shown
    assert layers.max_abs_diff == pytest.approx(full.max_abs_diff, abs=1e-6)
    assert layers.top1_agreement == full.top1_agreement == 1.0
    assert len(layers.layer_max_abs_diff) == 2 and max(layers.layer_max_abs_diff) < 1e-5
    # the saved report says which check ran and what each layer measured
    saved = json.loads((tmp_path / "a" / "merge_report.json").read_text())
    assert saved["verify"] == "full" and saved["shards"] == 1


@pytest.mark.parametrize("mode", ["layers", "full"])
def test_check_catches_lost_rope_scaling(tied_run: RunDir, tmp_path: Path, mode: str) -> None:
    merge_run(tied_run.path, tmp_path / "rel", verify=mode)  # type: ignore[arg-type]
    config_path = tmp_path / "rel" / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("rope_scaling")
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    config_path.write_text(json.dumps(config))
    with pytest.raises(PiLoraError, match="disagrees"):
        verify_release(tied_run.path, tmp_path / "rel", verify=mode)  # type: ignore[arg-type]


def test_layer_check_catches_a_corrupted_shard(tied_run: RunDir, tmp_path: Path) -> None:
    merge_run(tied_run.path, tmp_path / "rel", max_shard_size="60KB")
    shard = sorted((tmp_path / "rel").glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    for i in range(header, len(data), 7):  # scramble the tensor bytes, keep the header
        data[i] ^= 0x5A
    shard.write_bytes(bytes(data))
    with pytest.raises(PiLoraError, match="disagrees"):
        verify_release(tied_run.path, tmp_path / "rel", verify="layers")
    shard.write_bytes(bytes(data[: header + 100]))  # truncated: a message, not a traceback
    with pytest.raises(PiLoraError, match=r"unreadable|disagrees"):
        verify_release(tied_run.path, tmp_path / "rel", verify="layers")


def test_qlora_streams_into_the_dequantized_weights(tiny_models, write_recipe,
                                                   tmp_path: Path) -> None:
    """A 4-bit base: the fold quantizes and dequantizes each weight as bitsandbytes loaded it."""
    pytest.importorskip("bitsandbytes")
    path = write_recipe(tiny_models("qwen2"), model={"quantization": {"bits": 4}},
                        training={"max_steps": 2, "save_steps": 2})
    run = RunDir(train(load_recipe(path)))
    report = merge_run(run.path, tmp_path / "rel", dtype="fp32", verify="layers")
    assert report.quantized_base and report.relative_diff <= report.tolerance
    streamed, whole = _release_tensors(tmp_path / "rel"), _whole_model_merge(run, "fp32")
    for name, tensor in whole.items():
        assert torch.equal(streamed[name], tensor), name
    # the fold really changed the 4-bit weights: the originals differ from the release
    original = load_file(str(Path(load_recipe(path).model.name) / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"  # no LoRA there: only quantization moved it
    assert not torch.equal(original[name], streamed[name])


@pytest.mark.parametrize("family", ["qwen2", "gemma", "gpt_neox", "mistral"])
def test_layer_check_across_families(family: str, tiny_models, write_recipe,
                                     tmp_path: Path) -> None:
    path = write_recipe(tiny_models(family), training={"max_steps": 2, "save_steps": 2})
    run = RunDir(train(load_recipe(path)))
    merge_run(run.path, tmp_path / "rel", verify="full")
    layers = verify_release(run.path, tmp_path / "rel", verify="layers")
    assert layers.relative_diff <= 1e-5 and layers.top1_agreement == 1.0
    assert len(layers.layer_max_abs_diff) == 2


def test_merge_never_deletes_what_it_did_not_write(tied_run: RunDir, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(p.name for p in tied_run.path.iterdir())
    code = main(["merge", str(tied_run.path), "--output", str(tied_run.path), "--overwrite"])
    assert code == 2 and "refusing to replace" in capsys.readouterr().err
    assert sorted(p.name for p in tied_run.path.iterdir()) == before
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine")
    code = main(["merge", str(tied_run.path), "--output", str(notes), "--overwrite"])
    assert code == 2 and "not a release written by pi-lora" in capsys.readouterr().err
    assert (notes / "keep.txt").read_text() == "mine"
    code = main(["merge", str(tied_run.path), "--output", str(tmp_path / "r"),
                 "--probe-tokens", "100000"])
    assert code == 2 and "--probe-tokens" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_killed_merge_leftovers_are_cleaned(tied_run: RunDir, tmp_path: Path) -> None:
    dead = tmp_path / f".rel.tmp-{2**22 + 12345}"  # above pid_max: no such process
    (dead / "partial").mkdir(parents=True)
    alive = tmp_path / f".rel.tmp-{os.getppid()}"  # a live process's merge is left alone
    alive.mkdir()
    merge_run(tied_run.path, tmp_path / "rel")
    assert not dead.exists() and alive.exists()
    shutil.rmtree(alive)


@pytest.mark.gpu
def test_merge_on_cuda_matches_the_cpu_merge(tied_run: RunDir, tmp_path: Path) -> None:
    """`--device cuda`: same algorithm, deltas and the layer check on the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cpu = merge_run(tied_run.path, tmp_path / "cpu", verify="layers")
    gpu = merge_run(tied_run.path, tmp_path / "gpu", verify="layers", device="cuda")
    assert gpu.device == "cuda" and gpu.relative_diff <= gpu.tolerance
    assert gpu.max_abs_diff == pytest.approx(cpu.max_abs_diff, abs=1e-4)
    ours, theirs = _release_tensors(tmp_path / "gpu"), _release_tensors(tmp_path / "cpu")
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=1e-5)


def test_merge_refuses_a_base_that_changed_since_training(tiny_models, write_recipe,
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Same shapes, other weights: merged silently before; now refused, or merged by flag."""
    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_models("llama"), base)
    run = train(load_recipe(write_recipe(base, training={"max_steps": 1, "save_steps": 1})))
    tensors = load_file(str(base / "model.safetensors"))
    save_file({k: v * 1.01 for k, v in tensors.items()}, str(base / "model.safetensors"),
              metadata={"format": "pt"})
    assert main(["merge", str(run), "--output", str(tmp_path / "rel")]) == 2
    assert "differs from the one" in capsys.readouterr().err
    assert not (tmp_path / "rel").exists()
    assert main(["merge", str(run), "--output", str(tmp_path / "rel"),
                 "--allow-base-mismatch"]) == 0
    assert "WARNING" in capsys.readouterr().err
