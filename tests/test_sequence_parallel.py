"""Sequence parallelism (DeepSpeed Ulysses) on CPU over gloo: 2 processes share each sequence.

The reference is one process without DeepSpeed on the same tokens (global batch 4 = 2 rows x 2
accumulation). A 2-way sequence-parallel run (ZeRO-3, chunked loss, LoRA + embeddings and norms,
gradient checkpointing, ALST's tiled MLP) trains 3 steps, is resumed to 6, and must log the
reference's losses
(relative 1e-5) and save its adapter and extras (max |difference| 1e-5); measured: losses equal
to ~1e-7 relative, tensors to ~3e-7. Four processes in two sequence-parallel groups (ZeRO-2,
PoSE positions, the plain loss) must do the same for 3 steps, and so must one ZeRO-3 process
with accumulation 2 (the chunked loss inside DeepSpeed's forward). The recipe checks and the
tiled MLP's gradients run without processes.
"""

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
from safetensors.torch import load_file

from pi_lora.core.errors import PiLoraError, RecipeErrors
from pi_lora.recipe.loading import Recipe, deep_merge, load_recipe
from pi_lora.train.distributed import free_port, prebuild_deepspeed_ops

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_STEPS = 6, 3
LOSS_RTOL, TENSOR_ATOL = 1e-5, 1e-5
LAUNCH_TIMEOUT_S = 400

BASE: dict[str, Any] = {
    "rope": {"method": "linear", "target_context": 256},
    # no dropout: the ranks' masks would differ from the single process's
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "trainable_extras": ["embeddings", "norms"]},
    "training": {"max_steps": STEPS, "learning_rate": 3e-3, "warmup_steps": 0,
                 "per_device_batch_size": 2, "global_batch_size": 4, "precision": "fp32",
                 "save_steps": SAVE_STEPS, "logging_steps": 1, "report_to": "none", "seed": 0},
}
SEQUENCE_PARALLEL = {"deepspeed": "zero3", "sequence_parallel": 2}


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any, corpus: Path) -> Any:
    """write(name, **sections) -> recipe path; run directories live beside the recipes."""
    root = tmp_path_factory.mktemp("sequence_parallel")
    base = deep_merge(BASE, {
        "model": {"name": str(tiny_models("llama")), "dtype": "fp32"},
        "data": {"files": [str(corpus)], "cache_dir": str(root / "cache")}})

    def write(name: str, **sections: Any) -> Path:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(deep_merge(base, {**sections, "output_dir": str(root / name)})))
        return path

    return write


def _launch(*args: str, nproc: int = 2) -> None:
    """`pi-lora train ARGS --nproc N` in a fresh environment, one thread per process."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "PI_LORA_LAUNCHED", "ACCELERATE_USE_DEEPSPEED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pi_lora.cli", "train", *args, "--nproc", str(nproc),
         "--master-port", str(free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, check=False)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}"


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _saved(run: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(run / "adapter" / "adapter_model.safetensors")),
            **load_file(str(run / "extras.safetensors"))}


def _max_difference(run: Path, reference: Path) -> float:
    got, want = _saved(run), _saved(reference)
    assert sorted(got) == sorted(want)
    assert all(got[n].shape == t.shape for n, t in want.items())  # full shapes, never shards
    return max((got[n].float() - want[n].float()).abs().max().item() for n in want)


@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    """DeepSpeed's JIT op built (or found in the cache) before two ranks race to build it."""
    prebuild_deepspeed_ops(REPO / ".cache" / "torch_extensions")


def _train_here(path: Path) -> Path:
    from pi_lora.train.assembly import train

    return train(load_recipe(path))


# --------------------------------------------------------------------------- two processes


@pytest.fixture(scope="module")
def reference(recipes: Any) -> Path:
    return _train_here(recipes("single"))


