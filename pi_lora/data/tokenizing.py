"""Text -> token ids with memory bounded by tokens, not rows, at any document length.

A corpus of books (PG19, RedPajama-Books: 50K-500K tokens a document) held 256 rows at a
time costs gigabytes: the documents, the tokenizer's encodings (~100 bytes a token) and
Python lists of ids (~36 bytes a token). Here a map batch holds at most TEXT_BUDGET_BYTES of
text, sized from the rows' byte lengths (Arrow offsets, read without the text); the fast
tokenizer runs without offsets (`encode_batch_fast`) on at most ENCODE_BYTES at a time; ids
leave as int32 Arrow arrays; and a document longer than PIECE_CHARS is encoded in pieces cut
only where the tokenizer gives the same tokens cut or uncut (checked at every cut), so its
ids are those of the whole text.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pi_lora.data import files as records

TOKENS = "input_ids"
MASK = "assistant_masks"
TEXT_BUDGET_BYTES = 16 << 20  # text one map batch holds (its ids: ~1.5x that as int32)
ENCODE_BYTES = 512 << 10  # text one encode call holds (its encodings: ~40x that, briefly)
PIECE_CHARS = 64 << 10  # a longer document is encoded in pieces of about this size
LONG_PIECES_PER_CALL = 2  # pieces per encode call (two cores' work, ~10 MB of encodings)
CUT_WINDOW = 512  # characters each side of a cut that must tokenize the same cut or uncut
CUT_TRIES = 64  # candidate cuts tried per piece before the rest is encoded whole
MAX_BATCH_ROWS = 1024
STREAM_BATCH_ROWS = 8  # a stream's rows have no known length: few at a time
PROCESS_BYTES = 4 << 20  # below this much text, worker processes cost more than they save


# --------------------------------------------------------------------------- batch sizes


def text_bytes(table: Any, columns: list[str]) -> np.ndarray:
    """Bytes of text per row over `columns` (strings, or lists of chat messages), read from
    the Arrow offsets: no string is materialised."""
    import pyarrow as pa
    import pyarrow.compute as pc

    total = np.zeros(table.num_rows, dtype=np.int64)
    for name in columns:
        column = table.column(name)
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        parts = [_leaf_bytes(chunk, pc) for chunk in chunks]
        if parts:
            total += np.concatenate(parts)
    return total


def _leaf_bytes(array: Any, pc: Any) -> np.ndarray:
    """Per row of one array: the bytes of every string inside it."""
    import pyarrow as pa

    kind = array.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
        return pc.fill_null(pc.binary_length(array), 0).to_numpy(zero_copy_only=False)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        inner = _leaf_bytes(array.flatten(), pc)
        parents = pc.list_parent_indices(array).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=inner, minlength=len(array)).astype(np.int64)
    if pa.types.is_struct(kind):
        fields = [_leaf_bytes(array.field(i), pc) for i in range(kind.num_fields)]
        return np.sum(fields, axis=0).astype(np.int64) if fields else np.zeros(len(array), np.int64)
    return np.zeros(len(array), dtype=np.int64)


def batch_rows(dataset: Any, columns: list[str]) -> int:
    """Rows per map batch: as many as keep a batch of the longest rows under the budget."""
    if is_stream(dataset):
        return STREAM_BATCH_ROWS
    longest = int(row_bytes(dataset, columns).max()) if len(dataset) else 1
    return max(1, min(MAX_BATCH_ROWS, TEXT_BUDGET_BYTES // max(longest, 1)))


def auto_num_proc(dataset: Any, columns: list[str], requested: int | None) -> int | None:
    """One tokenizer process per core (up to 16) for a large input; None (in-process, where
    the Rust tokenizer still uses every core) for a small one or a stream."""
    if requested is not None:
        return requested if requested > 1 else None
    if is_stream(dataset) or not len(dataset):
        return None
    cores = min(16, len(os.sched_getaffinity(0)))
    large = int(row_bytes(dataset, columns).sum()) >= PROCESS_BYTES
    return cores if large and cores > 1 else None


def row_bytes(dataset: Any, columns: list[str]) -> np.ndarray:
    """`text_bytes` of a Dataset's rows, following a `select`'s indices (no row copied)."""
    sizes = text_bytes(dataset.data.table, columns)
    if dataset._indices is None:
        return sizes
    return sizes[dataset._indices.column(0).to_numpy(zero_copy_only=False)]


def is_stream(dataset: Any) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def column_names(dataset: Any) -> list[str]:
    """Columns of a Dataset, or of a stream whose schema is only known from its first row."""
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset.take(1)), None)
    return list(first) if first else []


def row_lengths(dataset: Any, column: str = TOKENS) -> np.ndarray:
    """Lengths of every row, read from the Arrow offsets (no row is materialised); follows
    a `select`'s index mapping instead of copying the rows."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(dataset.data.table.column(column)).to_numpy(zero_copy_only=False)
    if dataset._indices is None:
        return lengths
    return lengths[dataset._indices.column(0).to_numpy(zero_copy_only=False)]


