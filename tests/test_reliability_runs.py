"""Never lose a user's work, never call a broken run a success (issue 20, the run side).

Destructive paths (only pi-lora's own directories are ever deleted), half-written run
directories (nothing is created before the inputs load), success that is not (a diverged run
fails and keeps its last good checkpoint), one process per run directory, and the base
model's identity checked against the run's record.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError
from pi_lora.core.run_lock import LOCK_ENV, RunLock, hold
from pi_lora.core.safe_paths import check_replaceable, remove_owned_dir
from pi_lora.recipe.loading import load_recipe
from pi_lora.run.directory import RUN_MARKER, RunDir
from pi_lora.run.finished import Run
from pi_lora.train.assembly import train

REPO = Path(__file__).resolve().parents[1]


def _ours(path: Path) -> bool:
    return (path / "OURS").is_file()


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env.pop(LOCK_ENV, None)
    return env


# ------------------------------------------------------------------ 1. destructive paths


@pytest.mark.parametrize("where", ["cwd", "parent_of_cwd", "home", "root", "protected",
                                   "parent_of_protected", "not_ours", "symlink", "file"])
def test_only_our_directories_are_ever_deleted(where: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "work" / "project"
    work.mkdir(parents=True)
    (work / "OURS").write_text("")  # even carrying the marker, these are refused
    (work / "notes.txt").write_text("precious")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "work"))
    protected = tmp_path / "runs" / "run1"
    protected.mkdir(parents=True)
    (protected / "OURS").write_text("")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "x").write_text("")
    (tmp_path / "link").symlink_to(work)
    targets = {"cwd": Path("."), "parent_of_cwd": work.parent, "home": Path(os.environ["HOME"]),
               "root": Path("/"), "protected": protected, "parent_of_protected": protected.parent,
               "not_ours": stranger, "symlink": tmp_path / "link",
               "file": work / "notes.txt"}
    with pytest.raises(PiLoraError, match=r"refusing|symbolic link|is a file"):
        remove_owned_dir(targets[where], owned=lambda p: _ours(p) or p == Path("/"),
                         what="release", protect=[protected])
    assert (work / "notes.txt").read_text() == "precious"
    assert (protected / "OURS").is_file() and (stranger / "x").is_file()


def test_owned_directory_is_replaced_and_an_empty_one_kept(tmp_path: Path) -> None:
    ours, empty = tmp_path / "ours", tmp_path / "empty"
    ours.mkdir()
    (ours / "OURS").write_text("")
    empty.mkdir()
    assert check_replaceable(empty, owned=_ours, what="release") is False
    remove_owned_dir(empty, owned=_ours, what="release")
    assert empty.is_dir()
    remove_owned_dir(ours, owned=_ours, what="release", protect=[tmp_path / "elsewhere"])
    assert not ours.exists()
    assert check_replaceable(tmp_path / "missing", owned=_ours, what="release") is False


def test_merge_output_onto_its_run_is_refused(finished_run: Path, tmp_path: Path) -> None:
    """What merge calls for `--output X --overwrite`: X must be a release, and not the run."""
    from pi_lora.release.files import RELEASE_RECIPE_FILE, is_release

    run = _copy_run(finished_run, tmp_path)
    for output in (run.path, run.path.parent):
        with pytest.raises(PiLoraError, match="refusing to replace"):
            remove_owned_dir(output, owned=is_release, what="release", protect=[run.path])
    assert RunDir.is_run(run.path)
    release = tmp_path / "release"
    release.mkdir()
    (release / RELEASE_RECIPE_FILE).write_text("")
    remove_owned_dir(release, owned=is_release, what="release", protect=[run.path])
    assert not release.exists()


@pytest.mark.parametrize("output", [".", "..", "data_dir", "model_dir", "home"])
def test_train_overwrite_refuses_what_pi_lora_did_not_write(
        output: str, tiny_models, write_recipe, corpus: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`output_dir: .` with --overwrite once emptied the working directory."""
    work = tmp_path / "proj"
    work.mkdir()
    (work / "keep.txt").write_text("precious")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    model = tiny_models("llama")
    out = {"data_dir": corpus.parent, "model_dir": model, "home": work}.get(output, output)
    recipe = load_recipe(write_recipe(model, output_dir=str(out)))
    with pytest.raises(PiLoraError, match=r"refusing to replace|already exists"):
        RunDir(recipe.output_dir).prepare(recipe, resume=False, overwrite=True, is_main=True)
    assert (work / "keep.txt").read_text() == "precious"
    assert corpus.is_file() and (model / "config.json").is_file()


