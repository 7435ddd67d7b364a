"""DeepSpeed on CPU over gloo, two processes, tiny model, fixed seed.

One single-process run (global batch 4 = 2 x 2 accumulation) is the reference. ZeRO-3 in two
processes (`--nproc 2`) and ZeRO-2 on two "nodes" (two launcher invocations on loopback) must
save the same adapter and extras, at full shape. A ZeRO-3 run killed with SIGKILL after its
first checkpoint resumes and continues the uninterrupted run's loss curve.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pi_lora.cli import main
from pi_lora.recipe.loading import deep_merge, load_recipe
from pi_lora.run.directory import RunDir
from pi_lora.train.distributed import adapt_deepspeed_config, free_port, prebuild_deepspeed_ops
from pi_lora.train.launch import LaunchPlan, launcher_command, needs_launch

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parent.parent
STEPS, SAVE_STEPS, CRASH_AT_STEP = 6, 3, 5
LAUNCH_TIMEOUT_S = 400


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def deepspeed_ops() -> None:
    """DeepSpeed's JIT op built (or found in the cache) before two ranks race to build it."""
    prebuild_deepspeed_ops(REPO / ".cache" / "torch_extensions")


@pytest.fixture(scope="module")
def recipes(tmp_path_factory: pytest.TempPathFactory, tiny_models: Any, corpus: Path) -> Any:
    """write(name, **sections) -> recipe path; run directories live beside the recipes."""
    root = tmp_path_factory.mktemp("distributed")
    base = {
        "model": {"name": str(tiny_models("llama")), "dtype": "fp32"},
        "rope": {"method": "linear", "target_context": 256},
        # no dropout: the ranks' masks would differ from the single process's
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "trainable_extras": ["embeddings", "norms"]},
        "data": {"files": [str(corpus)], "cache_dir": str(root / "cache")},
        "training": {"max_steps": STEPS, "learning_rate": 3e-3, "warmup_steps": 0,
                     "per_device_batch_size": 2, "precision": "fp32", "save_steps": SAVE_STEPS,
                     "logging_steps": 1, "report_to": "none", "seed": 0},
    }

    def write(name: str, **sections: Any) -> Path:
        path = root / f"{name}.yaml"
        recipe = deep_merge(base, {**sections, "output_dir": str(root / name)})
        path.write_text(yaml.safe_dump(recipe))
        return path

    return write


def _child_env(**extra: str) -> dict[str, str]:
    """This environment minus anything a launcher left, one thread per process (2 cores)."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "PI_LORA_LAUNCHED", "ACCELERATE_USE_DEEPSPEED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **extra}


def _pi_lora(*args: str) -> list[str]:
    return [sys.executable, "-m", "pi_lora.cli", *args]


def _check(proc: subprocess.CompletedProcess[str] | subprocess.Popen[str], out: str) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-6000:]}"


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(command, cwd=REPO, env=_child_env(**env), capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT_S, check=False)
    return proc


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _saved(run: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(run / "adapter" / "adapter_model.safetensors")),
            **load_file(str(run / "extras.safetensors"))}


def _assert_same_saved(run: Path, reference: Path) -> float:
    """Same names, full shapes, equal values; returns the max |difference|."""
    got, want = _saved(run), _saved(reference)
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name  # never (0,) shards
    diff = max((got[n].float() - want[n].float()).abs().max().item() for n in want)
    assert diff < 1e-5, diff
    return diff


@pytest.fixture(scope="module")
def single_process_run(recipes: Any) -> Path:
    from pi_lora.train.assembly import train

    path = recipes("single", training={"gradient_accumulation_steps": 2})
    return train(load_recipe(path))


@pytest.fixture(scope="module")
def zero3_run(recipes: Any, deepspeed_ops: None) -> Path:
    path = recipes("zero3", training={"deepspeed": "zero3"})
    proc = _run(_pi_lora("train", str(path), "--nproc", "2", "--master-port", str(free_port())))
    _check(proc, proc.stdout + proc.stderr)
    return Path(load_recipe(path).output_dir)


# --------------------------------------------------------------------------- multi-process


def test_zero3_two_processes_save_what_one_process_saves(zero3_run: Path,
                                                         single_process_run: Path) -> None:
    diff = _assert_same_saved(zero3_run, single_process_run)
    print(f"ZeRO-3 x2 vs single process: max |adapter/extras diff| {diff:.3g}")
    assert _losses(zero3_run) == pytest.approx(_losses(single_process_run), rel=1e-4)
    assert RunDir(zero3_run).read_facts().world_size == 2


def test_ddp_trains_through_the_chunked_loss_on_every_rank(
        recipes: Any, single_process_run: Path, tmp_path: Path) -> None:
    """torchrun, 2 processes, no DeepSpeed: each rank computes the chunked loss inside DDP's
    forward (no [tokens x vocab] logits), and the result equals the single process's."""
    path = recipes("ddp")
    calls = tmp_path / "calls"
    calls.mkdir()
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                 "--master-port", str(free_port()), str(REPO / "tests" / "count_loss_train.py"),
                 "train", str(path)], LOSS_CALLS_DIR=str(calls))
    _check(proc, proc.stdout + proc.stderr)
    assert [int((calls / f"rank{r}").read_text()) for r in (0, 1)] == [STEPS, STEPS]
    run = RunDir(load_recipe(path).output_dir)
    assert (run.read_facts().loss or "").startswith("chunked")
    diff = _assert_same_saved(run.path, single_process_run)
    print(f"DDP x2 (chunked loss) vs single process: max |adapter/extras diff| {diff:.3g}")


