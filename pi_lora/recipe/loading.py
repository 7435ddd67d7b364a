"""Recipes: reading YAML, `extends`, `--set` overrides, validation against pi_lora.recipe.schema, and
the checks between sections (pi_lora.recipe.checks); every problem reported at once. The
schema's names are re-exported here, where the rest of pi-lora imports them from."""

from __future__ import annotations

import contextlib
import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from pi_lora.core.errors import PiLoraError, RecipeErrors
from pi_lora.core.safe_yaml import cut, parse_yaml, short_repr
from pi_lora.recipe.checks import cross_checks, resolve_deepspeed_config
from pi_lora.recipe.foreign_keys import foreign_key_fix
from pi_lora.recipe.schema import (
    MAX_CONTEXT,
    SCALING_METHODS,
    SHIPPED_DEEPSPEED_DIR,
    DataSection,
    DatasetSource,
    DType,
    Extra,
    InstructionFields,
    LengthMix,
    Llama3Options,
    LongropeOptions,
    LoraSection,
    ModelSection,
    QuantizationSection,
    Recipe,
    RopeMethod,
    RopeSection,
    TrainingSection,
    YarnOptions,
)
from pi_lora.recipe.shipped import find_shipped

__all__ = [
    "MAX_CONTEXT",
    "SCALING_METHODS",
    "SHIPPED_DEEPSPEED_DIR",
    "DType",
    "DataSection",
    "DatasetSource",
    "Extra",
    "InstructionFields",
    "LengthMix",
    "Llama3Options",
    "LongropeOptions",
    "LoraSection",
    "ModelSection",
    "QuantizationSection",
    "Recipe",
    "RopeMethod",
    "RopeSection",
    "TrainingSection",
    "YarnOptions",
    "deep_merge",
    "load_recipe",
    "resolve_deepspeed_config",
]


# --------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: tuple[str, ...] | list[str] = ()) -> Recipe:
    """Read, inherit, override and validate a recipe; report every problem at once."""
    source = str(path)
    raw = _read_with_extends(Path(path), chain=())
    errors: list[PiLoraError] = []
    for item in overrides:
        try:
            _apply_override(raw, item)
        except PiLoraError as err:
            errors.append(err)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        errors += _translate(exc)
        errors += cross_checks(_valid_sections(raw))
        raise RecipeErrors(source, errors) from None
    errors += cross_checks({name: getattr(recipe, name) for name in _SECTIONS})
    if errors:
        raise RecipeErrors(source, errors)
    return recipe


MAX_RECIPE_BYTES = 16 << 20


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise PiLoraError(f"recipe {path} is a directory", fix="give the recipe's YAML file")
    if not path.is_file():
        raise PiLoraError(f"recipe file {path} not found", fix="check the path; `pi-lora "
                          "recipes` lists the shipped recipes, which train by name")
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise PiLoraError(f"{path} is {path.stat().st_size} bytes, not a recipe",
                          fix=f"a recipe is a few kB of YAML (at most {MAX_RECIPE_BYTES} bytes)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PiLoraError(f"{path} is not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})",
                          fix="save the recipe as UTF-8 YAML") from None
    except OSError as exc:
        raise PiLoraError(f"cannot read {path}: {exc.strerror}", fix="check the path and its "
                          "permissions") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PiLoraError(f"{path} must hold a mapping of sections", fix="see recipes/tiny.yaml")
    return data


