"""Datasets -> tokenized, packed training sequences, cached on disk.

Pretrain mode follows the PI paper: documents are tokenized, joined with EOS and cut into
blocks of the training length, so every token trains at long range. Chat mode packs whole
conversations into blocks without padding; position ids restart at each conversation, which
transformers turns into a block-diagonal causal mask, so samples never attend to each other.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pi_lora.digest import cache_root, file_sha256
from pi_lora.errors import PiLoraError
from pi_lora.recipe import DataSection

IGNORE_INDEX = -100
_BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}
CACHE_VERSION = 3


def default_cache_dir() -> Path:
    return cache_root() / "data"


# --------------------------------------------------------------------------- raw data


def expand_files(files: list[str]) -> list[Path]:
    """Glob patterns expanded; each missing entry named by its index in data.files."""
    paths: list[Path] = []
    for index, pattern in enumerate(files):
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise PiLoraError(f"{pattern} matches no file", field=f"data.files[{index}]",
                              fix="check the path (relative to the current directory)")
        paths += [Path(m).resolve() for m in matches if Path(m).is_file()]
    suffixes = {p.suffix for p in paths}
    unknown = suffixes - set(_BUILDERS)
    if unknown:
        raise PiLoraError(f"unsupported file type(s) {sorted(unknown)}", field="data.files",
                          fix=f"use one of {sorted(_BUILDERS)}")
    if len({_BUILDERS[s] for s in suffixes}) > 1:
        raise PiLoraError("files mix formats", field="data.files",
                          fix="use one format per recipe (all text, all jsonl or all parquet)")
    return paths


def load_raw(data: DataSection) -> Any:
    """A `datasets.Dataset` of raw records from local files or a hub dataset."""
    import datasets

    if data.files:
        paths = expand_files(data.files)
        builder = _BUILDERS[paths[0].suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=[str(p) for p in paths], split="train",
                                     **kwargs)
    assert data.dataset is not None
    source = data.dataset
    try:
        return datasets.load_dataset(source.name, source.config, split=source.split,
                                     revision=source.revision)
    except Exception as exc:  # datasets raises many types for offline / missing data
        raise PiLoraError(f"cannot load dataset {source.name!r}: {str(exc).splitlines()[0][:200]}",
                          field="data.dataset.name",
                          fix="download it first, or use data.files with local files") from None


def _require_column(raw: Any, column: str, field: str) -> None:
    if column not in raw.column_names:
        raise PiLoraError(f"column {column!r} not in the data (columns: {raw.column_names})",
                          field=field, fix=f"set {field} to one of {raw.column_names}")


# --------------------------------------------------------------------------- tokenizing


def _text_token_stream(raw: Any, tokenizer: Any, field: str, max_tokens: int | None,
                       ) -> Iterator[int]:
    """Tokens of all documents, each ending in EOS (BOS as the tokenizer adds it)."""
    emitted = 0
    for record in raw:
        text = record[field]
        if not text:
            continue
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        for token in ids:
            yield token
            emitted += 1
            if max_tokens and emitted >= max_tokens:
                return


def pack_pretrain(stream: Iterator[int], seq_len: int) -> list[list[int]]:
    """Cut the token stream into full blocks; the ragged tail is dropped (PI paper setup)."""
    blocks, current = [], []
    for token in stream:
        current.append(token)
        if len(current) == seq_len:
            blocks.append(current)
            current = []
    return blocks


def split_for_short_mix(blocks: list[list[int]], short_len: int, fraction: float,
                        seed: int) -> list[list[int]]:
    """Cut some long blocks into short ones so `fraction` of sequences are short.

    With n blocks of which k are split into m = seq_len // short_len pieces, the short
    share is k*m / (n - k + k*m); solving for k gives the number of blocks to split.
    """
    if not blocks:
        return blocks
    pieces = len(blocks[0]) // short_len
    n = len(blocks)
    k = round(fraction * n / (pieces - fraction * pieces + fraction))
    rng = random.Random(seed)
    chosen = set(rng.sample(range(n), min(k, n)))
    out: list[list[int]] = []
    for i, block in enumerate(blocks):
        if i in chosen:
            out += [block[j * short_len:(j + 1) * short_len] for j in range(pieces)]
        else:
            out.append(block)
    rng.shuffle(out)
    return out


def _chat_example(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with loss only on assistant turns."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=True, return_dict=False)
        prompt_ids, full_ids = list(prompt), list(full)
        new_prompt = prompt_ids[len(input_ids):]
        answer = full_ids[len(prompt_ids):]
        input_ids += new_prompt + answer
        labels += [IGNORE_INDEX] * len(new_prompt) + answer
    return input_ids, labels


def pack_chat(examples: list[tuple[list[int], list[int]]], seq_len: int) -> list[dict[str, list]]:
    """First-fit packing of whole conversations; position ids restart per conversation."""
    packs: list[dict[str, list]] = []
    current: dict[str, list] = {"input_ids": [], "labels": [], "position_ids": []}
    for ids, labels in examples:
        ids, labels = ids[:seq_len], labels[:seq_len]
        if len(current["input_ids"]) + len(ids) > seq_len and current["input_ids"]:
            packs.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ids
        # the first token of a conversation must not be predicted from the previous one
        current["labels"] += [IGNORE_INDEX, *labels[1:]]
        current["position_ids"] += list(range(len(ids)))
    if current["input_ids"]:
        packs.append(current)
    return packs


# --------------------------------------------------------------------------- building + cache


@dataclass(frozen=True)
class BuiltData:
    train: Any
    validation: Any | None
    tokens: int
    cache_path: Path


def _fingerprint(data: DataSection, tokenizer: Any, seq_len: int, seed: int) -> str:
    sources: Any
    if data.files:
        # by content: a file rewritten with new text but the same size is a new dataset
        sources = [(str(p), file_sha256(p)) for p in expand_files(data.files)]
    else:
        sources = data.dataset.model_dump() if data.dataset else None
    key = {"v": CACHE_VERSION, "sources": sources, "seq_len": seq_len, "seed": seed,
           "data": data.model_dump(exclude={"files", "cache_dir"}),
           "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id,
                         tokenizer.bos_token_id]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenize(data: DataSection, tokenizer: Any, seq_len: int, seed: int) -> list[dict[str, list]]:
    raw = load_raw(data)
    if data.format == "pretrain":
        _require_column(raw, data.text_field, "data.text_field")
        stream = _text_token_stream(raw, tokenizer, data.text_field, data.max_tokens)
        blocks = pack_pretrain(stream, seq_len)
        if data.short_mix:
            blocks = split_for_short_mix(blocks, data.short_mix.seq_len, data.short_mix.fraction,
                                         seed)
        return [{"input_ids": b, "labels": b} for b in blocks]
    _require_column(raw, data.messages_field, "data.messages_field")
    if tokenizer.chat_template is None:
        raise PiLoraError("the tokenizer has no chat template", field="data.format",
                          fix="use format: pretrain, or a model/tokenizer with a chat template")
    examples = [_chat_example(r[data.messages_field], tokenizer) for r in raw]
    return pack_chat([e for e in examples if any(t != IGNORE_INDEX for t in e[1])], seq_len)


def build_train_dataset(data: DataSection, tokenizer: Any, seq_len: int, *, seed: int,
                        cache_dir: Path | None = None) -> BuiltData:
    """Tokenized sequences, built once per (sources, tokenizer, settings) and reused."""
    import datasets

    root = Path(data.cache_dir) if data.cache_dir else (cache_dir or default_cache_dir())
    path = root / _fingerprint(data, tokenizer, seq_len, seed)
    if not (path / "train").is_dir():
        rows = _tokenize(data, tokenizer, seq_len, seed)
        if len(rows) <= data.validation_sequences:
            raise PiLoraError(
                f"the data gives {len(rows)} sequence(s) of {seq_len} tokens, too few to train",
                field="data.files" if data.files else "data.dataset",
                fix="add more text, or lower data.seq_len / data.validation_sequences")
        val = rows[: data.validation_sequences]
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        datasets.Dataset.from_list(rows[data.validation_sequences:]).save_to_disk(str(tmp / "train"))
        if val:
            datasets.Dataset.from_list(val).save_to_disk(str(tmp / "validation"))
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # another process finished first
            os.replace(tmp, path)
    train = datasets.load_from_disk(str(path / "train"))
    validation = datasets.load_from_disk(str(path / "validation")) \
        if (path / "validation").is_dir() else None
    tokens = sum(len(x) for x in train["input_ids"])
    return BuiltData(train, validation, tokens, path)


class PackedCollator:
    """Stacks sequences, right-padding mixed lengths (short_mix, chat packs).

    No attention mask is needed: with causal attention, pads at the end are never seen by
    real tokens, and their labels are ignored. Position ids (chat packs) continue the last
    conversation over the pads, so packed-sequence detection stays intact.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
        if "position_ids" in rows[0]:
            batch["position_ids"] = []
        for r in rows:
            gap = width - len(r["input_ids"])
            batch["input_ids"].append(r["input_ids"] + [self.pad_token_id] * gap)
            batch["labels"].append(r["labels"] + [IGNORE_INDEX] * gap)
            if "position_ids" in batch:
                last = r["position_ids"][-1]
                batch["position_ids"].append(r["position_ids"] + list(range(last + 1, last + 1 + gap)))
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
