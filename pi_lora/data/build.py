"""Datasets -> tokenized, packed training sequences, cached on disk as Arrow (see packing.py).

Pretrain mode follows the PI paper: documents are tokenized, joined with EOS and cut into
blocks of the training length, so every token trains at long range. Chat and instruction
modes pack whole conversations into blocks without padding; position ids restart at each
conversation, which transformers turns into a block-diagonal causal mask, so samples never
attend to each other.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.digest import cache_root, file_sha256
from pi_lora.core.errors import PiLoraError
from pi_lora.data import IGNORE_INDEX, layouts, packing, tokenizing
from pi_lora.data import files as records
from pi_lora.data.files import BUILDERS, reading_files
from pi_lora.data.packing import ConversationCounts
from pi_lora.data.pose import PoseSkips
from pi_lora.recipe.loading import DataSection

CACHE_VERSION = 4


def default_cache_dir() -> Path:
    return cache_root() / "data"


# --------------------------------------------------------------------------- raw data


def expand_files(files: list[str]) -> list[Path]:
    """Glob patterns expanded; each missing entry named by its index in data.files."""
    paths: list[Path] = []
    for index, pattern in enumerate(files):
        expanded = os.path.expanduser(pattern)
        # a path that exists is taken as written (its name may hold glob characters: [1])
        matches = [expanded] if os.path.exists(expanded) else sorted(glob.glob(expanded,
                                                                               recursive=True))
        found = [Path(m).resolve() for m in matches if Path(m).is_file()]
        if not found:
            raise _no_file(pattern, matches, f"data.files[{index}]")
        paths += found
    unknown = sorted({p.suffix for p in paths} - set(BUILDERS))
    if unknown:
        example = next(p for p in paths if p.suffix in unknown)
        raise PiLoraError(f"unsupported file type(s) {unknown} (e.g. {example})", field="data.files",
                          fix=f"use one of {sorted(BUILDERS)}")
    if len({BUILDERS[p.suffix] for p in paths}) > 1:
        raise PiLoraError("files mix formats", field="data.files",
                          fix="use one format per recipe (all text, all jsonl or all parquet)")
    return paths


def _no_file(pattern: str, matches: list[str], field: str) -> PiLoraError:
    if any(Path(m).is_dir() for m in matches):
        return PiLoraError(f"{pattern} is a directory, not a data file", field=field,
                           fix=f"name the files in it, e.g. {pattern.rstrip('/')}/*.jsonl")
    if matches:
        return PiLoraError(f"{pattern} is not a regular file (a broken link?)", field=field,
                           fix="point data.files at the data files themselves")
    return PiLoraError(f"{pattern} matches no file", field=field,
                       fix="check the path (relative to the current directory)")


def load_raw(data: DataSection) -> Any:
    """Raw records from local files or a hub dataset: a `datasets.Dataset`, or with
    `data.streaming` an `IterableDataset` read lazily (nothing downloaded or converted ahead)."""
    import datasets

    if data.files:
        paths = expand_files(data.files)
        builder = BUILDERS[paths[0].suffix]
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        with reading_files(paths, loading=True):
            return datasets.load_dataset(builder, data_files=[str(p) for p in paths],
                                         split="train", streaming=data.streaming, **kwargs)
    assert data.dataset is not None
    source = data.dataset
    try:
        return datasets.load_dataset(source.name, source.config, split=source.split,
                                     revision=source.revision, streaming=data.streaming)
    except Exception as exc:  # datasets raises many types for offline / missing data
        raise PiLoraError(f"cannot load dataset {source.name!r}: {str(exc).splitlines()[0][:200]}",
                          field="data.dataset.name",
                          fix="download it first, or use data.files with local files") from None


def _require_columns(raw: Any, data: DataSection) -> None:
    """The columns data.format reads (layouts' one list, which validate checks too)."""
    columns = tokenizing.column_names(raw)
    for column, field in layouts.required_columns(data):
        if column not in columns:  # chat records under format pretrain: the setting named
            raise layouts.missing_column(data, column, field, columns, layouts.first_record(raw))


# --------------------------------------------------------------------------- building + cache


@dataclass(frozen=True)
class BuiltData:
    train: Any  # Dataset (memory-mapped cache) or, streaming, IterableDataset
    validation: Any | None
    tokens: int | None  # real (non-pad) tokens in train; None for a stream
    cache_path: Path | None  # None for a stream
    # mean real tokens per training row: what tokens/s counts (not seq_len x batch)
    tokens_per_sequence: float
    conversations: ConversationCounts | None = None  # chat/instruction: what seq_len cut

    @property
    def sequences(self) -> int | None:
        return None if self.cache_path is None else len(self.train)


def _fingerprint(data: DataSection, tokenizer: Any, seq_len: int, seed: int) -> str:
    sources: Any
    if data.files:
        # by content: a file rewritten with new text but the same size is a new dataset
        sources = [(str(p), file_sha256(p)) for p in expand_files(data.files)]
    else:
        sources = data.dataset.model_dump() if data.dataset else None
    key = {"v": CACHE_VERSION, "sources": sources, "seq_len": seq_len, "seed": seed,
           "data": data.model_dump(exclude={"files", "cache_dir", "num_proc"}),
           "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id,
                         tokenizer.bos_token_id, tokenizer.chat_template]}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _sequences(data: DataSection, tokenizer: Any, seq_len: int, seed: int,
               work: Path) -> tuple[Any, ConversationCounts | None]:
    """Packed rows (Arrow, cached in `work`) and, for conversations, what fitting cost."""
    raw = load_raw(data)
    _require_columns(raw, data)
    if data.format == "pretrain":
        records.check_text_column(raw, data.text_field, "data.text_field", _where(data))
        num_proc = tokenizing.auto_num_proc(raw, [data.text_field], data.num_proc)
        tokens = tokenizing.tokenize_documents_up_to(raw, tokenizer, data.text_field, num_proc,
                                                     str(work / "tokens"), data.max_tokens)
        blocks = packing.pack_wrapped(tokens, seq_len, data.max_tokens, str(work / "packed.arrow"))
        if data.short_mix:
            blocks = packing.split_for_short_mix(blocks, data.short_mix.seq_len,
                                                 data.short_mix.fraction, seed)
        return blocks, None
    _check_chat_template(tokenizer)
    columns, to_messages = _conversation_reader(data, raw)
    num_proc = tokenizing.auto_num_proc(raw, columns, data.num_proc)
    try:
        tokens = tokenizing.tokenize_conversations(raw, tokenizer, to_messages, columns,
                                                   num_proc, str(work / "tokens.arrow"))
    except PiLoraError as err:
        raise _at_record(err, raw, columns, to_messages, _where(data)) from None
    fitting, counts = packing.fit_conversations(tokens, seq_len)
    return packing.pack_conversations(fitting, seq_len, str(work / "packed.arrow")), counts


