"""Is the base model still the one the run trained on? Merge and eval ask before they load it.

run.json records the base by hub revision or by the sha256 of its weight files (pi_lora.
provenance, at train time). A local directory whose weights were replaced, a hub id now
resolving to another revision, or a run.json / recipe.yaml edited to name another base would
merge the adapter into weights it was never trained against: quietly wrong numbers.
"""

from __future__ import annotations

import sys

from pi_lora.core.errors import PiLoraError
from pi_lora.run.finished import Run
from pi_lora.run.provenance import ModelIdentity, model_identity


def base_differences(recorded: ModelIdentity, current: ModelIdentity) -> list[str]:
    """What differs between the base as trained and as found now ([] if the same)."""
    found = []
    if recorded.name != current.name:
        found.append(f"run.json records base {recorded.name}, recipe.yaml names {current.name}")
    elif recorded.source != current.source:
        found.append(f"base was {recorded.source}, is now {current.source}")
    if recorded.revision and current.revision and recorded.revision != current.revision:
        found.append(f"hub revision {recorded.revision} at train time, now {current.revision}")
    if recorded.sha256 and recorded.sha256 != current.sha256:
        changed = sorted(name for name in {*recorded.files, *current.files}
                         if recorded.files.get(name) != current.files.get(name))
        found.append(f"weights sha256 {recorded.sha256[:12]} at train time, now "
                     f"{(current.sha256 or 'none')[:12]} (changed: {', '.join(changed[:5])})")
    return found


def check_base_identity(run: Run, *, allow_mismatch: bool) -> None:
    """Re-fingerprint the base model recipe.yaml names and compare it with run.json's record.

    Raises PiLoraError naming every difference (base path, hub revision, changed weight
    files); with `allow_mismatch` prints the same as a loud warning instead. Cheap on a second
    call: weight digests come from pi_lora.core.digest's cache (keyed by path, size, mtime, inode).
    A run without a recorded identity (older pi-lora, hashing failed) gets a warning.
    """
    from pi_lora.model.loading import load_config

    recipe, facts = run.recipe, run.facts
    recorded = facts.provenance.model
    if recorded is None:
        why = facts.provenance.error or "not recorded by the pi-lora that trained it"
        _warn(f"{run.path}: the base model's identity cannot be checked ({why})")
        return
    current = model_identity(recipe.model, load_config(recipe.model))
    problems = base_differences(recorded, current)
    if not problems:
        return
    message = f"the base model differs from the one {run.path} was trained on: " + "; ".join(
        problems)
    if allow_mismatch:
        _warn(message)
        return
    raise PiLoraError(message, field="model.name",
                      fix="restore the original base weights (or recipe.yaml / run.json), "
                          "or pass --allow-base-mismatch to merge anyway")


def _warn(message: str) -> None:
    print(f"pi-lora: WARNING: {message}", file=sys.stderr, flush=True)
