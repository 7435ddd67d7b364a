"""`pi-lora push RELEASE REPO_ID` (issue #37 item 9): a complete release, its card and
certificate, listed by --dry-run without network or token, refused when incomplete, and
uploaded as one commit of exactly the listed files (the hub replaced by a recorder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pi_lora.cli import main
from pi_lora.release.merge import merge_run
from pi_lora.release.push import format_bytes, release_files


@pytest.fixture(scope="module")
def release(finished_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny finished run merged once, with a certificate beside its card."""
    out = tmp_path_factory.mktemp("push") / "release"
    merge_run(finished_run, out)
    (out / "certificate.json").write_text(json.dumps({"verdict": "pass"}) + "\n")
    return out


def _copy(release: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    return copy


class _NoHub:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a dry run must not touch the hub")


def test_dry_run_lists_every_file_its_size_and_the_total(
        release: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no token needed
    assert main(["push", str(release), "me/tiny-256", "--revision", "v1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    on_disk = {p.relative_to(release).as_posix(): p.stat().st_size
               for p in release.rglob("*") if p.is_file()}
    listed = [line.split() for line in out.splitlines() if line.startswith("  ") and
              not line.startswith("  total")]
    assert {row[0] for row in listed} == set(on_disk)
    for name, value, unit in listed:
        assert f"{value} {unit}" == format_bytes(on_disk[name])
    for name in ("README.md", "certificate.json", "config.json", "model.safetensors",
                 "merge_report.json", "pi_lora_recipe.yaml", "pi_lora_provenance.json"):
        assert name in on_disk
    total = sum(on_disk.values())
    assert f"total {format_bytes(total)} ({total:,} bytes)" in out
    assert "https://huggingface.co/me/tiny-256 (revision v1;" in out
    assert "nothing uploaded" in out


def test_push_refuses_a_directory_that_is_not_a_release(
        finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(finished_run), "me/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"RELEASE: {finished_run} has no pi_lora_recipe.yaml: not a release" in err
    assert "fix: give the directory `pi-lora merge RUN --output DIR` wrote" in err


@pytest.mark.parametrize("lost", ["merge_report.json", "model.safetensors"])
def test_push_refuses_an_incomplete_release(release: Path, tmp_path: Path, lost: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    copy = _copy(release, tmp_path)
    (copy / lost).unlink()
    assert main(["push", str(copy), "me/x", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"RELEASE: {copy} is not a complete release: missing {lost}" in err
    assert "fix: merge again (`pi-lora merge RUN --overwrite`)" in err


def test_push_refuses_a_bad_repo_id(release: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(release), "not a/repo/id", "--dry-run"]) == 2
    assert "REPO_ID: 'not a/repo/id' is not a hub repository id" in capsys.readouterr().err


def test_push_offline_says_offline_mode_is_on(release: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    assert main(["push", str(release), "me/x"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE: offline mode is on" in err and "--dry-run" in err


def test_push_without_a_token_names_the_login(release: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", _NoHub)
    assert main(["push", str(release), "me/x"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token found" in err and "`hf auth login`, or set HF_TOKEN" in err


def test_push_commits_exactly_the_listed_files(release: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import huggingface_hub

    copy = _copy(release, tmp_path)
    (copy / ".cache").mkdir()  # a hub client's cache inside the folder: not part of the release
    (copy / ".cache" / "x").write_text("x")
    calls: list[tuple[str, Any]] = []

    class Recorder:
        def __init__(self, token: str) -> None:
            calls.append(("token", token))

        def create_repo(self, repo_id: str, **kwargs: Any) -> None:
            calls.append(("create_repo", (repo_id, kwargs)))

        def create_branch(self, repo_id: str, **kwargs: Any) -> None:
            calls.append(("create_branch", (repo_id, kwargs)))

        def create_commit(self, repo_id: str, operations: list[Any], **kwargs: Any) -> Any:
            calls.append(("create_commit", (repo_id, operations, kwargs)))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", Recorder)
    assert main(["push", str(copy), "me/tiny-256", "--private", "--revision", "v1"]) == 0
    assert calls[0] == ("token", "hf_test")
    assert calls[1] == ("create_repo", ("me/tiny-256", {"private": True, "exist_ok": True}))
    assert calls[2] == ("create_branch", ("me/tiny-256", {"branch": "v1", "exist_ok": True}))
    repo_id, operations, kwargs = calls[3][1]
    assert repo_id == "me/tiny-256" and kwargs["revision"] == "v1"
    uploaded = {op.path_in_repo: Path(op.path_or_fileobj) for op in operations}
    assert sorted(uploaded) == [name for name, _ in release_files(copy)]
    assert ".cache/x" not in uploaded and "certificate.json" in uploaded
    assert uploaded["README.md"] == copy.resolve() / "README.md"
    assert "pushed" in capsys.readouterr().out
