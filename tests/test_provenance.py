"""Provenance: run.json and the release say what made them (code, libraries, command, base
weights and data by content); run directories work from any directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pi_lora.cli import main
from pi_lora.core.digest import file_sha256
from pi_lora.release.files import PROVENANCE_FILE
from pi_lora.run.directory import RunDir


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture()
def relative_run(tiny_models, corpus: Path, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A run trained through the CLI from `tmp_path/project` with relative model/data paths."""
    project = tmp_path / "project"
    shutil.copytree(tiny_models("llama"), project / "models" / "tiny")
    (project / "data").mkdir()
    shutil.copy(corpus, project / "data" / "corpus.txt")
    recipe = {
        "model": {"name": "models/tiny", "dtype": "fp32"},
        "rope": {"method": "linear", "target_context": 256},
        "lora": {"r": 4, "alpha": 8, "trainable_extras": ["norms"]},
        "data": {"files": ["data/*.txt"], "cache_dir": "cache"},
        "training": {"max_steps": 2, "warmup_steps": 0, "per_device_batch_size": 2,
                     "precision": "fp32", "save_steps": 2, "report_to": "none", "seed": 0},
        "output_dir": "runs/tiny",
    }
    (project / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(project)
    argv = ["train", "recipe.yaml", "--set", "training.learning_rate=0.001"]
    assert main(argv) == 0
    return project / "runs" / "tiny", argv


def test_run_records_code_libraries_command_and_content(relative_run) -> None:
    run_path, argv = relative_run
    project = run_path.parent.parent
    run = RunDir(run_path)
    stored = yaml.safe_load(run.recipe_path.read_text())
    assert stored["model"]["name"] == str(project / "models" / "tiny")
    assert stored["data"]["files"] == [str(project / "data" / "*.txt")]

    provenance = run.read_facts().provenance.model_dump(mode="json")
    made = provenance["software"]
    assert made["command"] == ["pi-lora", *argv]
    assert made["packages"]["transformers"] and made["packages"]["torch"]
    assert set(made["packages"]) >= {"torch", "transformers", "peft", "accelerate", "datasets",
                                     "deepspeed", "bitsandbytes", "trl"}
    assert (made["git_commit"] is None) == (not (Path(__file__).parent.parent / ".git").exists())
    model = provenance["model"]
    assert model["source"] == "local" and model["revision"] is None
    weights = project / "models" / "tiny" / "model.safetensors"
    assert model["files"]["model.safetensors"] == _sha256(weights)
    data = provenance["data"]
    assert data["files"] == {str(project / "data" / "corpus.txt"):
                             _sha256(project / "data" / "corpus.txt")}


def test_merge_from_another_directory_writes_provenance(relative_run, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_path, _ = relative_run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", str(run_path), "--output", "release"]) == 0
    release = elsewhere / "release"
    record = json.loads((release / PROVENANCE_FILE).read_text())
    train_side = RunDir(run_path).read_facts().provenance.model_dump(mode="json")
    assert record["train"] == train_side
    assert record["merge"]["command"][:2] == ["pi-lora", "merge"]
    assert record["merge"]["release_dtype"] == "fp32"
    card = (release / "README.md").read_text()
    assert train_side["model"]["sha256"] in card and train_side["data"]["sha256"] in card
    assert "pi-lora train recipe.yaml" in card


def test_digest_is_content_and_follows_changes(tmp_path: Path) -> None:
    cache = tmp_path / "digests"
    path = tmp_path / "f.txt"
    path.write_text("one")
    assert file_sha256(path, cache) == _sha256(path)
    assert len(list(cache.iterdir())) == 1
    stat = path.stat()
    path.write_text("two")  # same size, then a later mtime: a different file
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert file_sha256(path, cache) == _sha256(path)


def test_hub_models_are_named_by_revision(tiny_models) -> None:
    from pi_lora.recipe.loading import ModelSection
    from pi_lora.run.provenance import model_identity

    class Config:
        _commit_hash = "0123abcd" * 5

    identity = model_identity(ModelSection(name="org/model"), Config())
    assert identity.source == "hub" and identity.revision == "0123abcd" * 5
    assert identity.sha256 is None
