"""The on-disk format of a training run: the only hand-off between train and merge.

A run directory describes itself: the resolved recipe, the rope plan and the facts of the
run, so `pi-lora merge RUN_DIR` needs nothing else (besides the base model it names).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pi_lora.core.errors import PiLoraError
from pi_lora.core.run_lock import held_by_another, holder
from pi_lora.core.safe_paths import check_replaceable
from pi_lora.model.rope import RopePlan
from pi_lora.recipe.loading import Recipe, load_recipe
from pi_lora.run.provenance import DataIdentity, ModelIdentity, Software

RECIPE_FILE = "recipe.yaml"
FACTS_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
EXTRAS_FILE = "extras.safetensors"
ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
RUN_MARKER = ".pi-lora-run"  # written first, so even a run that failed to start is known as ours


FACTS_FORMAT = 1  # bump when a field changes meaning; read_facts names the mismatch


class RunProvenance(BaseModel):
    """What made the run (see pi_lora.run.provenance); model and data arrive when hashed."""

    model_config = ConfigDict(extra="forbid")
    software: Software | None = None
    model: ModelIdentity | None = None
    data: DataIdentity | None = None
    error: str | None = None  # hashing failed (a file vanished): recorded, not fatal


class RunFacts(BaseModel):
    """run.json: the facts `train` records and `merge` / `eval` read; written whole, atomically.

    Start facts are written once the trainer is built (status "training"); the completion
    fields when the final adapter is saved (status "complete").
    """

    model_config = ConfigDict(extra="ignore")  # keys of older formats are dropped, not errors
    format: int = FACTS_FORMAT
    status: Literal["training", "complete", "failed"]
    rope: dict[str, Any]
    extras: list[str]
    trainable_parameters: int
    total_parameters: int
    train_sequences: int | None  # None when the data streams
    train_tokens: int | None
    seq_len: int
    world_size: int
    data_cache: str | None
    epochs_for_max_steps: float | None
    cpu_allocator: str | None = None  # None on GPU
    loss: str | None = None  # "chunked: ..." or "plain: <why>" (pi_lora.train.trainer.loss_route)
    provenance: RunProvenance = RunProvenance()
    final_loss: float | None = None
    train_loss: float | None = None
    steps: int | None = None
    train_seconds: float | None = None
    failure: str | None = None  # why a "failed" run stopped (diverged, disk full, crashed)
    failed_step: int | None = None
    updated: float = 0.0

    @property
    def rope_plan(self) -> RopePlan:
        return RopePlan.from_dict(self.rope)


# On --resume these training fields may change and take effect (how long, how often it saves
# or logs, memory savers that do not change the numbers); every other setting is the run's.
RESUME_MAY_CHANGE = frozenset({
    "max_steps", "save_steps", "save_total_limit", "logging_steps", "eval_steps", "report_to",
    "save_on_each_node", "gradient_checkpointing", "offload_checkpoints", "tiled_mlp",
    "recompute_attention"})
_RESUME_FIXED_SECTIONS = ("model", "rope", "lora", "data")


def _fixed_on_resume(field: str) -> bool:
    section, _, name = field.partition(".")
    return section in _RESUME_FIXED_SECTIONS or (
        section == "training" and name.split(".")[0] not in RESUME_MAY_CHANGE)


def _changed_fields(before: Any, after: Any, path: str = "") -> list[str]:
    """Dotted paths whose values differ, each with both values ("training.lr: 1e-3 -> 2e-3")."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            found += _changed_fields(before.get(key), after.get(key),
                                     f"{path}.{key}" if path else str(key))
        return found
    return [] if before == after else [f"{path}: {before!r} in the run, {after!r} now"]


