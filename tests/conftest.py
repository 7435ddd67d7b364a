"""Shared fixtures: tiny random models of several RoPE families, a corpus, recipe files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pi_lora.testing import write_corpus

    return write_corpus(tmp_path_factory.mktemp("data") / "corpus.txt", n_docs=120)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Factory: tiny_models("qwen2", tie=True) -> model dir, built once per session."""
    from pi_lora.testing import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    built: dict[tuple, Path] = {}

    def get(family: str = "llama", *, tie: bool = False, rope: dict | None = None,
            max_positions: int = 128) -> Path:
        key = (family, tie, repr(rope), max_positions)
        if key not in built:
            out = root / f"{family}-{len(built)}"
            built[key] = make_tiny_model(out, family, tie_word_embeddings=tie,
                                         rope_parameters=rope, max_positions=max_positions)
        return built[key]

    return get


@pytest.fixture()
def write_recipe(tmp_path: Path, corpus: Path) -> Any:
    """Write a tiny recipe for `model_dir` with overrides merged in; returns its path."""
    from pi_lora.recipe.loading import deep_merge

    def write(model_dir: Path, name: str = "recipe.yaml", **sections: Any) -> Path:
        recipe = {
            "model": {"name": str(model_dir), "dtype": "fp32"},
            "rope": {"method": "linear", "target_context": 256},
            "lora": {"r": 4, "alpha": 8, "trainable_extras": ["embeddings", "norms"]},
            "data": {"files": [str(corpus)], "cache_dir": str(tmp_path / "cache")},
            "training": {"max_steps": 6, "learning_rate": 3e-3, "warmup_steps": 0,
                         "per_device_batch_size": 2, "precision": "fp32", "save_steps": 3,
                         "logging_steps": 1, "report_to": "none", "seed": 0},
            "output_dir": str(tmp_path / "run"),
        }
        path = tmp_path / name
        path.write_text(yaml.safe_dump(deep_merge(recipe, sections)))
        return path

    return write


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny complete run (2 steps) on its own copy of the base, for the read-side tests
    (copy it before changing it)."""
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.testing import make_tiny_model, write_corpus
    from pi_lora.train.assembly import train

    root = tmp_path_factory.mktemp("finished")
    model = make_tiny_model(root / "model")
    corpus = write_corpus(root / "corpus.txt", n_docs=40)
    recipe = {
        "model": {"name": str(model), "dtype": "fp32"},
        "rope": {"method": "linear", "target_context": 256},
        "lora": {"r": 4, "alpha": 8, "trainable_extras": ["norms"]},
        "data": {"files": [str(corpus)], "cache_dir": str(root / "cache")},
        "training": {"max_steps": 2, "per_device_batch_size": 2, "precision": "fp32",
                     "save_steps": 2, "report_to": "none"},
        "output_dir": str(root / "run")}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return train(load_recipe(root / "recipe.yaml"))