def test_train_overwrite_replaces_a_real_run(tiny_models, write_recipe, tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tiny_models("llama")))
    run = RunDir(recipe.output_dir)
    run.prepare(recipe, resume=False, overwrite=False, is_main=True)
    (run.path / "run.json").write_text("{}")
    (run.path / "old-metrics").write_text("")
    with pytest.raises(PiLoraError, match="already exists"):
        run.prepare(recipe, resume=False, overwrite=False, is_main=True)
    run.prepare(recipe, resume=False, overwrite=True, is_main=True)
    assert sorted(p.name for p in run.path.iterdir()) == sorted([RUN_MARKER, "recipe.yaml"])
    assert not list(run.path.parent.glob(".run.tmp-*"))


def test_overwrite_spares_a_run_holding_the_recipe_or_the_data(tiny_models, write_recipe,
                                                               tmp_path: Path) -> None:
    """A real run directory is still refused when the recipe being run, or the data it
    reads, lives inside it (`pi-lora train runs/a/my.yaml --overwrite`)."""
    recipe = load_recipe(write_recipe(tiny_models("llama")))
    run = RunDir(recipe.output_dir)
    run.create(recipe, replace=False)
    (run.path / "run.json").write_text("{}")
    mine = run.path / "my.yaml"
    mine.write_text("model: {}")
    with pytest.raises(PiLoraError, match="refusing to replace"):
        run.prepare(recipe, resume=False, overwrite=True, is_main=True, protect=[mine])
    inside = run.path / "corpus.txt"
    inside.write_text("data")
    reads_inside = recipe.model_copy(update={"data": recipe.data.model_copy(
        update={"files": [str(inside)]})})
    with pytest.raises(PiLoraError, match="refusing to replace"):
        run.prepare(reads_inside, resume=False, overwrite=True, is_main=True)
    assert mine.is_file() and inside.is_file()


# ------------------------------------------------------------------ 2. half-written run dirs


def _gpt2_dir(path: Path) -> Path:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=128).save_pretrained(
        path)
    return path


