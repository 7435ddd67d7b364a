"""Tokenized, packed training sequences as memory-mapped Arrow: `datasets.map` + trl packing.

No token passes through a per-token Python loop and no corpus is held in Python lists: the
fast tokenizer works on batches of documents inside `datasets.map` (worker processes write
Arrow shards), packing is trl's `pack_dataset` (offset arithmetic on Arrow arrays), and what
is left is selected by index. Memory stays one map batch deep, whatever the corpus size.

Columns: `input_ids` (int32); for conversations also `assistant_masks` (int8, 1 on tokens the
loss is computed on) and, once packed, trl's `seq_lengths` (lengths of the conversations in a
pack, from which the collator derives position ids). Labels are never stored: the collator
derives them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from pi_lora.data import files as records

TOKENS = "input_ids"
MASK = "assistant_masks"
LENGTHS = "seq_lengths"  # trl's name
PACK_BATCH_TOKENS = 1 << 24  # wrapped packing drops each batch's tail (< seq_len): ~0.1% at 16k
TOKENIZE_BATCH = 256
SMALL_INPUT_ROWS = 2000  # below this, worker processes cost more than they save


def auto_num_proc(rows: int, requested: int | None) -> int | None:
    """One tokenizer process per core (up to 16) for large inputs; None (in-process) else."""
    if requested is not None:
        return requested if requested > 1 else None
    cores = min(16, len(os.sched_getaffinity(0)))
    return cores if rows >= SMALL_INPUT_ROWS and cores > 1 else None


def is_stream(dataset: Any) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def _map_options(dataset: Any, num_proc: int | None, cache_file: str | None,
                 desc: str = "pi-lora: tokenizing") -> dict[str, Any]:
    """What `map` takes besides the function: worker processes and a cache file for a
    Dataset; an IterableDataset (streaming) maps lazily in the reading process."""
    if is_stream(dataset):
        return {}
    return {"num_proc": num_proc, "cache_file_name": cache_file, "desc": desc}


def column_names(dataset: Any) -> list[str]:
    """Columns of a Dataset, or of a stream whose schema is only known from its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset.take(1)), None)
    return list(first) if first else []


def _token_features(*columns: str) -> Any:
    import datasets

    types = {TOKENS: datasets.Value("int32"), MASK: datasets.Value("int8")}
    return datasets.Features({c: datasets.List(types[c]) for c in columns})


# --------------------------------------------------------------------------- pretraining text


def tokenize_documents(raw: Any, tokenizer: Any, field: str, num_proc: int | None,
                       cache_file: str | None = None) -> Any:
    """One row of token ids per document, each ending in EOS (BOS as the tokenizer adds it);
    an empty document gives an empty row (packing skips it)."""
    eos = tokenizer.eos_token_id

    def encode(texts: list[str | None]) -> dict[str, list[list[int]]]:
        for text in texts:  # a Dataset's column is checked ahead; a stream's here
            records.check_text(text, field, "data.text_field")
        texts = [t or "" for t in texts]
        ids = tokenizer(texts, add_special_tokens=True, return_attention_mask=False,
                        return_token_type_ids=False)["input_ids"]
        end = [eos] if eos is not None else []
        return {TOKENS: [row + end if text else [] for row, text in zip(ids, texts, strict=True)]}

    return raw.map(encode, batched=True, batch_size=TOKENIZE_BATCH, input_columns=[field],
                   remove_columns=column_names(raw), features=_token_features(TOKENS),
                   **_map_options(raw, num_proc, cache_file))


SHARD_DOCUMENTS = 20_000  # with max_tokens, documents are tokenized a shard at a time


def tokenize_documents_up_to(raw: Any, tokenizer: Any, field: str, num_proc: int | None,
                             cache_prefix: str, max_tokens: int | None) -> Any:
    """`tokenize_documents`, stopping after the shard that reaches `max_tokens`: a 1B-token
    run on a 1T-token corpus reads what it uses, not the corpus."""
    import datasets

    if max_tokens is None:
        return tokenize_documents(raw, tokenizer, field, num_proc, f"{cache_prefix}.arrow")
    shards, total = [], 0
    for start in range(0, len(raw), SHARD_DOCUMENTS):
        shard = raw.select(range(start, min(start + SHARD_DOCUMENTS, len(raw))))
        shards.append(tokenize_documents(shard, tokenizer, field, num_proc,
                                         f"{cache_prefix}-{start}.arrow"))
        total += count_tokens(shards[-1])
        if total >= max_tokens:
            break
    return datasets.concatenate_datasets(shards)