class RunDir:
    """Paths and small readers/writers for one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @staticmethod
    def is_run(path: str | Path) -> bool:
        """The run marker: a run.json next to the recipe, as `pi-lora train` writes them."""
        return (Path(path) / FACTS_FILE).is_file() and (Path(path) / RECIPE_FILE).is_file()

    recipe_path = property(lambda self: self.path / RECIPE_FILE)
    facts_path = property(lambda self: self.path / FACTS_FILE)
    metrics_path = property(lambda self: self.path / METRICS_FILE)
    extras_path = property(lambda self: self.path / EXTRAS_FILE)
    adapter_dir = property(lambda self: self.path / ADAPTER_DIR)
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS_DIR)

    # ------------------------------------------------------------------ train side

    @staticmethod
    def is_owned(path: str | Path) -> bool:
        """pi-lora wrote this directory: a run, or the marker of a start that failed early."""
        path = Path(path)
        return RunDir.is_run(path) or (path / RUN_MARKER).is_file() or _legacy_false_start(path)

    def is_false_start(self) -> bool:
        """Ours, with nothing to resume: no run.json or a failed one, and no complete
        checkpoint (a start that failed on bad input, a full disk, an early divergence).
        A rerun replaces it without --overwrite: nothing of value is lost."""
        if _legacy_false_start(self.path):
            return True
        if not (self.path / RUN_MARKER).is_file() or self.latest_checkpoint() is not None:
            return False
        return not self.facts_path.exists() or self.recorded_failure() or self._died_training()

    def _died_training(self) -> bool:
        """run.json still says "training" but no process holds the run: it died before its
        first checkpoint (a full disk that also stopped the failure from being recorded)."""
        try:
            return self.read_facts().status == "training" and not held_by_another(self.path)
        except PiLoraError:
            return False

    def prepare(self, recipe: Recipe, *, resume: bool, overwrite: bool, is_main: bool,
                protect: Sequence[str | Path] = ()) -> None:
        """Refuse to clobber a run by accident; a resume must match the recorded recipe.

        `is_main=False` only checks (a launcher, before its children load anything); the main
        process then creates the directory atomically: see `check_start` and `create`.
        `protect`: more paths --overwrite must never delete (the recipe file the user ran).
        """
        replace = self.check_start(recipe, resume=resume, overwrite=overwrite, protect=protect)
        if is_main and not resume:
            self.create(recipe, replace=replace, protect=protect)

    def check_start(self, recipe: Recipe, *, resume: bool, overwrite: bool,
                    protect: Sequence[str | Path] = ()) -> bool:
        """Everything `prepare` would refuse, refused before anything loads or is written.

        Returns whether an existing directory is to be replaced (`create(replace=True)`).
        A false start (see `is_false_start`) is replaced without --overwrite.
        """
        recipe = recipe.with_absolute_paths()
        exists = self.path.is_dir() and any(self.path.iterdir())
        if self.path.exists() and not self.path.is_dir():
            raise PiLoraError(f"{self.path} is a file, not a run directory", field="output_dir",
                              fix="choose a new output_dir")
        if exists and resume:
            self._check_same_recipe(recipe)
            return False
        if resume:
            raise PiLoraError(f"nothing to resume in {self.path}", field="output_dir",
                              fix="drop --resume to start the run")
        false_start = exists and self.is_false_start()
        if exists and not (overwrite or false_start):
            raise PiLoraError(f"run directory {self.path} already exists{self._state()}",
                              field="output_dir",
                              fix="pass --resume to continue it, --overwrite to replace it, "
                                  "or --set output_dir=NEW")
        replace = check_replaceable(self.path, owned=RunDir.is_owned, what="run directory",
                                    protect=[*_recipe_inputs(recipe), *protect])
        if false_start and not overwrite:
            print(f"pi-lora: replacing {self.path}, a start that failed before its first "
                  f"checkpoint{self._state()}", flush=True)
        return replace

    def recorded_failure(self) -> bool:
        """run.json already says "failed" (the first, most specific reason is kept)."""
        try:
            return self.read_facts().status == "failed"
        except PiLoraError:
            return False

    def _state(self) -> str:
        try:
            facts = self.read_facts()
        except PiLoraError:
            return ""
        if facts.status == "failed":
            return f" (it failed at step {facts.failed_step}: {facts.failure})"
        return f" (status {facts.status})"

    def create(self, recipe: Recipe, *, replace: bool,
               protect: Sequence[str | Path] = ()) -> None:
        """The run directory appears whole: marker and recipe are written in a sibling temp
        directory renamed into place, so a crash or a full disk leaves no half a run."""
        recipe = recipe.with_absolute_paths()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            (tmp / RUN_MARKER).write_text("pi-lora run directory\n")
            (tmp / RECIPE_FILE).write_text(recipe.to_yaml())
            # checked again: the directory may have changed since check_start
            if replace and check_replaceable(self.path, owned=RunDir.is_owned,
                                             what="run directory",
                                             protect=[*_recipe_inputs(recipe), *protect]):
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)  # onto a missing or an empty directory
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _check_same_recipe(self, recipe: Recipe) -> None:
        if not self.recipe_path.is_file():
            raise PiLoraError(f"{self.path} is not a pi-lora run (no {RECIPE_FILE})",
                              field="output_dir", fix="point --resume at a run directory")
        before = load_recipe(self.recipe_path)
        changed = [change for change in _changed_fields(before.model_dump(mode="json"),
                                                        recipe.model_dump(mode="json"))
                   if _fixed_on_resume(change.split(":")[0])]
        if changed:
            shown = "; ".join(changed[:5])
            raise PiLoraError(
                f"resuming with settings that differ from the run: {shown}", field=changed[0]
                .split(":")[0], fix="resume with the run's values (its recipe.yaml), or start a "
                "new run; on resume only training." + ", training.".join(
                    sorted(RESUME_MAY_CHANGE)) + " may change")

    def checkpoints(self) -> list[Path]:
        """Complete Trainer checkpoints (a trainer_state.json written), oldest step first."""
        def step(p: Path) -> int:
            match = re.search(r"checkpoint-(\d+)$", p.name)
            return int(match.group(1)) if match else -1

        done = [p for p in self.checkpoints_dir.glob("checkpoint-*")
                if (p / "trainer_state.json").is_file()]
        return sorted(done, key=step)

    def latest_checkpoint(self) -> Path | None:
        done = self.checkpoints()
        return done[-1] if done else None

    def append_metrics(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def write_facts(self, facts: RunFacts) -> None:
        facts = facts.model_copy(update={"updated": time.time(), "format": FACTS_FORMAT})
        tmp = self.facts_path.with_suffix(".tmp")
        try:
            tmp.write_text(facts.model_dump_json(indent=2))
            tmp.replace(self.facts_path)
        finally:  # a full disk leaves no 0-byte run.tmp behind
            tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ merge side

    def read_facts(self) -> RunFacts:
        """The typed facts; a missing, unreadable or newer-format run.json is a user error."""
        if not self.facts_path.is_file():
            raise PiLoraError(f"{self.facts_path} not found", field="RUN_DIR",
                              fix="point at a directory written by `pi-lora train`")
        try:
            raw = json.loads(self.facts_path.read_text())
            if int(raw.get("format", FACTS_FORMAT)) > FACTS_FORMAT:
                raise PiLoraError(
                    f"{self.facts_path} has format {raw['format']}, newer than this pi-lora "
                    f"reads ({FACTS_FORMAT})", field="RUN_DIR", fix="upgrade pi-lora")
            return RunFacts.model_validate(raw)
        except (json.JSONDecodeError, ValidationError, AttributeError, ValueError) as exc:
            first = str(exc).splitlines()[0][:200]
            raise PiLoraError(f"{self.facts_path} is not a pi-lora run record: {first}",
                              field="RUN_DIR", fix="point at a directory written by `pi-lora train`"
                              ) from None

    def load_recipe(self) -> Recipe:
        if not self.recipe_path.is_file():
            raise PiLoraError(f"{self.recipe_path} not found", field="RUN_DIR",
                              fix="point at a directory written by `pi-lora train`")
        return load_recipe(self.recipe_path)

    def latest_checkpoint_hint(self) -> str:
        ckpt = self.latest_checkpoint()
        return f"; latest checkpoint: {ckpt.name}" if ckpt else ""

    def check_finished(self, facts: RunFacts) -> None:
        """Merge and eval refuse a run that did not finish well: status not complete (still
        training, killed, failed) or a missing adapter file. The weights' contents are checked
        where they are read (pi_lora.run.finished)."""
        resume = self.latest_checkpoint_hint()
        if facts.status == "failed":
            raise PiLoraError(f"the run failed at step {facts.failed_step}: {facts.failure}",
                              field="RUN_DIR",
                              fix=f"fix the cause and `pi-lora train RECIPE --resume`{resume}")
        if facts.status != "complete":
            busy = holder(self.path)
            state = f"still training: {busy}" if busy else "stopped before it finished"
            raise PiLoraError(f"the run has not finished (run.json status {facts.status!r}, "
                              f"{state}{resume})", field="RUN_DIR",
                              fix="let `pi-lora train` finish" if busy
                              else "resume it with `pi-lora train RECIPE --resume`")
        weights = self.adapter_dir / "adapter_model.safetensors"
        if not weights.is_file() and (self.adapter_dir / "adapter_model.bin").is_file():
            raise PiLoraError(f"{weights} is missing: only a pickled adapter_model.bin is there, "
                              "and pi-lora never unpickles files it is handed", field="RUN_DIR",
                              fix="save the adapter as safetensors (peft's default) or resume "
                                  "the run so it saves it again")
        needed = [self.adapter_dir / "adapter_config.json", weights]
        needed += [self.extras_path] if facts.extras else []
        for path in needed:
            if not path.is_file():
                raise PiLoraError(f"{path} is missing{resume}", field="RUN_DIR",
                                  fix="resume the run with `pi-lora train RECIPE --resume`")


def _legacy_false_start(path: Path) -> bool:
    """What pi-lora before the run marker left when a start failed: the directory holds only
    recipe.yaml, and that is a complete resolved recipe as pi-lora writes it (every field of
    every section), which a recipe written by hand never is."""
    if not path.is_dir() or [p.name for p in path.iterdir()] != [RECIPE_FILE]:
        return False
    try:
        raw = yaml.safe_load((path / RECIPE_FILE).read_text())
        return raw == Recipe.model_validate(raw).model_dump(mode="json")
    except (OSError, yaml.YAMLError, ValidationError, TypeError):
        return False


def _recipe_inputs(recipe: Recipe) -> list[Path]:
    """What a run reads and must never delete: local base model and tokenizer, data files,
    data cache, a local dataset, the DeepSpeed config."""
    data = recipe.data
    named = [recipe.model.name, recipe.model.tokenizer, *data.files, data.cache_dir,
             data.dataset.name if data.dataset else None, recipe.training.deepspeed]
    return [Path(p) for p in named if p and Path(p).exists()]


def save_extras(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Trainable extras under their base-model names; contiguous CPU copies for safetensors."""
    from safetensors.torch import save_file

    empty = [name for name, t in tensors.items() if t.numel() == 0]
    assert not empty, f"refusing to save empty (sharded?) extras: {empty}"
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_extras(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path)) if path.is_file() else {}


def apply_extras(model: Any, extras: dict[str, torch.Tensor]) -> int:
    """Copy trained extras into a base or peft-wrapped model; returns how many were applied.

    Names are matched on base-model keys, so the same tensors serve resume (peft model),
    merge (bare base) and eval. A name or shape mismatch means the wrong base model.
    """
    from pi_lora.model.loading import base_parameter_name

    params = {base_parameter_name(n): p for n, p in model.named_parameters()}
    for name, tensor in extras.items():
        own = params.get(name)
        if own is None or own.shape != tensor.shape:
            found = "missing" if own is None else f"shape {tuple(own.shape)}"
            raise PiLoraError(
                f"extra {name} {tuple(tensor.shape)} does not fit the base model ({found})",
                field="RUN_DIR", fix="use the base model the run was trained on")
        with torch.no_grad():
            own.copy_(tensor.to(own.dtype))
    return len(extras)
