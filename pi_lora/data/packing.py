"""Token rows -> packed training sequences as memory-mapped Arrow (tokenizing.py makes the rows).

No token passes through a per-token Python loop and no corpus is held in memory: pretraining
blocks are cut by offset arithmetic on the memory-mapped token column, conversations are
packed by trl's `pack_dataset` (best fit decreasing) a bounded number at a time, and what is
left is selected by index. Memory is bounded by tokens, whatever the corpus or document size.

Columns: `input_ids` (int32); for conversations also `assistant_masks` (int8, 1 on tokens the
loss is computed on) and, once packed, trl's `seq_lengths` (lengths of the conversations in a
pack, from which the collator derives position ids). Labels are never stored: the collator
derives them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from pi_lora.data.tokenizing import MASK, TOKENS, is_stream, row_lengths, token_features

LENGTHS = "seq_lengths"  # trl's name
PACK_BATCH_TOKENS = 1 << 22  # rows of packed blocks written at a time (short mix, streams)


def pack_wrapped(tokenized: Any, seq_len: int, max_tokens: int | None, cache_file: str) -> Any:
    """The PI paper's pretraining blocks: documents concatenated, cut every seq_len tokens,
    the last ragged block dropped; `max_tokens` keeps the first max_tokens // seq_len blocks.

    The cut is offset arithmetic on the memory-mapped token column: blocks are copied out
    PACK_BATCH_TOKENS at a time, whatever the document lengths, and no batch drops a tail of
    its own (trl's wrapped packing does, per map batch; on one batch the two agree)."""
    import datasets
    import pyarrow as pa
    from datasets.arrow_writer import ArrowWriter

    assert tokenized._indices is None, "runs on the tokenizer's output"
    values = pa.chunked_array([chunk.flatten() for chunk in tokenized.data.table.column(TOKENS).chunks],
                              type=pa.int32())
    blocks = len(values) // seq_len
    if max_tokens is not None:
        blocks = min(blocks, max_tokens // seq_len)
    per_write = max(1, PACK_BATCH_TOKENS // seq_len)
    with ArrowWriter(features=token_features(TOKENS), path=cache_file) as writer:
        for first in range(0, blocks, per_write):
            count = min(per_write, blocks - first)
            ids = values.slice(first * seq_len, count * seq_len).combine_chunks()
            offsets = pa.array(np.arange(0, (count + 1) * seq_len, seq_len, dtype=np.int32))
            writer.write_table(pa.table({TOKENS: pa.ListArray.from_arrays(offsets, ids)}))
        writer.finalize()
    return datasets.Dataset.from_file(cache_file)


def split_for_short_mix(blocks: Any, short_len: int, fraction: float, seed: int) -> Any:
    """Cut some long blocks into short ones so `fraction` of sequences are short, shuffled.

    With n blocks of which k are split into m = seq_len // short_len pieces, the short
    share is k*m / (n - k + k*m); solving for k gives the number of blocks to split.
    """
    n = len(blocks)
    if not n:
        return blocks
    seq_len = int(row_lengths(blocks.select([0]))[0])
    pieces = seq_len // short_len
    k = round(fraction * n / (pieces - fraction * pieces + fraction))
    rng = random.Random(seed)
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.sample(range(n), min(k, n))] = True

    def cut(table: Any, indices: list[int]) -> Any:
        import pyarrow as pa

        values = table.column(TOKENS).combine_chunks().flatten().to_numpy()
        starts = np.arange(len(indices) + 1) * seq_len
        rows: list[np.ndarray] = []
        for row, index in enumerate(indices):
            block = values[starts[row]:starts[row + 1]]
            rows += ([block[j * short_len:(j + 1) * short_len] for j in range(pieces)]
                     if chosen[index] else [block])
        offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int32)
        column = pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(rows)))
        return pa.table({TOKENS: column})

    mixed = blocks.with_format("arrow").map(cut, batched=True, with_indices=True,
                                            batch_size=max(1, PACK_BATCH_TOKENS // seq_len),
                                            features=token_features(TOKENS),
                                            desc="pi-lora: short mix").with_format(None)
    order = list(range(len(mixed)))
    rng.shuffle(order)
    return mixed.select(order)


# --------------------------------------------------------------------------- conversations


@dataclass(frozen=True)
class ConversationCounts:
    """What fitting conversations into seq_len did, so nothing is cut silently."""

    conversations: int
    truncated: int  # longer than seq_len: cut to seq_len, some answer tokens kept
    dropped: int  # no answer token left within seq_len (or none at all): not trained on


def fit_conversations(tokenized: Any, seq_len: int) -> tuple[Any, ConversationCounts]:
    """Drop conversations with no answer token in their first seq_len tokens; count cuts.

    trl's bfd packing then truncates the long ones to seq_len.
    """
    assert tokenized._indices is None, "runs on the tokenizer's output"
    answers = np.concatenate([_answer_tokens_within(chunk, seq_len)
                              for chunk in tokenized.data.table.column(MASK).chunks] or [[]])
    lengths = row_lengths(tokenized)
    keep = np.nonzero(answers > 0)[0]
    counts = ConversationCounts(len(lengths), int(((lengths > seq_len) & (answers > 0)).sum()),
                                int(len(lengths) - len(keep)))
    return tokenized.select(keep), counts


def _answer_tokens_within(masks: Any, seq_len: int) -> np.ndarray:
    """Per row of one Arrow chunk: how many mask-1 tokens lie in its first seq_len tokens."""
    import pyarrow.compute as pc

    window = pc.list_slice(masks, 0, seq_len)
    sizes = pc.list_value_length(window).to_numpy(zero_copy_only=False)
    running = np.concatenate([[0], np.cumsum(window.flatten().to_numpy(zero_copy_only=False),
                                             dtype=np.int64)])
    ends = np.cumsum(sizes)
    return running[ends] - running[ends - sizes]


PACK_CONVERSATION_TOKENS = 1 << 24  # conversation tokens (each at most seq_len) bfd packs at once


def _conversation_rows(seq_len: int) -> int:
    return max(64, min(1000, PACK_CONVERSATION_TOKENS // seq_len))


def pack_conversations(conversations: Any, seq_len: int, cache_file: str | None = None) -> Any:
    """Whole conversations packed best-fit-decreasing into rows of at most seq_len (trl),
    a bounded number of them at a time (each is truncated to seq_len first)."""
    from trl import pack_dataset

    options: dict[str, Any] = {"batch_size": _conversation_rows(seq_len)}
    if not is_stream(conversations):
        options |= {"cache_file_name": cache_file, "desc": "pi-lora: packing"}
    return pack_dataset(conversations, seq_len, strategy="bfd", map_kwargs=options)


# --------------------------------------------------------------------------- streams


STREAM_TOKEN_ROWS = 8  # tokenized documents read at a time from a stream


def stream_blocks(tokenized: Any, seq_len: int, max_tokens: int | None) -> Any:
    """Pretraining blocks from a token stream, cut as it is read: the same blocks as the
    prepared path (the stream's last ragged block dropped), a document's ids and one block's
    carry held at a time."""
    import datasets

    limit = max_tokens // seq_len if max_tokens is not None else None

    def blocks() -> Any:
        carry, made = np.zeros(0, dtype=np.int32), 0
        for batch in tokenized.with_format("arrow").iter(batch_size=STREAM_TOKEN_ROWS):
            column = batch.column(TOKENS).combine_chunks()
            ids = np.concatenate([carry, column.flatten().to_numpy(zero_copy_only=False)
                                  .astype(np.int32, copy=False)])
            full = len(ids) // seq_len
            for i in range(full):
                if limit is not None and made >= limit:
                    return
                yield {TOKENS: ids[i * seq_len:(i + 1) * seq_len]}
                made += 1
            carry = ids[full * seq_len:]

    return datasets.IterableDataset.from_generator(blocks, features=token_features(TOKENS))


def stream_fitting(tokenized: Any, seq_len: int) -> Any:
    """Conversations with an answer token within seq_len, cut to seq_len (as bfd packing
    would), as they stream by (not counted: a stream has no length to count against)."""
    fitting = tokenized.filter(lambda mask: any(mask[:seq_len]), input_columns=[MASK])
    return fitting.map(lambda ids, mask: {TOKENS: ids[:seq_len], MASK: mask[:seq_len]},
                       input_columns=[TOKENS, MASK])
