"""Which `data.format` a record's shape means: chat (`messages` of role/content), ShareGPT
(`conversations` of from/value), alpaca (`instruction`/`output`) or plain text. When the
recipe's format asks for a column the records lack, the message names the setting that
reads them ("these records are chat conversations: set data.format: chat"), where a bare
"set data.text_field to one of ['messages']" led to a second error. Train (build.py) and
`pi-lora validate` (the first record of the first file, nothing tokenized) share it."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError
from pi_lora.data import files as records
from pi_lora.recipe.loading import DataSection


@dataclass(frozen=True)
class Layout:
    format: str  # the data.format that reads these records
    column: str  # the column holding them (conversations, instructions or text)
    what: str  # the records' shape, in words


def recognise(record: Mapping[str, Any], text_field: str = "text") -> Layout | None:
    """The layout one record has; None when it is none pi-lora reads."""
    for column, value in record.items():
        first = value[0] if isinstance(value, list) and value else None
        if isinstance(first, Mapping) and "role" in first:
            return Layout("chat", column, f"chat conversations ({column!r}: a list of "
                                          "role/content messages)")
        if isinstance(first, Mapping) and "from" in first:
            return Layout("chat", column, f"ShareGPT conversations ({column!r}: a list of "
                                          "from/value messages)")
    if "instruction" in record and "output" in record:
        return Layout("instruction", "instruction",
                      "instruction/response pairs (alpaca: 'instruction', 'input', 'output')")
    for column in (text_field, "text"):
        if isinstance(record.get(column), str):
            return Layout("pretrain", column, f"plain text ({column!r})")
    return None


def missing_column(data: DataSection, column: str, field: str, columns: list[str],
                   first: Mapping[str, Any] | None) -> PiLoraError:
    """`column` (the recipe's `field`) is not in the data: name the setting the records'
    shape needs when it is one pi-lora reads, else the columns there are."""
    found = f"column {column!r} not in the data (columns: {columns})"
    layout = recognise(first, data.text_field) if first else None
    settings = _settings_for(data, layout) if layout else []
    if not settings:
        return PiLoraError(found, field=field, fix=f"set {field} to one of {columns}")
    assert layout is not None
    return PiLoraError(f"{found}: these records are {layout.what}",
                       field="data.format" if layout.format != data.format else field,
                       fix="set " + " and ".join(settings))


def _settings_for(data: DataSection, layout: Layout) -> list[str]:
    """The recipe settings that read `layout` (those the recipe already has left out)."""
    settings = [f"data.format: {layout.format}"] if layout.format != data.format else []
    if layout.format == "chat" and layout.column != data.messages_field:
        settings.append(f"data.messages_field: {layout.column}")
    if layout.format == "pretrain" and layout.column != data.text_field:
        settings.append(f"data.text_field: {layout.column}")
    if layout.format == "instruction":
        fields = data.instruction_fields
        settings += [f"data.instruction_fields.{name}: {name}" for name in ("instruction", "output")
                     if getattr(fields, name) != name]
    return settings


def required_columns(data: DataSection) -> list[tuple[str, str]]:
    """(column, the recipe field naming it) that data.format reads."""
    if data.format == "pretrain":
        return [(data.text_field, "data.text_field")]
    if data.format == "chat":
        return [(data.messages_field, "data.messages_field")]
    fields = data.instruction_fields
    return [(fields.instruction, "data.instruction_fields.instruction"),
            (fields.output, "data.instruction_fields.output")]


def check_first_record(data: DataSection, path: Path) -> list[str] | None:
    """`pi-lora validate`'s look at the data: the first record of `path` read (cheaply, not
    tokenized) and refused as train would refuse it; its columns, None when not read here."""
    record = records.first_record(path)
    if record is None:
        return None
    columns = list(record)
    for column, field in required_columns(data):
        if column not in columns:
            raise missing_column(data, column, field, columns, record)
    return columns


def first_record(raw: Any) -> Mapping[str, Any] | None:
    """The first record of a Dataset or a stream, read only to word an error."""
    with contextlib.suppress(Exception):  # a record that cannot be read adds nothing to it
        if hasattr(raw, "__len__"):
            return raw[0] if len(raw) else None
        return next(iter(raw.take(1)), None)
    return None