def count_tokens(dataset: Any) -> int:
    return int(row_lengths(dataset).sum()) if len(dataset) else 0


def token_features(*columns: str) -> Any:
    import datasets

    types = {TOKENS: datasets.Value("int32"), MASK: datasets.Value("int8")}
    return datasets.Features({c: datasets.List(types[c]) for c in columns})


def map_tokens(dataset: Any, encode: Callable[..., tuple[list[np.ndarray], list[np.ndarray] | None]],
               columns: list[str], features: Any, num_proc: int | None,
               cache_file: str | None) -> Any:
    """`dataset.map` of `encode(*column values)` -> (ids rows, mask rows or None), over
    batches sized by `batch_rows`: a Dataset's output leaves as one Arrow table a batch
    (written at once, in worker processes, to a cache file); a stream's lazily, in this
    process. The inputs are decoded by datasets (its Json feature included)."""
    rows = batch_rows(dataset, columns)
    stream = is_stream(dataset)

    def function(*values: list[Any]) -> Any:
        ids, masks = encode(*values)
        if stream:
            return {TOKENS: ids} | ({MASK: masks} if masks is not None else {})
        return ids_table(ids, masks)

    options: dict[str, Any] = {} if stream else {
        "num_proc": num_proc, "cache_file_name": cache_file, "desc": "pi-lora: tokenizing",
        "writer_batch_size": rows}
    with _one_thread_per_process(num_proc):
        return dataset.map(function, batched=True, batch_size=rows, input_columns=columns,
                           remove_columns=column_names(dataset), features=features, **options)


@contextlib.contextmanager
def _one_thread_per_process(num_proc: int | None) -> Iterator[None]:
    """Worker processes tokenize one thread each: the Rust tokenizer's own threads on top
    of one process per core cost ~20% of the throughput (measured, 2 cores)."""
    if not num_proc:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the workers as they start
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def ids_table(rows: list[np.ndarray], masks: list[np.ndarray] | None = None) -> Any:
    """Rows of ids (and assistant masks) as an Arrow table of int32 (int8) lists."""
    import pyarrow as pa

    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    offsets = pa.array(offsets.astype(np.int32))

    def column(parts: list[np.ndarray], dtype: Any) -> Any:
        values = np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(0, dtype)
        return pa.ListArray.from_arrays(offsets, pa.array(values))

    columns = {TOKENS: column(rows, np.int32)}
    if masks is not None:
        columns[MASK] = column(masks, np.int8)
    return pa.table(columns)


# --------------------------------------------------------------------------- documents