def test_zero3_with_a_trainable_head_says_it_uses_logits(recipes: Any, tiny_models: Any,
                                                         deepspeed_ops: None) -> None:
    """The one unavoidable fallback (ZeRO-3 shards a head that trains: tied embeddings +
    the embeddings extra) is stated once by the run and in run.json, and planned as such."""
    from pi_lora.plan import get_device, plan_recipe

    path = recipes("zero3_tied", model={"name": str(tiny_models("llama", tie=True))},
                   training={"deepspeed": "zero3", "max_steps": 2, "save_steps": 2})
    proc = _run(_pi_lora("train", str(path)))
    _check(proc, proc.stdout + proc.stderr)
    assert proc.stdout.count("pi-lora: loss plain: ZeRO-3 shards a trainable output head") == 1
    run = RunDir(load_recipe(path).output_dir)
    assert (run.read_facts().loss or "").startswith("plain: ZeRO-3")
    recipe = load_recipe(path)
    assert not plan_recipe(recipe, get_device("h100-80gb"), gpus=2).setup.chunked_loss
    untied = load_recipe(recipes("ddp_plan"))
    assert plan_recipe(untied, get_device("h100-80gb"), gpus=2).setup.chunked_loss


def test_zero2_on_two_loopback_nodes(recipes: Any, deepspeed_ops: None,
                                     single_process_run: Path) -> None:
    path = recipes("zero2_nodes", training={"deepspeed": "zero2"})
    port = str(free_port())
    nodes = [subprocess.Popen(
        _pi_lora("train", str(path), "--nnodes", "2", "--node-rank", str(rank), "--nproc", "1",
                 "--master-addr", "127.0.0.1", "--master-port", port),
        cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for node in nodes]
    for node, out in zip(nodes, outputs, strict=True):
        _check(node, out)
    run = Path(load_recipe(path).output_dir)
    diff = _assert_same_saved(run, single_process_run)
    print(f"ZeRO-2 2 nodes vs single process: max |adapter/extras diff| {diff:.3g}")


def _two_nodes(path: Path, dirs: list[Path], *flags: str) -> list[tuple[int, str]]:
    """Both loopback "nodes" (one process each, DDP on gloo), each with its own output_dir."""
    port = str(free_port())
    nodes = [subprocess.Popen(
        _pi_lora("train", str(path), "--nnodes", "2", "--node-rank", str(rank), "--nproc", "1",
                 "--master-addr", "127.0.0.1", "--master-port", port,
                 f"--set=output_dir={dirs[rank]}", *flags),
        cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)]
    outputs = [node.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for node in nodes]
    return [(node.returncode, out) for node, out in zip(nodes, outputs, strict=True)]


def test_nodes_without_shared_storage_resume_together(recipes: Any, tmp_path: Path) -> None:
    """Each node keeps its own run directory (save_on_each_node): a resume continues on both
    from rank 0's checkpoint, and a node that lacks it stops every rank with one message."""
    dirs = [tmp_path / "node0", tmp_path / "node1"]
    path = recipes("no_shared", training={"save_on_each_node": True, "max_steps": SAVE_STEPS})
    for code, out in _two_nodes(path, dirs):
        assert code == 0, out[-4000:]
    assert all((d / "checkpoints" / f"checkpoint-{SAVE_STEPS}" / "trainer_state.json").is_file()
               for d in dirs)
    for code, out in _two_nodes(path, dirs, "--resume", f"--set=training.max_steps={STEPS}"):
        assert code == 0, out[-4000:]
    steps = [json.loads(line)["step"] for line in
             (dirs[0] / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))  # continued from step 3 on both nodes
    assert (dirs[1] / "checkpoints" / f"checkpoint-{STEPS}").is_dir()

    shutil.rmtree(dirs[1] / "checkpoints")  # node 1 lost its checkpoints
    results = _two_nodes(path, dirs, "--resume", f"--set=training.max_steps={STEPS + 3}")
    assert all(code != 0 for code, _ in results)
    assert any(f"checkpoint-{STEPS}, the latest checkpoint of rank 0, is missing on rank 1"
               in out for _, out in results), results[0][1][-3000:]


def test_killed_zero3_run_resumes_on_the_same_curve(recipes: Any, zero3_run: Path) -> None:
    path = recipes("zero3_killed", training={"deepspeed": "zero3"})
    run = RunDir(load_recipe(path).output_dir)
    # started by torchrun itself: `pi-lora train` must work under any launcher
    crashed = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(free_port()), str(REPO / "tests" / "crash_train.py"),
                    "train", str(path)], CRASH_AT_STEP=str(CRASH_AT_STEP))
    assert crashed.returncode != 0, "rank 0 should have been killed"
    assert len(_losses(run.path)) == CRASH_AT_STEP  # steps past the checkpoint were logged
    assert run.latest_checkpoint().name == f"checkpoint-{SAVE_STEPS}"
    assert not run.adapter_dir.exists()

    resumed = _run(_pi_lora("train", str(path), "--resume", "--nproc", "2",
                            "--master-port", str(free_port())))
    _check(resumed, resumed.stdout + resumed.stderr)
    continued, uninterrupted = _losses(run.path), _losses(zero3_run)
    print(f"resumed {continued}\nuninterrupted {uninterrupted}")
    assert len(continued) == STEPS  # the logged-then-lost steps were replaced, not duplicated
    assert continued == pytest.approx(uninterrupted, rel=1e-4)
    _assert_same_saved(run.path, zero3_run)