def _read_with_extends(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise PiLoraError(f"extends cycle: {cycle}", field="extends", fix="break the cycle")
    data = _read_yaml(path)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise PiLoraError("must be a file path", field="extends", fix="extends: base.yaml")
    return deep_merge(_read_with_extends(_parent_file(path, parent), (*chain, path)), data)


def _parent_file(path: Path, parent: str) -> Path:
    """`extends:` relative to the extending file; failing that, a shipped recipe by name
    (`extends: pi-paper`), so a team's own recipes can build on pi-lora's bases."""
    parent_path = (path.parent / parent).resolve()
    if parent_path.is_file():
        return parent_path
    try:
        shipped = find_shipped(parent)
    except PiLoraError as err:
        raise PiLoraError(err.message, field="extends", fix=err.fix) from None
    if shipped is not None:
        return shipped.path
    raise PiLoraError(
        f"{parent_path} not found (relative to {path.parent}), and no shipped recipe is "
        f"named {parent!r}",
        field="extends",
        fix="give the parent recipe's path relative to this recipe file, or a shipped "
            "base's name (`pi-lora recipes` lists them)",
    )


def deep_merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """Child values win; mappings merge key by key; lists are replaced whole."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`training.learning_rate=1e-4`: the value is parsed as YAML so types come out right."""
    if "=" not in item:
        raise PiLoraError(f"--set {short_repr(item)} is not KEY=VALUE",
                          fix="--set training.max_steps=10")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise PiLoraError(f"--set {short_repr(item)}: empty key", field=key or "--set",
                          fix="--set training.max_steps=10")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:  # absent, or an empty section (`training:`)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise PiLoraError(f"--set {key}: {part} is not a section", field=key)
        node = child
    try:
        node[parts[-1]] = parse_yaml(text, f"--set {key}")
    except PiLoraError as err:
        if "not valid YAML" not in err.message:
            raise  # a bomb or a duplicate key is refused, not read as a string
        node[parts[-1]] = text


# --------------------------------------------------------------------------- errors


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names of the section at `loc`, for did-you-mean suggestions."""
    cls: Any = Recipe
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if cls is None:
            return []
    return list(cls.model_fields)


MAX_REPORTED_ERRORS = 20  # a 10k-item list of wrong types is one problem, not 10k lines


def _translate(exc: ValidationError) -> list[PiLoraError]:
    errors = []
    items = exc.errors()
    for item in items[:MAX_REPORTED_ERRORS]:
        loc = tuple(item["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            errors.append(_unknown_key(loc, field))
        elif item["type"] == "missing":
            errors.append(PiLoraError("is required", field=field, fix=f"add `{loc[-1]}:`"))
        elif item["type"] == "list_type":
            errors.append(PiLoraError(
                f"{item['msg']} (got {short_repr(item.get('input'))})", field=field,
                fix=f"write a list: `{loc[-1]}: [a, b]` in YAML, or "
                    f"--set \"{field}=[a, b]\" on the command line"))
        else:
            errors.append(PiLoraError(f"{item['msg']} (got {short_repr(item.get('input'))})",
                                      field=field))
    if len(items) > MAX_REPORTED_ERRORS:
        errors.append(PiLoraError(f"... and {len(items) - MAX_REPORTED_ERRORS} more schema "
                                  "problem(s) like these", fix="fix the ones above first"))
    return errors


def _unknown_key(loc: tuple[Any, ...], field: str) -> PiLoraError:
    """Another tool's name for a field, or one in the wrong section, says where pi-lora
    keeps it; a misspelling gets the closest key of its section."""
    key = str(loc[-1])
    here = str(loc[0]) if len(loc) > 1 else ""
    foreign = foreign_key_fix(key, _SECTIONS, here)
    if foreign is not None:
        what, fix = foreign
        return PiLoraError(f"unknown key {short_repr(loc[-1])} ({what})", field=cut(field),
                           fix=fix)
    known = _fields_at(loc[:-1])
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    fix = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
    return PiLoraError(f"unknown key {short_repr(loc[-1])}", field=cut(field), fix=fix)


_SECTIONS: dict[str, type[BaseModel]] = {
    "model": ModelSection, "rope": RopeSection, "lora": LoraSection, "data": DataSection,
    "training": TrainingSection,
}


def _valid_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """The sections that validate on their own: cross-section checks still run on them when
    another section has schema errors, so the user sees every problem in one pass."""
    valid: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        value = raw.get(name, {} if name not in ("model", "rope") else None)
        if isinstance(value, dict):
            with contextlib.suppress(ValidationError):  # reported by the whole-recipe pass
                valid[name] = cls.model_validate(value)
    return valid