class DocumentEncoder:
    """Documents -> int32 ids, each exactly as the tokenizer gives the whole text (BOS as it
    adds one), then EOS; an empty or missing document gives no ids."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend if backend is not None and self._agrees(backend) else None
        if self.backend is None:
            print("pi-lora: this tokenizer's Rust core alone does not give its tokens: "
                  "tokenizing through transformers (about half the speed, documents whole)",
                  file=sys.stderr, flush=True)
        self.affixes = _special_affixes(self.backend) if self.backend is not None else None

    def _agrees(self, backend: Any) -> bool:
        """The Rust tokenizer alone gives what the transformers tokenizer gives (it may add
        tokens of its own in Python: then that slower call is used)."""
        probe = ["Hello world.\n\nThe end, 12345 ", "  x"]
        ours = [e.ids for e in backend.encode_batch_fast(probe, add_special_tokens=True)]
        theirs = self.tokenizer(probe, add_special_tokens=True, return_attention_mask=False,
                                return_token_type_ids=False)["input_ids"]
        return ours == [list(t) for t in theirs]

    def encode(self, texts: list[str | None]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        group: list[str] = []
        size = 0
        for text in texts:
            if size + len(text or "") > ENCODE_BYTES and group:
                out += self._encode_group(group)
                group, size = [], 0
            group.append(text or "")
            size += len(text or "")
        if group:
            out += self._encode_group(group)
        return out

    def _encode_group(self, texts: list[str]) -> list[np.ndarray]:
        end = np.array([self.eos] if self.eos is not None else [], dtype=np.int32)
        if self.backend is None:
            ids = self.tokenizer(texts, add_special_tokens=True, return_attention_mask=False,
                                 return_token_type_ids=False)["input_ids"]
            return [np.concatenate([np.asarray(r, np.int32), end]) if t else end[:0]
                    for r, t in zip(ids, texts, strict=True)]
        out = [end[:0] if not text or self._whole(text) else self._encode_long(text, end)
               for text in texts]
        whole = [i for i, text in enumerate(texts) if text and self._whole(text)]  # one batched call
        encodings = self.backend.encode_batch_fast([texts[i] for i in whole], add_special_tokens=True)
        for i, encoding in zip(whole, encodings, strict=True):
            out[i] = np.concatenate([_int32(encoding.ids), end])
        return out

    def _whole(self, text: str) -> bool:
        return len(text) <= PIECE_CHARS or self.affixes is None

    def _encode_long(self, text: str, end: np.ndarray) -> np.ndarray:
        """A long document in pieces cut at exact token boundaries, with the specials the
        tokenizer puts around a whole text."""
        assert self.backend is not None and self.affixes is not None
        bounds = [0, *exact_cuts(text, self.backend), len(text)]
        pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
        parts = [np.asarray(self.affixes[0], np.int32)]
        for start in range(0, len(pieces), LONG_PIECES_PER_CALL):
            batch = pieces[start:start + LONG_PIECES_PER_CALL]
            parts += [_int32(e.ids)
                      for e in self.backend.encode_batch_fast(batch, add_special_tokens=False)]
        parts += [np.asarray(self.affixes[1], np.int32), end]
        return np.concatenate(parts)


def _int32(ids: list[int]) -> np.ndarray:
    return np.fromiter(ids, dtype=np.int32, count=len(ids))  # ~2x np.asarray on a list


def _special_affixes(backend: Any) -> tuple[list[int], list[int]] | None:
    """The special tokens the tokenizer puts before and after a whole text (BOS, ...), or
    None where they are not a plain prefix and suffix (long documents are then not cut)."""
    plain = backend.encode("a b", add_special_tokens=False).ids
    full = backend.encode("a b", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return None


def exact_cuts(text: str, backend: Any) -> list[int]:
    """Positions about every PIECE_CHARS where `text` may be cut without changing its tokens:
    after a line break, before a non-space (a pre-token boundary for byte-level BPE,
    tiktoken-style and SentencePiece tokenizers alike), and only where the CUT_WINDOW
    characters on each side tokenize the same cut as uncut. A tokenizer that never agrees
    (one that prefixes every text, say) gets no cut: the document is encoded whole."""
    cuts: list[int] = []
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = _first_exact_cut(text, backend, start + PIECE_CHARS // 2, start + PIECE_CHARS)
        if cut is None:
            break
        cuts.append(cut)
        start = cut
    return cuts


def _first_exact_cut(text: str, backend: Any, lo: int, hi: int) -> int | None:
    for position in itertools.islice(_candidates(text, lo, hi), CUT_TRIES):
        left, right = text[max(0, position - CUT_WINDOW):position], text[position:position + CUT_WINDOW]
        whole, a, b = backend.encode_batch_fast([left + right, left, right], add_special_tokens=False)
        if whole.ids == a.ids + b.ids:
            return position
    return None


def _candidates(text: str, lo: int, hi: int) -> Iterator[int]:
    """Line starts in [lo, hi) that begin with a non-space, then word starts (a space
    between two non-spaces, the cut before it)."""
    position = text.find("\n", lo, hi)
    while position != -1:
        if position + 1 < len(text) and not text[position + 1].isspace():
            yield position + 1
        position = text.find("\n", position + 1, hi)
    position = text.find(" ", lo, hi)
    while position != -1:
        if 0 < position < len(text) - 1 and not text[position - 1].isspace() \
                and not text[position + 1].isspace():
            yield position
        position = text.find(" ", position + 1, hi)


def tokenize_documents(raw: Any, tokenizer: Any, field: str, num_proc: int | None,
                       cache_file: str | None = None) -> Any:
    """One row of int32 token ids per document, each ending in EOS (BOS as the tokenizer
    adds it); an empty document gives an empty row (packing skips it)."""
    encoder = DocumentEncoder(tokenizer)

    def encode(texts: list[str | None]) -> tuple[list[np.ndarray], None]:
        for text in texts:  # a Dataset's column is checked ahead; a stream's here
            records.check_text(text, field, "data.text_field")
        return encoder.encode(texts), None

    return map_tokens(raw, encode, [field], token_features(TOKENS), num_proc, cache_file)


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
    """Rows of (input_ids int32, assistant_masks int8); `to_messages(*column values)` ->
    messages. Batches hold at most TEXT_BUDGET_BYTES of conversation text."""

    def encode(*batch: list[Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        ids, masks = [], []
        for values in zip(*batch, strict=True):
            row, mask = conversation_tokens(to_messages(*values), tokenizer)
            ids.append(np.asarray(row, dtype=np.int32))
            masks.append(np.asarray(mask, dtype=np.int8))
        return ids, masks

    return map_tokens(raw, encode, columns, token_features(TOKENS, MASK), num_proc, cache_file)
