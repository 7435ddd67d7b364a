"""The recipes pi-lora ships (package data under pi_lora/recipes/, linked from the repository's
top-level recipes/), found by name: `pi-lora train llama2-13b-16k` and `extends: pi-paper`
work from an installed wheel, where no recipes/ directory sits beside the user's files."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from pi_lora.core.errors import PiLoraError

# package data: an installed wheel carries it (pyproject's package-data, tests/test_wheel.py)
SHIPPED_RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class ShippedRecipe:
    name: str  # its path below recipes/ without the suffix: "llama2-13b-16k", "base/pi-paper"
    path: Path
    description: str  # the file's first comment line

    @property
    def is_base(self) -> bool:
        """A base other recipes extend (it has no model or rope of its own to run)."""
        return self.name.startswith("base/")


def shipped_recipes() -> list[ShippedRecipe]:
    """Every shipped recipe: the runnable ones first, then bases and demo recipes."""
    paths = sorted(SHIPPED_RECIPES_DIR.rglob("*.yaml"),
                   key=lambda p: (len(p.relative_to(SHIPPED_RECIPES_DIR).parts), str(p)))
    return [ShippedRecipe(_name(p), p, _description(p)) for p in paths]


def _name(path: Path) -> str:
    return path.relative_to(SHIPPED_RECIPES_DIR).with_suffix("").as_posix()


def _description(path: Path) -> str:
    """The first comment line: every shipped recipe opens with one saying what it is."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def find_shipped(name: str) -> ShippedRecipe | None:
    """The shipped recipe `name` means: its path below recipes/ (`llama2-13b-16k`,
    `base/pi-paper.yaml`, `recipes/tiny.yaml`) or a file name only one recipe has
    (`pi-paper`). Only names in the listing match, so no path can reach outside it."""
    key = name.strip().replace("\\", "/")
    for prefix in ("./", "recipes/", "pi_lora/recipes/"):
        key = key.removeprefix(prefix)
    for suffix in SUFFIXES:
        key = key.removesuffix(suffix)
    recipes = shipped_recipes()
    exact = [r for r in recipes if r.name == key]
    if exact:
        return exact[0]
    by_stem = [r for r in recipes if r.name.rsplit("/", 1)[-1] == key]
    if len(by_stem) > 1:
        raise PiLoraError(f"{name!r} names several shipped recipes: "
                          f"{', '.join(r.name for r in by_stem)}", fix="give the full name")
    return by_stem[0] if by_stem else None


def shipped_or_error(name: str) -> ShippedRecipe:
    """A shipped recipe by name, or one message with the closest names and the listing."""
    found = find_shipped(name)
    if found is not None:
        return found
    names = [r.name for r in shipped_recipes()]
    close = difflib.get_close_matches(name.removesuffix(".yaml"), names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PiLoraError(f"no shipped recipe named {name!r}",
                      fix=f"{hint}`pi-lora recipes` lists them")


def resolve_recipe_file(argument: str) -> tuple[Path, ShippedRecipe | None]:
    """(the recipe file `argument` means, the shipped recipe when it is one): a file that
    exists here always wins; otherwise a shipped recipe's name; otherwise the path as given
    (the loader then says it is missing)."""
    path = Path(argument).expanduser()
    if path.exists():
        return path, None
    found = find_shipped(argument)
    return (found.path, found) if found is not None else (path, None)