def test_two_way_zero3_run_resumed_equals_one_process(recipes: Any, reference: Path,
                                                      deepspeed_ops: None) -> None:
    path = recipes("sp_zero3", training={**SEQUENCE_PARALLEL, "tiled_mlp": True})
    _launch(str(path), f"--set=training.max_steps={SAVE_STEPS}")
    run = Path(load_recipe(path).output_dir)
    assert len(_losses(run)) == SAVE_STEPS
    _launch(str(path), "--resume", f"--set=training.max_steps={STEPS}")
    losses, expected = _losses(run), _losses(reference)
    diff = _max_difference(run, reference)
    print(f"SP x2 ZeRO-3 tiled MLP (resumed at {SAVE_STEPS}) vs one process: losses {losses} vs "
          f"{expected}; max |adapter/extras diff| {diff:.3g}")
    assert losses == pytest.approx(expected, rel=LOSS_RTOL)
    assert diff < TENSOR_ATOL


def test_zero3_accumulation_keeps_every_micro_batch(recipes: Any, reference: Path,
                                                   deepspeed_ops: None) -> None:
    """One process, ZeRO-3, accumulation 2, chunked loss: the loss runs inside DeepSpeed's
    forward, where ZeRO-3 counts micro-steps; called around it, each micro-step's gradients
    replaced the previous ones (step 2's loss was 5.93699 instead of 5.93360)."""
    path = recipes("zero3_accumulation", training={"deepspeed": "zero3",
                                                   "max_steps": SAVE_STEPS})
    _launch(str(path), nproc=1)
    losses = _losses(Path(load_recipe(path).output_dir))
    assert losses == pytest.approx(_losses(reference)[:SAVE_STEPS], rel=LOSS_RTOL)


def test_two_groups_zero2_pose_plain_loss_equal_one_process(recipes: Any,
                                                            deepspeed_ops: None) -> None:
    """4 processes in 2 groups of 2 (one row per process per load), ZeRO-2, PoSE rows
    (positions that skip, an attention mask) and the model's own loss on the slices' shifted
    labels; sdpa gets no mask under Ulysses and runs causal, as PoSE's all-ones mask does."""
    pose = {"data": {"seq_len": 128, "pose": {"chunks": 2}},
            "training": {"max_steps": SAVE_STEPS, "chunked_loss": False}}
    reference = _train_here(recipes("pose_single", **pose))
    path = recipes("pose_sp", **deep_merge(pose, {"training": {
        "deepspeed": "zero2", "sequence_parallel": 2, "per_device_batch_size": 1}}))
    _launch(str(path), nproc=4)
    run = Path(load_recipe(path).output_dir)
    diff = _max_difference(run, reference)
    print(f"SP 2 groups x2 ZeRO-2 PoSE plain loss vs one process: losses {_losses(run)} vs "
          f"{_losses(reference)}; max |adapter/extras diff| {diff:.3g}")
    assert _losses(run) == pytest.approx(_losses(reference), rel=LOSS_RTOL)
    assert diff < TENSOR_ATOL


# --------------------------------------------------------------------------- no processes


def _recipe(tmp_path: Path, **sections: Any) -> Recipe:
    raw = deep_merge({**BASE, "model": {"name": "some/model"}, "data": {"files": ["x.txt"]},
                      "output_dir": str(tmp_path / "run")}, sections)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path)


def _problems(tmp_path: Path, **sections: Any) -> list[PiLoraError]:
    with pytest.raises(RecipeErrors) as info:
        _recipe(tmp_path, **sections)
    return info.value.errors


@pytest.mark.parametrize(("sections", "says"), [
    ({"training": {"sequence_parallel": 2}}, "DeepSpeed"),
    ({"training": {**SEQUENCE_PARALLEL, "s2_attn": True}}, "S2-Attn"),
    ({"training": SEQUENCE_PARALLEL, "model": {"attn_implementation": "eager"}}, "eager"),
    ({"training": SEQUENCE_PARALLEL, "data": {"format": "chat"}}, "attend across"),
    ({"training": SEQUENCE_PARALLEL, "data": {"seq_len": 128, "pose": {"chunks": 2}},
      "model": {"attn_implementation": "flash_attention_2"}}, "PoSE"),
    ({"training": SEQUENCE_PARALLEL, "data": {"streaming": True}}, "stream"),
    ({"training": {**SEQUENCE_PARALLEL, "sequence_parallel": 3}}, "equal slices"),
])
def test_impossible_combinations_are_recipe_errors(tmp_path: Path, sections: dict,
                                                   says: str) -> None:
    problems = _problems(tmp_path, **sections)
    assert len(problems) == 1, [p.render() for p in problems]
    assert says in problems[0].message and problems[0].fix
    assert problems[0].field in ("training.sequence_parallel", "data.seq_len")