def test_a_model_without_rope_is_refused(write_recipe, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = write_recipe(_gpt2_dir(tmp_path / "gpt2"))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.name" in err and "no rotary position embeddings" in err
    assert main(["train", str(path)]) == 2
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("family", ["gpt2", "opt", "bloom", "mpt"])
def test_plan_rope_refuses_every_family_without_rope(family: str) -> None:
    from transformers import AutoConfig

    from pi_lora.model.rope import plan_rope
    from pi_lora.recipe.loading import RopeSection

    with pytest.raises(PiLoraError, match="no rotary position embeddings") as caught:
        plan_rope(RopeSection(method="linear", target_context=4096), AutoConfig.for_model(family))
    assert caught.value.field == "model.name"


def test_an_output_dir_that_is_a_file_is_refused(tiny_models, write_recipe,
                                                 tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("precious")
    recipe = load_recipe(write_recipe(tiny_models("llama"), output_dir=str(tmp_path / "taken")))
    for overwrite in (False, True):
        with pytest.raises(PiLoraError, match="is a file"):
            RunDir(recipe.output_dir).prepare(recipe, resume=False, overwrite=overwrite,
                                              is_main=True)
    assert (tmp_path / "taken").read_text() == "precious"


@pytest.mark.parametrize("fault", ["bad_data", "truncated_weights"])
def test_a_failed_start_leaves_nothing_and_the_rerun_proceeds(
        fault: str, tiny_models, write_recipe, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_models("llama"), model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    weights = model / "model.safetensors"
    good_weights = weights.read_bytes()
    data = {"files": [str(bad)]} if fault == "bad_data" else {}
    if fault == "truncated_weights":
        weights.write_bytes(good_weights[: len(good_weights) // 2])
    path = write_recipe(model, data=data, training={"max_steps": 1, "save_steps": 1})
    with pytest.raises(Exception):  # noqa: B017 - any failure, as long as nothing is left
        train(load_recipe(path))
    assert not (tmp_path / "run").exists()
    weights.write_bytes(good_weights)
    fixed = write_recipe(model, training={"max_steps": 1, "save_steps": 1})
    assert RunDir(train(load_recipe(fixed))).read_facts().status == "complete"


def test_a_leftover_of_a_failed_start_does_not_block(tiny_models, write_recipe) -> None:
    """A crash between create and run.json leaves marker + recipe; pi-lora before the marker
    left recipe.yaml alone. Both are replaced without --overwrite; a hand-written recipe.yaml
    alone in the directory is not pi-lora's and is refused even with --overwrite."""
    recipe = load_recipe(write_recipe(tiny_models("llama")))
    run = RunDir(recipe.output_dir)
    run.create(recipe, replace=False)
    assert run.check_start(recipe, resume=False, overwrite=False) is True
    (run.path / RUN_MARKER).unlink()  # the legacy leftover
    assert run.check_start(recipe, resume=False, overwrite=False) is True
    run.prepare(recipe, resume=False, overwrite=False, is_main=True)
    assert (run.path / RUN_MARKER).is_file()
    shutil.rmtree(run.path)
    run.path.mkdir()
    (run.path / "recipe.yaml").write_text("model: {name: mine}\nrope: {method: linear}\n")
    with pytest.raises(PiLoraError, match="already exists"):
        run.check_start(recipe, resume=False, overwrite=False)
    with pytest.raises(PiLoraError, match="not a run directory written by pi-lora"):
        run.check_start(recipe, resume=False, overwrite=True)


def _limited_train(recipe: Path, max_file_bytes: int) -> subprocess.CompletedProcess:
    """`pi-lora train` where no file may grow past max_file_bytes: a full disk, reproducibly."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead

    return subprocess.run([sys.executable, "-m", "pi_lora.cli", "train", str(recipe)],
                          cwd=REPO, env=_child_env(), preexec_fn=limit, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("max_file_bytes", [20_000, 200_000])
def test_a_full_disk_fails_clearly_and_the_rerun_proceeds(
        max_file_bytes: int, tiny_models, write_recipe, tmp_path: Path) -> None:
    """20 kB: the data cache cannot be written (before the run exists); 200 kB: the first
    checkpoint cannot (run.json says failed; nothing to resume, so a rerun replaces it)."""
    path = write_recipe(tiny_models("llama"), training={"max_steps": 4, "save_steps": 2})
    done = _limited_train(path, max_file_bytes)
    assert done.returncode == 2 and "the disk filled" in done.stderr, done.stderr[-3000:]
    run = RunDir(tmp_path / "run")
    assert run.path.exists() == (max_file_bytes > 100_000), done.stderr[-2000:]
    if run.path.exists():
        facts = run.read_facts()
        assert facts.status == "failed" and facts.failed_step is not None
        with pytest.raises(PiLoraError, match="failed"):
            Run.open(run.path)
    assert RunDir(train(load_recipe(path))).read_facts().status == "complete"


# ------------------------------------------------------------------ 3. success that is not


def _inject_nan_loss(monkeypatch: pytest.MonkeyPatch, from_step: int) -> None:
    """The loss turns NaN from `from_step` on, as a diverging run's does (lr far too high)."""
    from pi_lora.train.trainer import ChunkedLoss

    real = ChunkedLoss.compute_loss

    def poisoned(self, model, inputs, *args, **kwargs):
        loss = real(self, model, inputs, *args, **kwargs)
        return loss * float("nan") if self.state.global_step + 1 >= from_step else loss

    monkeypatch.setattr(ChunkedLoss, "compute_loss", poisoned)


@pytest.mark.parametrize(("logging_steps", "save_steps", "last_good"),
                         [(1, 2, "checkpoint-2"), (5, 2, "checkpoint-2")])
def test_a_diverged_run_fails_and_keeps_its_last_good_checkpoint(
        logging_steps: int, save_steps: int, last_good: str, tiny_models, write_recipe,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """logging every step: the NaN loss stops it; logging every 5: the weights check before
    the step-4 checkpoint does. Either way no NaN checkpoint, no adapter, status failed."""
    _inject_nan_loss(monkeypatch, from_step=3)
    recipe = load_recipe(write_recipe(tiny_models("llama"), training={
        "max_steps": 6, "save_steps": save_steps, "logging_steps": logging_steps}))
    with pytest.raises(PiLoraError, match="diverged at step") as caught:
        train(recipe)
    assert "learning_rate" in str(caught.value) and last_good in str(caught.value)
    run = RunDir(recipe.output_dir)
    facts = run.read_facts()
    assert facts.status == "failed" and facts.failed_step in (3, 4), facts
    assert not run.adapter_dir.exists()
    assert run.latest_checkpoint().name == last_good
    for weights in run.checkpoints_dir.glob("*/*.safetensors"):
        assert weights.parent.name == last_good
        assert all(torch.isfinite(t).all() for t in _tensors(weights))
    with pytest.raises(PiLoraError, match="failed at step"):
        Run.open(run.path)


def test_a_huge_learning_rate_fails_the_run_and_a_fixed_rerun_replaces_it(
        tiny_models, write_recipe) -> None:
    """lr 1e6 (past the recipe's own bounds, as a sweep or an old recipe might set it): the
    gradient norm turns NaN at step 2, before the first checkpoint (save_steps 3)."""
    recipe = load_recipe(write_recipe(tiny_models("llama"), training={"max_steps": 4}))
    huge = recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"learning_rate": 1e6})})
    with pytest.raises(PiLoraError, match="diverged at step 2") as caught:
        train(huge)
    assert "rerun" in str(caught.value)
    run = RunDir(recipe.output_dir)
    facts = run.read_facts()
    assert (facts.status, facts.failed_step, facts.failure) == (
        "failed", 2, "diverged: grad_norm nan")
    assert not run.adapter_dir.exists() and run.latest_checkpoint() is None
    assert RunDir(train(recipe)).read_facts().status == "complete"  # no --overwrite needed


def _tensors(path: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(str(path)).values())


def test_the_cli_exits_non_zero_on_divergence(tiny_models, write_recipe, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    _inject_nan_loss(monkeypatch, from_step=1)
    path = write_recipe(tiny_models("llama"), training={"max_steps": 3})
    assert main(["train", str(path)]) == 2
    assert "diverged" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "rel")]) == 2
    assert "failed at step" in capsys.readouterr().err
    assert not (tmp_path / "rel").exists()