def _conversation_reader(data: DataSection, raw: Any) -> tuple[list[str], Any]:
    """The columns a conversation is read from and how they become chat messages."""
    if data.format == "chat":
        return [data.messages_field], records.chat_messages
    fields = data.instruction_fields
    if fields.input in tokenizing.column_names(raw):
        return [fields.instruction, fields.input, fields.output], _alpaca
    return [fields.instruction, fields.output], lambda instruction, output: _alpaca(
        instruction, None, output)


def _at_record(err: PiLoraError, raw: Any, columns: list[str], to_messages: Any,
               where: str) -> PiLoraError:
    """`err` (raised inside a tokenizing worker) with the first record it concerns: the
    records are read again, in this process, only now that one has failed."""
    for index, row in enumerate(raw.select_columns(columns)):
        try:
            to_messages(*(row[c] for c in columns))
        except PiLoraError:
            return PiLoraError(f"record {index + 1} of {where}: {err.message}", field=err.field,
                               fix=err.fix)
    return PiLoraError(f"{where}: {err.message}", field=err.field, fix=err.fix)


def _alpaca(instruction: Any, extra: Any, output: Any) -> list[dict[str, str]]:
    records.alpaca_fields(instruction, extra, output)
    return tokenizing.alpaca_messages(instruction, extra, output)


def _where(data: DataSection) -> str:
    """The data's source, as a message names it."""
    if not data.files:
        return f"dataset {data.dataset.name if data.dataset else '?'}"
    return data.files[0] if len(data.files) == 1 else f"data.files ({len(data.files)} entries)"