def test_what_sequence_parallel_allows(tmp_path: Path) -> None:
    chat = _recipe(tmp_path, training=SEQUENCE_PARALLEL, data={"format": "chat"},
                   model={"attn_implementation": "flash_attention_2"})
    assert chat.training.sequence_parallel == 2  # FlashAttention-2 separates by position ids
    pose = _recipe(tmp_path, training=SEQUENCE_PARALLEL, data={"seq_len": 128, "pose": {}})
    assert pose.data.pose is not None  # sdpa runs causal over the whole row, as PoSE does


def test_the_model_config_decides_the_sizes(tmp_path: Path) -> None:
    from pi_lora.testing import tiny_config
    from pi_lora.train.sequence_parallel import sequence_parallel_problems

    recipe = _recipe(tmp_path, training=SEQUENCE_PARALLEL)
    config = tiny_config("llama", num_attention_heads=12, num_key_value_heads=4, hidden_size=96)
    assert sequence_parallel_problems(recipe, config) == []  # 12 / 2 heads, 4 / 2 kv heads
    for n, says in ((8, "not divisible by 8"), (3, "key/value heads")):
        sized = recipe.model_copy(update={"training": recipe.training.model_copy(
            update={"sequence_parallel": n})})
        (problem,) = sequence_parallel_problems(sized, config)
        assert says in problem.message and problem.field == "training.sequence_parallel"
        assert "[1, 2, 4, 12]" in problem.fix  # the sizes that work: kv 4 divides 12
    mistral = tiny_config("mistral", sliding_window=64)  # a window below the 256-token rows
    (problem,) = sequence_parallel_problems(recipe, mistral)
    assert "64 tokens back" in problem.message and "flash_attention_2" in problem.fix
    fa2 = recipe.model_copy(update={"model": recipe.model.model_copy(
        update={"attn_implementation": "flash_attention_2"})})
    assert sequence_parallel_problems(fa2, mistral) == []


def test_world_and_accumulation_checked_at_launch(tmp_path: Path) -> None:
    from pi_lora.train.sequence_parallel import check_accumulation, data_parallel_size, parallelism_config

    recipe = _recipe(tmp_path, training={**SEQUENCE_PARALLEL, "per_device_batch_size": 1,
                                         "global_batch_size": 8})
    with pytest.raises(PiLoraError, match="3 processes cannot be split into groups of 2"):
        data_parallel_size(recipe.training, 3)
    assert data_parallel_size(recipe.training, 8) == 4
    config = parallelism_config(recipe, 8)  # 4 groups: accumulation 8 / (1 x 4) = 2
    assert (config.sp_size, config.data_parallel_size) == (2, 4)
    assert config.sp_handler.sp_attn_implementation == "sdpa"
    with pytest.raises(PiLoraError, match="accumulation of 1 micro-steps") as info:
        check_accumulation(recipe.training, 16)  # 8 groups: accumulation 1, loads come in 2s
    assert info.value.field == "training.global_batch_size"


