"""`pi-lora recipes` (list, show, cp the shipped recipes), recipe arguments that name a
shipped recipe, and `pi-lora validate` over several recipe files (a recipe repository's CI)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from pi_lora.cli.commands import cmd_validate
from pi_lora.core.errors import PiLoraError
from pi_lora.core.safe_paths import staged_file
from pi_lora.core.safe_yaml import parse_yaml
from pi_lora.recipe.shipped import (
    ShippedRecipe,
    find_shipped,
    resolve_recipe_file,
    shipped_or_error,
    shipped_recipes,
)

# the listing's groups: the first folder below recipes/ -> its heading
GROUPS = {"": "recipes (pi-lora train NAME)",
          "base": "bases (a recipe's `extends: NAME` builds on one)",
          "demo": "the offline CPU demo's (make demo)"}


def recipe_argument(argument: str) -> str:
    """An argparse type: a recipe file that exists here as given, else the shipped recipe the
    argument names (said once on stderr), else the path as given for the loader to refuse."""
    try:
        path, shipped = resolve_recipe_file(argument)
    except PiLoraError as err:  # a name several shipped recipes share
        raise argparse.ArgumentTypeError(err.render()) from None
    if shipped is not None:
        print(f"pi-lora: using the shipped recipe {shipped.name} ({path})", file=sys.stderr,
              flush=True)
    return str(path)


def cmd_recipes(args: argparse.Namespace) -> int:
    """`pi-lora recipes [list | show NAME | cp NAME DEST]`."""
    if args.action == "show":
        return _show(args.name)
    if args.action == "cp":
        return _copy(args.name, args.destination, args.overwrite)
    return _list()


def _list() -> int:
    recipes = shipped_recipes()
    width = max(len(r.name) for r in recipes)
    groups: dict[str, list[ShippedRecipe]] = {}
    for recipe in recipes:
        groups.setdefault(recipe.name.rpartition("/")[0], []).append(recipe)
    lines = []
    for group, members in groups.items():
        lines.append(GROUPS.get(group, f"{group}/") + ":")
        lines += [f"  {r.name:<{width}}  {r.description}" for r in members]
    lines.append("see one: pi-lora recipes show NAME; copy one to edit: pi-lora recipes cp NAME .")
    print("\n".join(lines))
    return 0


def _show(name: str) -> int:
    recipe = shipped_or_error(name)
    print(f"pi-lora: {recipe.path}", file=sys.stderr, flush=True)  # stdout stays the file
    sys.stdout.write(recipe.path.read_text(encoding="utf-8"))
    return 0


def _copy(name: str, destination: str, overwrite: bool) -> int:
    """Like torchtune's `tune cp`: a directory gets the recipe's file name, a name without a
    suffix gets .yaml; an existing file is replaced only with --overwrite."""
    recipe = shipped_or_error(name)
    out = Path(destination).expanduser()
    if out.is_dir():
        out = out / recipe.path.name
    elif not out.suffix:
        out = out.with_suffix(".yaml")
    if out.is_dir():
        raise PiLoraError(f"{out} is a directory", fix="name a file, or a directory without it")
    if out.exists() and not overwrite:
        raise PiLoraError(f"{out} already exists", fix="pass --overwrite to replace it, or "
                          "name another file")
    if not out.parent.is_dir():
        raise PiLoraError(f"{out.parent} is not a directory", fix="create it first, or copy "
                          "into an existing directory")
    with staged_file(out) as staged:
        shutil.copyfile(recipe.path, staged)
        os.replace(staged, out)
    print(f"pi-lora: copied {recipe.name} to {out}")
    parent = (parse_yaml(recipe.path.read_text(encoding="utf-8"), str(recipe.path)) or {}).get(
        "extends")
    base = find_shipped(parent) if isinstance(parent, str) else None
    if base is not None and not (out.parent / parent).is_file():
        print(f"  it extends {parent}: no such file beside it, so pi-lora's shipped "
              f"{base.name} is used")
    print(f"  next: pi-lora validate {out}")
    return 0


def cmd_validate_each(recipe_paths: list[str], overrides: list[str]) -> int:
    """One recipe: the resolved recipe and what follows from it. Several: one verdict each,
    exit 2 when any fails (the CI of a repository of recipes)."""
    if len(recipe_paths) == 1:
        return cmd_validate(recipe_paths[0], overrides)
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.train.preflight import validate_recipe

    failed = []
    for path in recipe_paths:
        try:
            derived = validate_recipe(load_recipe(path, overrides))
        except PiLoraError as err:
            failed.append(path)
            print(f"FAILED {path}\n" + _indented(err.render()), flush=True)
            continue
        _, marker, unchecked = derived.partition("could not check")  # the last line(s)
        print(f"ok     {path}" + (f"\n{_indented(marker + unchecked)}" if marker else ""),
              flush=True)
    if failed:
        raise PiLoraError(f"{len(failed)} of {len(recipe_paths)} recipes failed: "
                          f"{', '.join(failed)}", fix="see each one's problems above")
    print(f"pi-lora: all {len(recipe_paths)} recipes are valid")
    return 0


def _indented(text: str) -> str:
    return "\n".join(f"    {line}" for line in text.splitlines())