def build_train_dataset(data: DataSection, tokenizer: Any, seq_len: int, *, seed: int,
                        cache_dir: Path | None = None) -> BuiltData:
    """Tokenized, packed sequences, built once per (content, tokenizer, settings) and reused.

    The build writes into a temporary directory beside the cache entry and renames it into
    place, so a concurrent or killed build never leaves a half-written entry; every later
    call (every other rank) memory-maps the Arrow files.
    """

    if data.streaming:
        return _stream(data, tokenizer, seq_len, seed)
    root = Path(data.cache_dir) if data.cache_dir else (cache_dir or default_cache_dir())
    path = root / _fingerprint(data, tokenizer, seq_len, seed)
    built = _open_entry(path) if (path / "train").is_dir() else None
    if built is None:
        try:
            _build(data, tokenizer, seq_len, seed, path)
        except PermissionError as exc:  # EACCES / EPERM; EROFS below
            raise _unwritable_cache(root, exc) from None
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            raise _unwritable_cache(root, exc) from None
        built = _open_entry(path, fresh=True)
    assert built is not None
    return built


def _open_entry(path: Path, *, fresh: bool = False) -> BuiltData | None:
    """A cache entry, checked as it is opened: every Arrow file read to its end, the json
    parsed. A broken entry (truncated, garbled) is named and removed for a rebuild (None);
    one just built that is broken is an error."""
    import datasets

    try:
        train = datasets.load_from_disk(str(path / "train"))
        validation = datasets.load_from_disk(str(path / "validation")) \
            if (path / "validation").is_dir() else None
        counts_file = path / "conversations.json"
        counts = ConversationCounts(**json.loads(counts_file.read_text())) \
            if counts_file.is_file() else None
        tokens = tokenizing.count_tokens(train)  # touches every row: a short file fails here
        if validation is not None:
            tokenizing.count_tokens(validation)
    except Exception as exc:  # datasets / pyarrow / json each raise their own kinds
        if fresh:
            raise
        print(f"pi-lora: the data cache entry {path} is unreadable ({type(exc).__name__}: "
              f"{str(exc)[:160]}); rebuilding it", file=sys.stderr, flush=True)
        shutil.rmtree(path, ignore_errors=True)
        return None
    return BuiltData(train, validation, tokens, path, tokens / max(len(train), 1), counts)


def _unwritable_cache(root: Path, exc: OSError) -> PiLoraError:
    return PiLoraError(f"the data cache {root} cannot be written ({exc.strerror})",
                       field="data.cache_dir",
                       fix="set data.cache_dir (or PI_LORA_CACHE) to a writable directory")


STREAM_SHUFFLE_TOKENS = 1 << 21  # tokens of packed rows a stream is shuffled within
STREAM_SHUFFLE_ROWS = (8, 256)  # ... as at least 8, at most 256 rows
STREAM_SAMPLE_ROWS = 64  # packs that estimate a chat stream's tokens per row