def test_a_launch_sp_cannot_split_exits_2_before_starting_processes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked by `pi-lora train` itself: one message, exit 2, no ranks started."""
    from pi_lora.cli import main

    _recipe(tmp_path, training={**SEQUENCE_PARALLEL, "per_device_batch_size": 1,
                                "global_batch_size": 8})
    assert main(["train", str(tmp_path / "r.yaml"), "--nproc", "3"]) == 2
    err = capsys.readouterr().err
    assert "3 processes cannot be split into groups of 2" in err
    assert not (tmp_path / "run").exists()


def test_zero3_without_reduce_scatter_is_refused(tmp_path: Path) -> None:
    from pi_lora.testing import tiny_config
    from pi_lora.train.sequence_parallel import check_launch

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_scatter": False}}))
    recipe = _recipe(tmp_path, training={**SEQUENCE_PARALLEL, "deepspeed": str(ds)})
    with pytest.raises(PiLoraError, match="reduce_scatter") as info:
        check_launch(recipe, tiny_config("llama"), 2)
    assert info.value.field == "training.deepspeed"


def test_rows_padded_to_slices_with_positions() -> None:
    from pi_lora.data.build import PackedCollator
    from pi_lora.train.sequence_parallel import ShardedRows

    collate = ShardedRows(PackedCollator(pad_token_id=0), parts=4)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9, 10]}, {"input_ids": [5, 6, 7]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]]
    assert batch["labels"][0].tolist() == [5, 6, 7, 8, 9, 10, -100, -100]
    assert batch["position_ids"].tolist() == [list(range(8))] * 2  # pads continue the row


def test_slice_loss_share_carries_the_right_gradient() -> None:
    from pi_lora.train.sequence_parallel import gradient_factor, rank_share

    zero2, zero3 = ({"zero_optimization": {"stage": s}} for s in (2, 3))
    assert gradient_factor(zero2, 8, 2) == 4  # ZeRO-2 averages over the 4 data-parallel groups
    assert gradient_factor(zero3, 8, 2) == 8  # ZeRO-3's reduce-scatter over all 8 processes
    loss = torch.tensor(0.5, requires_grad=True)
    share = rank_share(loss, processes=8, gradient_scale=4)
    share.backward()
    assert share.item() == pytest.approx(4.0) and loss.grad.item() == pytest.approx(4.0)


def test_tiled_mlp_changes_no_gradient(tiny_models: Any, tmp_path: Path) -> None:
    """LoRA on the MLP's projections too: tiles of 64 rows (4 per 256-token row) give the
    untiled loss and gradients; dropout inside the MLP is refused (a recomputed tile would
    draw another mask)."""
    from transformers import AutoModelForCausalLM

    from pi_lora.model.loading import wrap_lora
    from pi_lora.train.sequence_parallel import enable_tiled_mlp

    recipe = _recipe(tmp_path, lora={"dropout": 0.0, "target_modules": [
        "q_proj", "v_proj", "gate_proj", "down_proj"]}, training={"tiled_mlp": True})
    ids = torch.randint(0, 300, (2, 256), generator=torch.Generator().manual_seed(0))

    def gradients(tiled: bool) -> tuple[float, dict[str, torch.Tensor]]:
        base = AutoModelForCausalLM.from_pretrained(str(tiny_models("llama")))
        torch.manual_seed(0)  # the same LoRA initialisation both times
        model = wrap_lora(base, recipe.lora, gradient_checkpointing=False)
        for name, param in model.named_parameters():  # lora_B starts at 0: give it a value
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(1))
        if tiled:
            assert enable_tiled_mlp(model, recipe.training) == 2
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (plain_loss, plain), (tiled_loss, tiled) = gradients(False), gradients(True)
    assert tiled_loss == pytest.approx(plain_loss, rel=1e-6)
    assert any("mlp.down_proj.lora_A" in n for n in tiled)
    for name, grad in plain.items():
        torch.testing.assert_close(tiled[name], grad, rtol=1e-5, atol=1e-7)
    dropout = recipe.lora.model_copy(update={"dropout": 0.1})
    model = wrap_lora(AutoModelForCausalLM.from_pretrained(str(tiny_models("llama"))), dropout,
                      gradient_checkpointing=False)
    with pytest.raises(PiLoraError, match="dropout inside the MLP") as info:
        enable_tiled_mlp(model, recipe.training)
    assert info.value.field == "lora.dropout"