# --------------------------------------------------------------------------- no processes


def test_launcher_commands() -> None:
    torchrun = launcher_command(LaunchPlan(nproc=2, nnodes=2, node_rank=1, master_addr="10.0.0.1"),
                                ["train", "r.yaml"])
    assert torchrun[1:3] == ["-m", "torch.distributed.run"]
    assert torchrun[5:11] == ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1"]
    assert torchrun[-4:] == ["-m", "pi_lora.cli", "train", "r.yaml"]
    deepspeed = launcher_command(LaunchPlan(hostfile="hosts"), ["train", "r.yaml"])
    assert "deepspeed.launcher.runner" in deepspeed and "--hostfile" in deepspeed
    assert deepspeed[-4:] == ["--module", "pi_lora.cli", "train", "r.yaml"]


def test_no_relaunch_under_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    assert needs_launch(LaunchPlan(nproc=2))
    assert not needs_launch(LaunchPlan(nproc=1))
    monkeypatch.setenv("PI_LORA_LAUNCHED", "1")
    assert not needs_launch(LaunchPlan(nproc=2))


def test_deepspeed_config_adapted_to_cpu() -> None:
    from pi_lora.recipe.loading import resolve_deepspeed_config
    from pi_lora.train.distributed import load_deepspeed_config

    offload = load_deepspeed_config(resolve_deepspeed_config("zero3_offload"))
    adapted = adapt_deepspeed_config(offload, has_cuda=False)
    zero = adapted["zero_optimization"]
    assert not zero["offload_param"]["pin_memory"] and not zero["offload_optimizer"]["pin_memory"]
    assert adapted["optimizer"]["type"] == "AdamW"  # ZeRO-Offload needs DeepSpeed's optimizer
    assert offload["zero_optimization"]["offload_param"]["pin_memory"]  # input left alone
    plain = load_deepspeed_config(resolve_deepspeed_config("zero3"))
    assert "optimizer" not in adapt_deepspeed_config(plain, has_cuda=False)  # torch AdamW


def test_bf16_recipe_builds_trainer_arguments_on_cpu(recipes: Any) -> None:
    from pi_lora.train.assembly import training_arguments

    recipe = load_recipe(recipes("bf16", training={"precision": "bf16"}))
    args = training_arguments(recipe, RunDir(recipe.output_dir))
    assert args.bf16 and (args.use_cpu or torch.cuda.is_available())


def test_launch_options_are_checked(recipes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(recipes("bad_launch"))
    assert main(["train", path, "--nnodes", "2", "--node-rank", "2"]) == 2
    assert "--node-rank" in capsys.readouterr().err
    assert main(["train", path, "--hostfile", "/no/such/hostfile"]) == 2
    assert "hostfile" in capsys.readouterr().err