def _copy_run(finished: Path, tmp_path: Path) -> RunDir:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return RunDir(copy)


@pytest.mark.parametrize("target", ["adapter", "extras"])
def test_check_complete_refuses_non_finite_weights(target: str, finished_run: Path,
                                                   tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    run = _copy_run(finished_run, tmp_path)
    Run.open(run.path)
    path = run.adapter_dir / "adapter_model.safetensors" if target == "adapter" \
        else run.extras_path
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name][0] = float("inf")
    save_file(tensors, str(path))
    with pytest.raises(PiLoraError, match="NaN/inf"):
        Run.open(run.path)


@pytest.mark.parametrize("status", ["training", "failed"])
def test_check_complete_refuses_an_unfinished_status(status: str, finished_run: Path,
                                                     tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path)
    facts = run.read_facts().model_copy(update={"status": status, "failure": "crashed",
                                                "failed_step": 1})
    run.write_facts(facts)
    with pytest.raises(PiLoraError, match=r"has not finished|failed at step 1: crashed"):
        Run.open(run.path)


# ------------------------------------------------------------------ 5. one process per run


def _hold_lock_in_child(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from pi_lora.core.run_lock import RunLock; "
            f"RunLock.acquire({str(run_dir)!r}); print('held', flush=True); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_child_env(),
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "held"
    return child


@pytest.mark.parametrize("resume", [False, True])
def test_a_second_trainer_on_a_run_in_use_is_refused(resume: bool, finished_run: Path,
                                                     tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path) if resume else RunDir(tmp_path / "fresh")
    recipe = load_recipe(finished_run / "recipe.yaml", [f"output_dir={run.path}"])
    holder = _hold_lock_in_child(run.path)
    try:
        started = time.time()
        with pytest.raises(PiLoraError, match=rf"in use by pid {holder.pid} on .* since"):
            train(recipe, resume=resume)
        assert time.time() - started < 30  # refused before loading anything
        assert resume or not run.path.exists()
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with its holder
        holder.wait()
    lock = RunLock.acquire(run.path)
    lock.release()


SLOW_TRAIN = """
import os, sys, time
from pathlib import Path
from pi_lora.train.trainer import ChunkedLoss
real = ChunkedLoss.compute_loss
def held(self, *args, **kwargs):
    # from step 2 on, wait until the test says the second trainer has been answered, so the
    # first is alive during the second however slowly a loaded machine starts it
    release = Path(os.environ["PI_LORA_TEST_RELEASE"])
    while self.state.global_step >= 1 and not release.exists():
        time.sleep(0.05)
    return real(self, *args, **kwargs)
ChunkedLoss.compute_loss = held
from pi_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("second", [[], ["--resume"], ["--overwrite"]])
def test_a_second_cli_trainer_is_refused_while_the_first_trains(
        second: list[str], tiny_models, write_recipe, tmp_path: Path) -> None:
    """Two real `pi-lora train` processes on one output_dir: the second names the first."""
    path = write_recipe(tiny_models("llama"), training={"max_steps": 4, "save_steps": 1})
    release = tmp_path / "second-answered"
    first = subprocess.Popen([sys.executable, "-c", SLOW_TRAIN, "train", str(path)], cwd=REPO,
                             env={**_child_env(), "PI_LORA_TEST_RELEASE": str(release)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert first.stdout is not None
    for line in first.stdout:  # training has begun: its checkpoints are being written
        if line.startswith("step 1/"):
            break
    else:
        pytest.fail(f"the first trainer did not start (exit {first.wait()})")
    other = subprocess.run([sys.executable, "-m", "pi_lora.cli", "train", str(path), *second],
                           cwd=REPO, env=_child_env(), capture_output=True, text=True,
                           timeout=300)
    still_training = first.poll() is None
    release.write_text("go on")
    first.stdout.read()
    assert first.wait(timeout=300) == 0
    assert still_training, "the test needs the first trainer alive during the second"
    assert other.returncode == 2
    assert f"in use by pid {first.pid}" in other.stderr, other.stderr[-2000:]
    run = RunDir(tmp_path / "run")
    assert run.read_facts().status == "complete"
    steps = [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_lock_outliving_its_holder_is_explained(tmp_path: Path) -> None:
    """The holder exited but a process it forked kept the lock: the refusal says so."""
    code = ("import os, sys, time; from pi_lora.core.run_lock import RunLock; "
            f"RunLock.acquire({str(tmp_path / 'run')!r})\n"
            "pid = os.fork()\n"
            "if pid == 0: os.dup2(os.open(os.devnull, os.O_WRONLY), 1); time.sleep(120)\n"
            "print(pid, flush=True)")
    holder = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            timeout=60, start_new_session=True)
    forked = int(holder.stdout.split()[0])
    try:
        with pytest.raises(PiLoraError, match="exited; a process it forked still holds"):
            RunLock.acquire(tmp_path / "run")
    finally:
        os.kill(forked, signal.SIGKILL)


def test_launched_ranks_inherit_the_launchers_lock(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    code = (f"from pi_lora.core.run_lock import RunLock; RunLock.acquire({str(run_dir)!r}).release(); "
            "print('ok')")
    with hold(run_dir, for_children=True):
        inherited = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                                   env={**_child_env(), LOCK_ENV: os.environ[LOCK_ENV]},
                                   capture_output=True, text=True, timeout=60)
        stranger = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_child_env(),
                                  capture_output=True, text=True, timeout=60)
    assert inherited.returncode == 0 and "ok" in inherited.stdout, inherited.stderr
    assert stranger.returncode != 0 and "in use by pid" in stranger.stderr
    assert LOCK_ENV not in os.environ


def test_merge_side_names_a_run_still_training(finished_run: Path, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path)
    run.write_facts(run.read_facts().model_copy(update={"status": "training"}))
    holder = _hold_lock_in_child(run.path)
    try:
        with pytest.raises(PiLoraError, match=rf"still training: pid {holder.pid}"):
            Run.open(run.path)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(PiLoraError, match="stopped before it finished"):
        Run.open(run.path)


# ------------------------------------------------------------------ 8. integrity


def test_base_identity_is_checked(finished_run: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora.run.base_integrity import check_base_identity

    run = _copy_run(finished_run, tmp_path)
    check_base_identity(Run.open(run.path), allow_mismatch=False)
    config = Path(run.load_recipe().model.name) / "config.json"
    original = config.read_text()
    try:
        config.write_text(original.replace("}", ', "pi_lora_tampered": 1}', 1)
                          if original.rstrip().endswith("}") else original + " ")
        with pytest.raises(PiLoraError, match=r"differs .*config\.json"):
            check_base_identity(Run.open(run.path), allow_mismatch=False)
        check_base_identity(Run.open(run.path), allow_mismatch=True)
        assert "WARNING" in capsys.readouterr().err
    finally:
        config.write_text(original)
    check_base_identity(Run.open(run.path), allow_mismatch=False)


def test_an_edited_base_path_is_caught(finished_run: Path, tmp_path: Path) -> None:
    from pi_lora.run.base_integrity import check_base_identity

    run = _copy_run(finished_run, tmp_path)
    raw = json.loads(run.facts_path.read_text())
    raw["provenance"]["model"]["name"] = str(tmp_path / "another-model")
    run.facts_path.write_text(json.dumps(raw))
    with pytest.raises(PiLoraError, match=r"run\.json records base .*another-model"):
        check_base_identity(Run.open(run.path), allow_mismatch=False)
