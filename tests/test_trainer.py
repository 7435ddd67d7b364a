"""The Trainer's jobs: held-out evaluation through the chunked loss (data.validation_sequences
is read, logged to metrics.jsonl every eval_steps) and constructor configuration."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pi_lora.recipe.loading import load_recipe
from pi_lora.run.directory import RunDir
from pi_lora.run.finished import Run
from pi_lora.run.trained import load_trained
from pi_lora.train.assembly import train


def test_validation_sequences_are_evaluated(tiny_models, write_recipe) -> None:
    path = write_recipe(tiny_models("llama"), data={"validation_sequences": 2},
                        training={"max_steps": 4, "eval_steps": 2, "save_steps": 4})
    recipe = load_recipe(path)
    run = RunDir(train(recipe))
    records = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["eval_loss"]) for r in evals)
    assert evals[-1]["eval_ppl"] == math.exp(evals[-1]["eval_loss"])

    # the last eval loss is the plain (full-logit) loss of the final model on the held-out rows
    import datasets

    held_out = datasets.load_from_disk(str(Path(run.read_facts().data_cache) / "validation"))
    ids = torch.tensor(held_out["input_ids"])
    model = load_trained(Run.open(run.path))
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert abs(evals[-1]["eval_loss"] - expected) < 1e-4 * max(1.0, expected)


def test_trainer_is_configured_through_its_constructor() -> None:
    import inspect

    from pi_lora.train.trainer import ChunkedLoss, ExtrasCheckpoints, MasterWeightsSave, trainer_class

    cls = trainer_class()
    assert cls.__mro__[1:4] == (ChunkedLoss, ExtrasCheckpoints, MasterWeightsSave)
    for mixin, names in ((ChunkedLoss, {"chunk_tokens", "offload_checkpoints"}),
                         (ExtrasCheckpoints, {"extras_names"})):
        assert names <= set(inspect.signature(mixin.__init__).parameters)


def test_progress_counts_real_tokens_not_padded_rows(tiny_models, write_recipe) -> None:
    """short_mix rows are shorter than seq_len: tokens/s counts what the rows hold."""
    from pi_lora.data.build import build_train_dataset
    from pi_lora.model.loading import load_tokenizer

    path = write_recipe(tiny_models("llama"), data={"short_mix": {"seq_len": 64, "fraction": 0.5}},
                        training={"max_steps": 2, "save_steps": 2})
    recipe = load_recipe(path)
    run = RunDir(train(recipe))
    built = build_train_dataset(recipe.data, load_tokenizer(recipe.model), recipe.seq_len, seed=0)
    record = json.loads(run.metrics_path.read_text().splitlines()[-1])
    per_step = record["tokens_per_sec"] * record["sec_per_step"]
    rows = recipe.training.per_device_batch_size
    assert per_step == pytest.approx(built.tokens_per_sequence * rows, rel=1e-9)
    assert per_step < recipe.seq_len * rows


def test_trains_from_a_stream(tiny_models, write_recipe) -> None:
    path = write_recipe(tiny_models("llama"), data={"streaming": True},
                        training={"max_steps": 3, "save_steps": 3})
    run = RunDir(train(load_recipe(path)))
    facts = run.read_facts()
    assert facts.status == "complete" and facts.steps == 3
    assert facts.train_sequences is None and facts.data_cache is None


def test_accumulation_follows_the_global_batch(tiny_models, write_recipe, tmp_path: Path) -> None:
    from pi_lora.train.assembly import training_arguments

    path = write_recipe(tiny_models("llama"), training={"global_batch_size": 8,
                                                        "per_device_batch_size": 2})
    args = training_arguments(load_recipe(path), RunDir(tmp_path / "run"))
    assert args.gradient_accumulation_steps == 4  # 8 / (2 per device x 1 process)