def row_lengths(dataset: Any, column: str = TOKENS) -> np.ndarray:
    """Lengths of every row, read from the Arrow offsets (no row is materialised); follows
    a `select`'s index mapping instead of copying the rows."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.table.column(column)).to_numpy(zero_copy_only=False)
    return lengths if dataset._indices is None else lengths[_indices(dataset)]


def _indices(dataset: Any) -> np.ndarray:
    return dataset._indices.column(0).to_numpy(zero_copy_only=False)


def count_tokens(dataset: Any) -> int:
    return int(row_lengths(dataset).sum()) if len(dataset) else 0


def pack_wrapped(tokenized: Any, seq_len: int, max_tokens: int | None,
                 cache_file: str | None = None) -> Any:
    """The PI paper's pretraining blocks: documents concatenated, cut every seq_len tokens,
    ragged tails dropped; `max_tokens` keeps the first max_tokens // seq_len blocks."""
    from trl import pack_dataset

    lengths = row_lengths(tokenized)
    mean = max(float(lengths.mean()), 1.0) if len(lengths) else 1.0
    batch = max(1, int(PACK_BATCH_TOKENS / mean))
    packed = pack_dataset(tokenized, seq_len, strategy="wrapped",
                          map_kwargs={"batch_size": batch, "cache_file_name": cache_file,
                                      "desc": "pi-lora: packing"})
    full = np.nonzero(row_lengths(packed) == seq_len)[0]
    if max_tokens is not None:
        full = full[: max_tokens // seq_len]
    return packed.select(full)


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
                                            features=_token_features(TOKENS),
                                            desc="pi-lora: short mix").with_format(None)
    order = list(range(len(mixed)))
    rng.shuffle(order)
    return mixed.select(order)


# --------------------------------------------------------------------------- conversations


def alpaca_messages(instruction: str, extra: str | None, output: str) -> list[dict[str, str]]:
    """An alpaca/LongAlpaca row as a conversation: the user asks, the assistant answers."""
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def conversation_tokens(messages: list[dict[str, str]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input_ids, assistant mask): the template's tokens, 1 on every assistant answer."""
    ids: list[int] = []
    mask: list[int] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = list(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False))
        full = list(tokenizer.apply_chat_template(messages[: i + 1], tokenize=True,
                                                  return_dict=False))
        new_prompt, answer = prompt[len(ids):], full[len(prompt):]
        ids += new_prompt + answer
        mask += [0] * len(new_prompt) + [1] * len(answer)
    return ids, mask


def tokenize_conversations(raw: Any, tokenizer: Any, to_messages: Any, columns: list[str],
                           num_proc: int | None, cache_file: str | None = None) -> Any:
    """Rows of (input_ids, assistant_masks); `to_messages(*column values)` -> messages."""

    def encode(*batch: list[Any]) -> dict[str, list[list[int]]]:
        out: dict[str, list[list[int]]] = {TOKENS: [], MASK: []}
        for values in zip(*batch, strict=True):
            ids, mask = conversation_tokens(to_messages(*values), tokenizer)
            out[TOKENS].append(ids)
            out[MASK].append(mask)
        return out

    return raw.map(encode, batched=True, batch_size=TOKENIZE_BATCH, input_columns=columns,
                   remove_columns=column_names(raw), features=_token_features(TOKENS, MASK),
                   **_map_options(raw, num_proc, cache_file))


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


def pack_conversations(conversations: Any, seq_len: int, cache_file: str | None = None) -> Any:
    """Whole conversations packed best-fit-decreasing into rows of at most seq_len (trl)."""
    from trl import pack_dataset

    options = _map_options(conversations, None, cache_file, "pi-lora: packing")
    return pack_dataset(conversations, seq_len, strategy="bfd", map_kwargs=options)


# --------------------------------------------------------------------------- streams


STREAM_PACK_DOCS = 1000  # documents per on-the-fly packing batch (its tail is dropped)


def stream_blocks(tokenized: Any, seq_len: int, max_tokens: int | None) -> Any:
    """Pretraining blocks from a token stream, packed as it is read (trl, wrapped)."""
    from trl import pack_dataset

    # a stream's batches are typed from their rows: an empty row would type as list<null>
    documents = tokenized.filter(len, input_columns=[TOKENS])
    packed = pack_dataset(documents, seq_len, strategy="wrapped",
                          map_kwargs={"batch_size": STREAM_PACK_DOCS})
    full = packed.filter(lambda ids: len(ids) == seq_len, input_columns=[TOKENS])
    return full.take(max_tokens // seq_len) if max_tokens is not None else full


def stream_fitting(tokenized: Any, seq_len: int) -> Any:
    """Conversations with an answer token within seq_len, as they stream by (not counted:
    a stream has no length to count against)."""
    return tokenized.filter(lambda mask: any(mask[:seq_len]), input_columns=[MASK])