def _stream(data: DataSection, tokenizer: Any, seq_len: int, seed: int) -> BuiltData:
    """A stream tokenized and packed as it is read (each epoch anew), shuffled in a buffer;
    the first validation_sequences packed rows are held out in memory."""
    import datasets

    raw = load_raw(data)
    paths = expand_files(data.files) if data.files else []
    with reading_files(paths):
        _require_columns(raw, data)
        if data.format == "pretrain":
            tokens = tokenizing.tokenize_documents(raw, tokenizer, data.text_field, None)
            rows = packing.stream_blocks(tokens, seq_len, data.max_tokens)
        else:
            _check_chat_template(tokenizer)
            columns, to_messages = _conversation_reader(data, raw)
            tokens = tokenizing.tokenize_conversations(raw, tokenizer, to_messages, columns, None)
            rows = packing.pack_conversations(packing.stream_fitting(tokens, seq_len), seq_len)
        held_out = list(rows.take(data.validation_sequences)) if data.validation_sequences else []
        sample = [len(r[packing.TOKENS]) for r in rows.take(STREAM_SAMPLE_ROWS)]
    validation = datasets.Dataset.from_list(held_out) if held_out else None
    low, high = STREAM_SHUFFLE_ROWS
    buffer = max(low, min(high, STREAM_SHUFFLE_TOKENS // seq_len))  # bounded by tokens too
    train = _read_guarded(rows.skip(len(held_out)), paths).shuffle(seed=seed, buffer_size=buffer)
    if not sample:
        raise PiLoraError(f"the data stream gives no sequence of {seq_len} tokens",
                          field="data.files" if data.files else "data.dataset",
                          fix="check the data, or lower data.seq_len")
    return BuiltData(train, validation, None, None, sum(sample) / len(sample))


def _read_guarded(rows: Any, paths: list[Path]) -> Any:
    """The stream as training reads it, hours in: a bad record in a later file is the same
    one message naming file and line as at the start, not a traceback from inside the
    Trainer's data loader."""
    import datasets

    def generate() -> Iterator[dict[str, Any]]:
        with reading_files(paths):
            yield from rows

    return datasets.IterableDataset.from_generator(generate)


def _check_chat_template(tokenizer: Any) -> None:
    if tokenizer.chat_template is None:
        raise PiLoraError("the tokenizer has no chat template", field="data.format",
                          fix="use format: pretrain, or a model/tokenizer with a chat template")


def _build(data: DataSection, tokenizer: Any, seq_len: int, seed: int, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows, counts = _sequences(data, tokenizer, seq_len, seed, tmp / "work")
        held_out = data.validation_sequences
        if len(rows) <= held_out:
            raise PiLoraError(
                f"the data gives {len(rows)} sequence(s) of {seq_len} tokens, too few to train",
                field="data.files" if data.files else "data.dataset",
                fix="add more text, or lower data.seq_len / data.validation_sequences")
        rows.select(range(held_out, len(rows))).save_to_disk(str(tmp / "train"))
        if held_out:
            rows.select(range(held_out)).save_to_disk(str(tmp / "validation"))
        if counts is not None:
            (tmp / "conversations.json").write_text(json.dumps(asdict(counts)))
        shutil.rmtree(tmp / "work", ignore_errors=True)  # intermediate Arrow files
        with contextlib.suppress(OSError):  # another process finished first
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PackedCollator:
    """Stacks sequences, right-padding mixed lengths (short_mix, chat packs); derives labels.

    Labels are the input ids (pretraining), or for conversations the ids on assistant tokens
    with the first token of every conversation in a pack ignored (it must not be predicted
    from the previous conversation). No attention mask is needed: with causal attention,
    pads at the end are never seen by real tokens, and their labels are ignored. Position
    ids (chat packs) restart per conversation and continue the last one over the pads, so
    transformers' packed-sequence detection stays intact. With PoSE (pretrain rows) position
    ids skip ahead and an attention mask is added, which turns that detection off (pose.py).
    """

    def __init__(self, pad_token_id: int, pose: PoseSkips | None = None) -> None:
        self.pad_token_id = pad_token_id
        self.pose = pose

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(r[packing.TOKENS]) for r in rows)
        packed = packing.LENGTHS in rows[0]
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long) \
            if packed or self.pose else None
        attention = torch.zeros((len(rows), width), dtype=torch.long) if self.pose else None
        for i, row in enumerate(rows):
            tokens = torch.tensor(row[packing.TOKENS], dtype=torch.long)
            n = len(tokens)
            ids[i, :n] = tokens
            if not packed:
                labels[i, :n] = tokens
                if self.pose is not None:
                    positions[i, :n] = self.pose.positions(tokens)
                    attention[i, :n] = 1
                continue
            mask = torch.tensor(row[packing.MASK], dtype=torch.bool)
            labels[i, :n] = torch.where(mask, tokens, IGNORE_INDEX)
            lengths = row[packing.LENGTHS]
            starts = [0, *itertools.accumulate(lengths)][:-1]
            labels[i, starts] = IGNORE_INDEX
            positions[i, :n] = torch.cat([torch.arange(length) for length in lengths])
            last = lengths[-1] if lengths else 0
            positions[i, n:] = torch.arange(last, last + width - n)
        batch = {"input_ids": ids, "labels": labels}
        if positions is not None:
            batch["position_ids"] = positions
        if attention is not None:
            batch["attention_mask"] = attention
        return batch
