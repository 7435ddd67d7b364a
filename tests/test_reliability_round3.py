"""Reliability round 3 (issue 31): never two writers, never a traceback where one message belongs.

Each test fails on the code before its fix: the lock path was built with `absolute()` (a
symlinked output_dir got a second lock), merge checked its output once before the work (two
merges both published), a truncated or mis-shaped adapter reached the fold as a traceback.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError
from pi_lora.core.run_lock import RunLock, hold, lock_path
from pi_lora.release.merge import merge_run
from pi_lora.run.finished import Run


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / "x"
    shutil.copytree(finished_run, copy)
    return copy


def test_a_symlinked_run_directory_shares_the_lock(finished_run: Path, tmp_path: Path) -> None:
    real = _copy(finished_run, tmp_path)
    link = tmp_path / "runs" / "latest"
    link.symlink_to(real, target_is_directory=True)
    assert lock_path(link) == lock_path(real) == lock_path(real.parent / ".." / "runs" / "x")
    with hold(real), pytest.raises(PiLoraError, match="in use by"):
        RunLock.acquire(link)


def test_a_resume_through_a_link_is_refused_while_the_run_trains(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = _copy(finished_run, tmp_path)
    link = tmp_path / "runs" / "latest"
    link.symlink_to(real, target_is_directory=True)
    recipe = real / "recipe.yaml"
    with hold(real):  # the first trainer
        code = main(["train", str(recipe), "--resume", "--set", f"output_dir={link}",
                     "--set", "training.max_steps=3"])
    assert code == 2
    assert "in use by" in capsys.readouterr().err


def test_a_second_merge_to_the_same_output_is_refused_up_front(finished_run: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "release"
    with hold(out), pytest.raises(PiLoraError, match="another pi-lora merge"):
        merge_run(finished_run, out, verify="full")
    assert not out.exists()


def test_an_output_that_appears_during_the_merge_is_not_replaced(
        finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The publish step re-checks --overwrite at the rename: what appeared meanwhile stays."""
    import pi_lora.release.merge as merge

    first = tmp_path / "first"
    merge_run(finished_run, first, verify="full")
    out = tmp_path / "second"
    real_verify = merge.verify_release

    def verify_then_race(*args, **kwargs):  # another writer publishes while we verify
        report = real_verify(*args, **kwargs)
        shutil.copytree(first, out)
        (out / "theirs").write_text("the other merge's release")
        return report

    monkeypatch.setattr(merge, "verify_release", verify_then_race)
    with pytest.raises(PiLoraError, match="already exists"):
        merge_run(finished_run, out, verify="full")
    assert (out / "theirs").is_file()
    assert not list(tmp_path.glob(".second.tmp-*"))


