"""Data: PI-paper packing, the short/long mix, chat masking and padding-free packing, caching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pi_lora.data import (
    IGNORE_INDEX,
    PackedCollator,
    build_train_dataset,
    pack_chat,
    pack_pretrain,
    split_for_short_mix,
)
from pi_lora.errors import PiLoraError
from pi_lora.recipe import DataSection
from pi_lora.testing import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def test_pretrain_blocks_are_full_and_ordered() -> None:
    blocks = pack_pretrain(iter(range(25)), 8)
    assert blocks == [list(range(0, 8)), list(range(8, 16)), list(range(16, 24))]


def test_short_mix_hits_the_fraction() -> None:
    blocks = [[i] * 64 for i in range(100)]
    mixed = split_for_short_mix(blocks, 16, 0.5, seed=0)
    short = sum(len(b) == 16 for b in mixed)
    assert abs(short / len(mixed) - 0.5) < 0.03
    assert sum(len(b) for b in mixed) == 100 * 64  # no token lost


def test_chat_labels_only_assistant_turns(tokenizer) -> None:
    from pi_lora.data import _chat_example

    messages = [{"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "the king walks"},
                {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "the queen runs"}]
    ids, labels = _chat_example(messages, tokenizer)
    assert len(ids) == len(labels)
    kept = tokenizer.decode([t for t in labels if t != IGNORE_INDEX])
    assert "the king walks" in kept and "the queen runs" in kept
    assert "hello" not in kept and "and then" not in kept


def test_chat_packing_restarts_positions_and_blocks_attention() -> None:
    """Packed conversations must not see each other: transformers reads the position ids."""
    from transformers import AutoModelForCausalLM

    from pi_lora.testing import tiny_config

    packs = pack_chat([([5, 6, 7], [5, 6, 7]), ([8, 9], [8, 9]), ([10, 11, 12, 13], [10] * 4)], 6)
    assert [p["position_ids"] for p in packs] == [[0, 1, 2, 0, 1], [0, 1, 2, 3]]
    assert packs[0]["labels"][3] == IGNORE_INDEX  # no prediction across conversations
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    batch = PackedCollator(0)([packs[0]])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).logits
        alone = model(input_ids=torch.tensor([[8, 9]])).logits
    torch.testing.assert_close(packed[0, 3:5], alone[0], atol=1e-5, rtol=1e-5)


def test_collator_right_pads_with_ignored_labels() -> None:
    batch = PackedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]},
                                            {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]


def test_build_from_jsonl_is_cached(tokenizer, tmp_path: Path, corpus: Path) -> None:
    docs = corpus.read_text().split("\n\n")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    section = DataSection(files=[str(path)], text_field="body", validation_sequences=2)
    first = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    assert first.validation is not None and len(first.validation) == 2
    assert all(len(x) == 64 for x in first.train["input_ids"])
    again = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    assert again.cache_path == first.cache_path and len(again.train) == len(first.train)
    other = build_train_dataset(section, tokenizer, 32, seed=0, cache_dir=tmp_path / "c")
    assert other.cache_path != first.cache_path


def test_data_errors_name_the_field(tokenizer, tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(PiLoraError) as info:
        build_train_dataset(DataSection(files=[str(tmp_path / "none*.txt")]), tokenizer, 64, seed=0)
    assert info.value.field == "data.files[0]"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PiLoraError) as info:
        build_train_dataset(DataSection(files=[str(path)]), tokenizer, 64, seed=0,
                            cache_dir=tmp_path)
    assert info.value.field == "data.text_field" and "body" in info.value.fix
    with pytest.raises(PiLoraError, match="too few"):
        build_train_dataset(DataSection(files=[str(corpus)]), tokenizer, 10**6, seed=0,
                            cache_dir=tmp_path)
