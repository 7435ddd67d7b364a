"""Records of local data files, checked where they enter: which file, which line, what is wrong.

`datasets` reads the files (Arrow, worker processes); when it cannot, `diagnose` re-reads the
file that failed, cheaply and only then, to name the line: not UTF-8, not JSON, not an object.
The conversation readers accept the two common chat layouts (OpenAI `role`/`content` and
ShareGPT `from`/`value`) and name what they expected when a record is neither.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError

SHOWN_CHARS = 200  # longest piece of a record quoted in a message
READ_CHUNK = 1 << 20

# ShareGPT speakers -> chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
CHAT_ROLES = ("system", "user", "assistant", "tool")


# file suffix -> the `datasets` builder that reads it
BUILDERS = {".txt": "text", ".md": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet"}

def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


# --------------------------------------------------------------------------- unreadable files


def find_problem(paths: list[Path], builder: str) -> PiLoraError | None:
    """The first problem found in `paths` (a `datasets` builder could not read them)."""
    for path in paths:
        problem = _file_problem(path, builder)
        if problem is not None:
            return PiLoraError(f"{path}: {problem}", field="data.files", fix=_FIXES[builder])
    return None


def unreadable(paths: list[Path], builder: str, exc: Exception) -> PiLoraError:
    """What `datasets` said, naming the files, when re-reading them found nothing specific."""
    cause = _root_cause(exc)
    names = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
    said = str(cause).splitlines()[0][:SHOWN_CHARS] if str(cause) else ""
    return PiLoraError(f"cannot read {names}: {type(cause).__name__}: {said}",
                       field="data.files", fix=_FIXES[builder])


_FIXES = {
    "text": "data files must be UTF-8 text",
    "json": "one JSON object per line (jsonl), UTF-8, e.g. {\"text\": \"...\"}",
    "parquet": "write the file with pyarrow / pandas to_parquet",
}


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (exc.__cause__ or exc.__context__) is not None:
        nxt = exc.__cause__ or exc.__context__
        if id(nxt) in seen:
            break
        seen.add(id(nxt))
        exc = nxt  # type: ignore[assignment]
    return exc


def _file_problem(path: Path, builder: str) -> str | None:
    try:
        if builder == "parquet":
            return _parquet_problem(path)
        lines = _utf8_lines(path)
        if builder == "json":
            return _json_problem(path, lines)
        for _ in lines:  # text: decoding every line is the whole check
            pass
    except _NotUtf8 as err:
        return str(err)
    except OSError as exc:
        return f"cannot be read: {exc.strerror}"
    return None


class _NotUtf8(Exception):
    pass


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, read in chunks; a byte that is not UTF-8 raises."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    number, pending, offset = 1, "", 0
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                line = number + chunk[:exc.start].count(b"\n")
                raise _NotUtf8(f"line {line} is not UTF-8 text (byte {offset + exc.start} is "
                               f"{chunk[exc.start]:#04x}): is it a binary file?") from None
            offset += len(chunk)
            *complete, pending = (pending + text).split("\n")
            for line in complete:
                yield number, line
                number += 1
    if pending:
        yield number, pending


def _json_problem(path: Path, lines: Iterator[tuple[int, str]]) -> str | None:
    """jsonl: every non-blank line one JSON object; .json may also be one array of objects."""
    first = next(((n, t) for n, t in lines if t.strip()), None)
    if first is None:
        return "holds no records (the file is empty)"
    if path.suffix == ".json" and first[1].lstrip().startswith("["):
        return _array_problem(path)
    for number, text in _chain(first, lines):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {number} is not valid JSON ({exc.msg}): {_shown(text)}"
        if not isinstance(record, dict):
            return f"line {number} is a JSON {_json_type(record)}, not an object: {_shown(text)}"
    return None


def _array_problem(path: Path) -> str | None:
    """A .json file holding one array: it parses, and every item is an object."""
    try:
        document = json.loads(path.read_bytes())
    except json.JSONDecodeError as exc:
        return f"line {exc.lineno} is not valid JSON ({exc.msg})"
    bad = next((i for i, item in enumerate(document) if not isinstance(item, dict)), None)
    return None if bad is None else f"item {bad} is a JSON {_json_type(document[bad])}, not an object"


def _chain(first: tuple[int, str], rest: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    yield first
    yield from rest


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _parquet_problem(path: Path) -> str | None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except OSError as exc:
        if isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        return f"is not a Parquet file ({str(exc).splitlines()[0][:SHOWN_CHARS]})"
    except Exception as exc:  # pyarrow raises ArrowInvalid (a ValueError) and others
        return f"is not a Parquet file ({str(exc).splitlines()[0][:SHOWN_CHARS]})"
    return None


# --------------------------------------------------------------------------- first record

FIRST_LINES = 64  # lines of a jsonl file `pi-lora validate` checks before reading the first
MAX_WHOLE_JSON_BYTES = 64 << 20  # a .json array is parsed whole only up to this size


def first_record(path: Path) -> dict[str, Any] | None:
    """The file's first record as `datasets` would read it, without reading the whole file
    (`pi-lora validate`); None for a .json file too large to parse here. A first line that
    is not a JSON object is the same message train gives."""
    builder = BUILDERS[path.suffix]
    if builder == "text":
        return {"text": ""}  # one document per file, in column "text"
    if path.suffix == ".json" and path.stat().st_size > MAX_WHOLE_JSON_BYTES:
        return None  # may be one array: read whole by train, not here
    try:
        problem = _parquet_problem(path) if builder == "parquet" else _first_lines_problem(path)
        record = None if problem else _read_first(path, builder)
    except OSError as exc:
        problem = f"cannot be read: {exc.strerror}"
    if problem is not None:
        raise PiLoraError(f"{path}: {problem}", field="data.files", fix=_FIXES[builder])
    return record


def _read_first(path: Path, builder: str) -> dict[str, Any] | None:
    if builder == "parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(path).iter_batches(batch_size=1), None)
        return batch.to_pylist()[0] if batch is not None and batch.num_rows else None
    first = next((t for _, t in _utf8_lines(path) if t.strip()), "")
    if not first.lstrip().startswith("["):
        return json.loads(first)
    document = json.loads(path.read_bytes())
    return document[0] if document else None


def _first_lines_problem(path: Path) -> str | None:
    try:
        return _json_problem(path, itertools.islice(_utf8_lines(path), FIRST_LINES))
    except _NotUtf8 as err:
        return str(err)


# --------------------------------------------------------------------------- columns


def check_text_column(raw: Any, column: str, field: str, where: str) -> None:
    """Every value of a (non-streamed) text column is a string or empty."""
    import datasets

    feature = raw.features.get(column)
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return
    if isinstance(feature, datasets.Value):
        raise PiLoraError(f"column {column!r} of {where} holds {feature.dtype} values, not text",
                          field=field, fix=f"name a column of strings as {field}")
    for index, value in enumerate(raw[column]):
        check_text(value, column, field, f"record {index + 1} of {where}")


def check_text(value: Any, column: str, field: str, where: str = "a record") -> None:
    if value is not None and not isinstance(value, str):
        raise PiLoraError(f"{where} holds {type(value).__name__} {_shown(value)} in column "
                          f"{column!r}, not text", field=field,
                          fix=f"make every {column!r} value a string, or name another column")


# --------------------------------------------------------------------------- conversations


def chat_messages(messages: Any, field: str = "data.messages_field") -> list[dict[str, str]]:
    """A conversation as chat messages: `role`/`content` as they are; ShareGPT's `from`/
    `value` mapped (human -> user, gpt -> assistant, system -> system)."""
    if not isinstance(messages, list):
        raise PiLoraError(f"a conversation is {type(messages).__name__} {_shown(messages)}, not "
                          "a list of messages", field=field, fix=_CHAT_FIX)
    return [_chat_message(message, field) for message in messages]


_CHAT_FIX = ('each record holds a list of {"role": "user"|"assistant"|"system", "content": '
             '"..."} (or ShareGPT {"from": "human"|"gpt"|"system", "value": "..."})')


def _chat_message(message: Any, field: str) -> dict[str, str]:
    if not isinstance(message, dict):
        raise PiLoraError(f"a message is {type(message).__name__} {_shown(message)}, not an "
                          "object", field=field, fix=_CHAT_FIX)
    if message.get("role") is not None:
        role, content = message["role"], message.get("content")
        known = role in CHAT_ROLES
    elif message.get("from") is not None:
        role, content = SHAREGPT_ROLES.get(message["from"]), message.get("value")
        known = role is not None
    else:
        raise PiLoraError(f"a message has neither 'role' nor 'from': {_shown(message)}",
                          field=field, fix=_CHAT_FIX)
    if not known:
        raise PiLoraError(f"a message has an unknown speaker: {_shown(message)}", field=field,
                          fix=_CHAT_FIX)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise PiLoraError(f"a message's content is {type(content).__name__}, not text: "
                          f"{_shown(message)}", field=field, fix=_CHAT_FIX)
    return {"role": role, "content": content}


def alpaca_fields(*values: Any, field: str = "data.instruction_fields") -> None:
    """Instruction, input and output values are text (input may be empty)."""
    for value in values:
        if value is not None and not isinstance(value, str):
            raise PiLoraError(f"an instruction record holds {type(value).__name__} "
                              f"{_shown(value)}, not text", field=field,
                              fix="make instruction, input and output strings")


@contextlib.contextmanager
def reading_files(paths: list[Path], *, loading: bool = False) -> Iterator[None]:
    """Where `datasets` reads local files (at load, or for a stream at each read): a file it
    cannot parse becomes one message naming the file, and the line where one can be found.
    While `loading`, any failure is the files'; later (a stream) only one found in them is."""
    try:
        yield
    except PiLoraError:
        raise
    except Exception as exc:  # datasets / pyarrow raise many types for a bad file
        if not paths:
            raise
        builder = BUILDERS[paths[0].suffix]
        problem = find_problem(paths, builder)
        if problem is None and not loading:
            raise
        raise problem or unreadable(paths, builder, exc) from None
