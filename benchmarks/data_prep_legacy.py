"""pi-lora's data path before the Arrow rewrite (pretrain mode), kept runnable so that
benchmarks/bench_data_prep.py can measure old and new side by side in one run.

Every token went through a Python generator one int at a time, every block was a Python list
(labels a stored copy) before `Dataset.from_list`, and the token count read the column back.
Not used by pi-lora itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pi_lora.data.build import load_raw
from pi_lora.recipe.loading import DataSection


def token_stream(raw: Any, tokenizer: Any, field: str) -> Iterator[int]:
    for record in raw:
        text = record[field]
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        yield from ids


def pack(stream: Iterator[int], seq_len: int) -> list[list[int]]:
    blocks, current = [], []
    for token in stream:
        current.append(token)
        if len(current) == seq_len:
            blocks.append(current)
            current = []
    return blocks


def build(data: DataSection, tokenizer: Any, seq_len: int, out: Path) -> int:
    """The old build: returns the token count, as the old BuiltData.tokens did."""
    import datasets

    blocks = pack(token_stream(load_raw(data), tokenizer, data.text_field), seq_len)
    datasets.Dataset.from_list([{"input_ids": b, "labels": b} for b in blocks]) \
        .save_to_disk(str(out / "train"))
    train = datasets.load_from_disk(str(out / "train"))
    return sum(len(x) for x in train["input_ids"])
