"""The release directory's own files: their names, the model card, the provenance record.

One module owns the release format, so merge (which writes it) and eval (which recognises a
release by it) agree on the names.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError
from pi_lora.recipe.loading import Recipe, load_recipe
from pi_lora.run.directory import RunFacts, RunProvenance
from pi_lora.run.provenance import software

RELEASE_RECIPE_FILE = "pi_lora_recipe.yaml"
MERGE_REPORT_FILE = "merge_report.json"
PROVENANCE_FILE = "pi_lora_provenance.json"
PROVENANCE_FORMAT = 1


def is_release(path: str | Path) -> bool:
    """The release marker: the recipe copy `pi-lora merge` writes into every release."""
    return (Path(path) / RELEASE_RECIPE_FILE).is_file()


@dataclass(frozen=True)
class Release:
    """A release directory read once: the recipe it was trained from and what the run recorded
    (the base's identity among it)."""

    path: Path
    recipe: Recipe
    trained: RunProvenance


def open_release(path: str | Path, field: str = "RELEASE") -> Release:
    """The release at `path`; a user error naming the file when it is not one."""
    path = Path(path).expanduser()
    if not is_release(path):
        why = "does not exist" if not path.exists() else f"has no {RELEASE_RECIPE_FILE}"
        raise PiLoraError(f"{path} {why}: not a release", field=field,
                          fix="give the directory `pi-lora merge RUN --output DIR` wrote")
    recipe = load_recipe(path / RELEASE_RECIPE_FILE)
    try:
        recorded = json.loads((path / PROVENANCE_FILE).read_text()).get("train") or {}
        trained = RunProvenance.model_validate(recorded)
    except (OSError, ValueError, AttributeError):
        trained = RunProvenance(error=f"{PROVENANCE_FILE} missing or unreadable")
    return Release(path.resolve(), recipe, trained)


def release_provenance(facts: RunFacts, dtype: str) -> dict[str, Any]:
    """The run's provenance (training software, base model, data) plus the merge's own."""
    merge = {**asdict(software()), "release_dtype": dtype}
    return {"format": PROVENANCE_FORMAT, "train": facts.provenance.model_dump(mode="json"),
            "merge": merge,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def make_tokenizer_portable(out: Path, target_context: int, base_class: str | None) -> None:
    """tokenizer_config.json that every stack reads: a class transformers 4.x knows (5.x's
    `TokenizersBackend` is unknown there, and llama.cpp's converter pins 4.x), the extended
    window as `model_max_length`, and no flags of the machine that wrote it."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = base_class or "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        config.pop(key, None)
    config["model_max_length"] = target_context
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