@pytest.mark.parametrize("damage", ["truncated", "wrong shape", "garbled config"])
def test_a_damaged_adapter_is_one_message_naming_the_file(damage: str, finished_run: Path,
                                                          tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]
                                                          ) -> None:
    from safetensors.torch import load_file, save_file

    run = _copy(finished_run, tmp_path)
    adapter = run / "adapter"
    weights = adapter / "adapter_model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "wrong shape":
        tensors = load_file(str(weights))
        key = next(k for k in tensors if ".lora_B." in k)
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
        save_file(tensors, str(weights))
    else:
        (adapter / "adapter_config.json").write_text('{"r": 4, "lora_alpha"')
    with pytest.raises(PiLoraError) as caught:
        Run.open(run)
    named = "adapter_config.json" if damage == "garbled config" else "adapter_model.safetensors"
    assert named in str(caught.value)
    code = main(["merge", str(run), "--output", str(tmp_path / "rel")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and named in err
    assert not (tmp_path / "rel").exists()


def test_export_of_a_release_with_a_corrupt_config_is_one_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    release = tmp_path / "release"
    release.mkdir()
    (release / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    code = main(["export", str(release), "--gguf", str(tmp_path / "m.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and "config.json is unreadable" in err
    assert not list(tmp_path.glob("*.gguf*"))


def test_truncated_base_weights_at_train_are_one_message_naming_the_file(
        tiny_models, write_recipe, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """safetensors' SafetensorError is not an OSError: a base cut short by a download reached
    the user as a traceback naming no file."""
    import os

    model = tmp_path / "base"
    shutil.copytree(tiny_models(), model)
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    path = write_recipe(model, training={"max_steps": 1})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is damaged" in err and "model.name" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_pose_with_one_chunk_is_refused(tiny_models, write_recipe,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """One piece has no skip: it would train only positions below seq_len while the run
    announced positions up to the target."""
    path = write_recipe(tiny_models(), data={"seq_len": 64, "pose": {"chunks": 1}})
    assert main(["validate", str(path)]) == 2
    assert "data.pose.chunks" in capsys.readouterr().err


def test_validate_refuses_the_sequence_parallel_size_train_refuses(
        tiny_models, write_recipe, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny Llama has 4 heads: Ulysses over 3 processes cannot split them."""
    path = write_recipe(tiny_models(), data={"seq_len": 96},
                        training={"sequence_parallel": 3, "deepspeed": "zero3"})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not divisible by 3" in err and "training.sequence_parallel" in err


def test_releases_and_adapters_follow_the_umask(tiny_models, write_recipe,
                                                tmp_path: Path) -> None:
    """safetensors wrote model.safetensors and adapter_model.safetensors 0600 while every
    other file was 0644: a serving container running as another user could not read them."""
    import os

    from pi_lora.recipe.loading import load_recipe
    from pi_lora.train.assembly import train

    old = os.umask(0o022)
    try:
        run = train(load_recipe(write_recipe(tiny_models(), training={"max_steps": 1,
                                                                      "save_steps": 1})))
        merge_run(run, tmp_path / "rel", verify="full")
    finally:
        os.umask(old)
    files = [*(Path(run) / "adapter").glob("*.safetensors"), Path(run) / "extras.safetensors",
             *(tmp_path / "rel").glob("*.safetensors")]
    assert len(files) >= 3
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {
        f.name: "0o644" for f in files}


def test_a_failed_resume_leaves_a_complete_run_complete(finished_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """A corrupt optimizer.pt in the latest checkpoint: one message naming the checkpoint,
    run.json still 'complete', and the intact adapter still merges."""
    import json

    run = _copy(finished_run, tmp_path)
    (checkpoint,) = sorted((run / "checkpoints").glob("checkpoint-*"))
    (checkpoint / "optimizer.pt").write_bytes(b"not a torch file")
    before = json.loads((run / "run.json").read_text())
    code = main(["train", str(run / "recipe.yaml"), "--resume", "--set", f"output_dir={run}",
                 "--set", "training.max_steps=4"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"resuming from {checkpoint.name} failed before its first step" in err
    after = json.loads((run / "run.json").read_text())
    assert after["status"] == "complete" and after["steps"] == before["steps"]
    merge_run(run, tmp_path / "rel", verify="full")


def test_a_run_that_died_before_its_first_checkpoint_is_replaced_by_a_rerun(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A full disk at the first checkpoint stopped even the failure record: run.json says
    'training', nobody holds the run, nothing can be resumed. A plain rerun proceeds."""
    import json

    run = _copy(finished_run, tmp_path)
    shutil.rmtree(run / "checkpoints")
    facts = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**facts, "status": "training"}))
    recipe = shutil.copy(run / "recipe.yaml", tmp_path / "recipe.yaml")  # --overwrite spares it
    code = main(["train", str(recipe), "--set", f"output_dir={run}"])
    assert code == 0, capsys.readouterr().err
    assert "a start that failed before its first checkpoint" in capsys.readouterr().out
    assert json.loads((run / "run.json").read_text())["status"] == "complete"


def test_a_failed_run_json_write_leaves_no_temporary_file(
        finished_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from pi_lora.run.directory import RunDir

    run = RunDir(_copy(finished_run, tmp_path))
    facts = run.read_facts()

    def full(self, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "replace", full)
    with pytest.raises(OSError):
        run.write_facts(facts)
    assert not (run.path / "run.tmp").exists()


def test_search_refuses_to_replace_earlier_factors_and_an_unwritable_out_up_front(
        tiny_models, write_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import errno
    import tempfile

    import pi_lora.search.longrope as search

    def never(*args, **kwargs):
        raise AssertionError("the search ran before its output was checked")

    monkeypatch.setattr(search, "run_search", never)
    recipe = write_recipe(tiny_models(), rope={"method": "longrope", "target_context": 256})
    docs = tmp_path / "docs.txt"
    docs.write_text("held-out text " * 200)
    out = tmp_path / "search"
    out.mkdir()
    (out / "factors.json").write_text("{}")
    flags = ["search", str(recipe), "--docs", str(docs), "--out", str(out)]
    assert main(flags) == 2
    assert "factors.json already exists" in capsys.readouterr().err
    assert (out / "factors.json").read_text() == "{}"

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    assert main([*flags[:-1], str(tmp_path / "new"), "--overwrite"]) == 2
    assert "cannot write to" in capsys.readouterr().err


def _built(corpus: Path, cache: Path):
    from pi_lora.data.build import build_train_dataset
    from pi_lora.recipe.schema import DataSection
    from pi_lora.testing import make_tokenizer

    return build_train_dataset(DataSection(files=[str(corpus)]), make_tokenizer(), 64, seed=0,
                               cache_dir=cache)


@pytest.mark.parametrize("damage", ["truncated arrow", "garbled json"])
def test_a_broken_data_cache_entry_is_named_and_rebuilt(damage: str, corpus: Path,
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    first = _built(corpus, tmp_path / "cache")
    entry = first.cache_path
    assert entry is not None
    if damage == "truncated arrow":
        (arrow,) = (entry / "train").glob("*.arrow")
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 3])
    else:
        (entry / "train" / "state.json").write_text("{not json")
    again = _built(corpus, tmp_path / "cache")
    assert f"the data cache entry {entry} is unreadable" in capsys.readouterr().err
    assert again.tokens == first.tokens and again.cache_path == entry


def test_a_read_only_data_cache_is_one_message(corpus: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import pi_lora.data.build as build

    def refused(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(build, "_build", refused)
    with pytest.raises(PiLoraError, match="cannot be written") as caught:
        _built(corpus, tmp_path / "ro-cache")
    assert caught.value.field == "data.cache_dir"


def test_a_file_rewritten_with_its_mtime_restored_is_hashed_again(tmp_path: Path) -> None:
    """`cp -p` / `rsync -t` put the mtime back; the change time they cannot."""
    import os
    import time

    from pi_lora.core.digest import file_sha256

    path = tmp_path / "data.txt"
    path.write_text("aaaa")
    before = file_sha256(path, tmp_path / "digests")
    stat = path.stat()
    time.sleep(0.01)
    path.write_text("bbbb")  # same size, same inode
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_mtime_ns == stat.st_mtime_ns
    assert file_sha256(path, tmp_path / "digests") != before


@pytest.mark.parametrize("bad", ['{"text": "cut sh', b'{"text": "\xff\xfe not utf-8"}'])
def test_a_bad_record_in_a_later_streamed_file_names_file_and_line(
        bad: str | bytes, tiny_models, write_recipe, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Streaming reads the files as training goes: a record broken hours in is the same one
    message naming the file and the line, not a traceback from the data loader."""
    import json

    from pi_lora.testing import synthetic_text

    good = tmp_path / "a.jsonl"
    # more records than one tokenizing batch (1000): the start reads only this file
    good.write_text("\n".join(json.dumps({"text": t}) for t in synthetic_text(1100, 10, seed=1)))
    later = tmp_path / "b.jsonl"
    lines = [json.dumps({"text": t}).encode() for t in synthetic_text(40, seed=2)]
    later.write_bytes(b"\n".join([*lines[:5], bad if isinstance(bad, bytes) else bad.encode(),
                                  *lines[5:]]))
    path = write_recipe(tiny_models(), data={"files": [str(good), str(later)], "streaming": True,
                                             "seq_len": 256},
                        training={"max_steps": 400, "save_steps": 400})
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert "b.jsonl" in err and "line 6" in err, err[-2000:]


SLOW_MERGE = """
import sys, time
import pi_lora.release.merge as merge
def slow(*args, **kwargs):
    print("VERIFYING", flush=True)
    time.sleep(60)
merge.verify_release = slow
from pi_lora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_during_a_merge_cleans_up_and_exits_143(finished_run: Path,
                                                         tmp_path: Path) -> None:
    """A scheduler's kill mid-merge: exit 128 + 15, one line, no release, no temporary."""
    import os
    import signal
    import subprocess
    import sys

    out = tmp_path / "rel"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(finished_run),
                             "--output", str(out), "--verify", "full"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("VERIFYING"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "pi-lora: interrupted (SIGTERM)" in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".rel.tmp-*"))


def test_an_interrupted_train_prints_the_resume_command() -> None:
    from pi_lora.cli.main import _after_stop

    line = _after_stop(["train", "my recipe.yaml", "--overwrite", "--set", "training.lr=1e-4"])
    assert line.endswith("pi-lora train 'my recipe.yaml' --set training.lr=1e-4 --resume")
    assert "latest checkpoint" in line


def test_the_download_advice_names_the_cli_the_locked_hub_client_installs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub 1.x installs `hf`, not `huggingface-cli`."""
    import shutil as which_of

    from pi_lora.model.loading import _hub_error
    from pi_lora.recipe.schema import ModelSection

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    error = _hub_error(ModelSection(name="org/model"), OSError("not found"))
    assert "hf download org/model --local-dir DIR" in error.fix
    assert which_of.which("hf") is not None


def test_the_cli_says_what_it_is_and_its_version(capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora import __version__

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip() == f"pi-lora {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Extend the context window" in text and "nothing imports" not in text


def _no_kernel_locks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem whose locks stay on each machine (Lustre `localflock`, FUSE): every
    flock is granted, so only the lease can see a holder elsewhere."""
    import pi_lora.core.run_lock as run_lock

    monkeypatch.setattr(run_lock.fcntl, "flock", lambda fd, op: None)


def test_a_live_holder_on_another_host_refuses_where_the_kernel_lock_is_local(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two processes, one playing another machine: its flock is invisible here, its
    heartbeat is not."""
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    code = ("import socket, time, pi_lora.core.run_lock as L; "
            "L.fcntl.flock = lambda fd, op: None; socket.gethostname = lambda: 'node-b'; "
            "L.BEAT_SECONDS = 0.1; "
            f"L.RunLock.acquire({str(run_dir)!r}); print('held', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        assert other.stdout.readline().strip() == "held"
        _no_kernel_locks(monkeypatch)
        first = json.loads(lock_path(run_dir).read_text())["beat"]
        time.sleep(0.5)
        assert json.loads(lock_path(run_dir).read_text())["beat"] > first  # it beats
        with pytest.raises(PiLoraError) as refused:
            RunLock.acquire(run_dir)
        assert "node-b" in str(refused.value) and "across machines" in str(refused.value)
    finally:
        other.kill()
        other.wait()


def test_a_lease_past_its_time_frees_the_run_and_a_release_clears_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that died mid-run leaves its record: after LEASE_SECONDS it is no holder."""
    import socket
    import time

    from pi_lora.core.run_lock import LEASE_SECONDS, holder

    _no_kernel_locks(monkeypatch)
    run_dir = tmp_path / "run"
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    path.write_text(json.dumps({"pid": 7, "host": "node-b", "since": now - 999,
                                "beat": now - LEASE_SECONDS - 1}))
    assert holder(run_dir) is None
    lock = RunLock.acquire(run_dir)
    assert json.loads(path.read_text())["host"] == socket.gethostname()
    lock.release()
    assert path.read_text() == "" and holder(run_dir) is None
