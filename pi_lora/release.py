"""The release directory's own files: their names, the model card, the provenance record.

One module owns the release format, so merge (which writes it) and eval (which recognises a
release by it) agree on the names.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pi_lora.provenance import software
from pi_lora.recipe import Recipe
from pi_lora.rope import RopePlan
from pi_lora.rundir import RunFacts

RELEASE_RECIPE_FILE = "pi_lora_recipe.yaml"
MERGE_REPORT_FILE = "merge_report.json"
PROVENANCE_FILE = "pi_lora_provenance.json"
PROVENANCE_FORMAT = 1


def is_release(path: str | Path) -> bool:
    """The release marker: the recipe copy `pi-lora merge` writes into every release."""
    return (Path(path) / RELEASE_RECIPE_FILE).is_file()


def release_provenance(facts: RunFacts, dtype: str) -> dict[str, Any]:
    """The run's provenance (training software, base model, data) plus the merge's own."""
    merge = {**asdict(software()), "release_dtype": dtype}
    return {"format": PROVENANCE_FORMAT, "train": facts.provenance.model_dump(mode="json"),
            "merge": merge,
            "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _provenance_table(provenance: dict[str, Any]) -> str:
    train = provenance.get("train") or {}
    made = train.get("software") or {}
    model = train.get("model") or {}
    data = train.get("data") or {}
    packages = made.get("packages") or {}
    libraries = ", ".join(f"{name} {version}" for name, version in packages.items() if version)
    commit = made.get("git_commit")
    code = f"pi-lora {made.get('pi_lora', '?')}" + (
        f" @ {commit[:12]}{' (modified)' if made.get('git_dirty') else ''}" if commit else "")
    base = (f"revision `{model['revision']}`" if model.get("revision")
            else f"sha256 `{model['sha256']}`" if model.get("sha256") else "not recorded")
    rows = [
        ("trained with", code),
        ("libraries", libraries or "not recorded"),
        ("command", f"`{' '.join(made.get('command') or [])}`"),
        ("base model", f"`{model.get('name', '?')}` ({model.get('source', '?')}), {base}"),
        ("training data", f"sha256 `{data['sha256']}` over {len(data.get('files', {}))} file(s)"
         if data.get("sha256") else f"dataset {data.get('dataset')}" if data.get("dataset")
         else "not recorded"),
    ]
    if train.get("error"):
        rows.append(("hashing", f"failed: {train['error']}"))
    return "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)


def model_card(recipe: Recipe, plan: RopePlan, facts: RunFacts, dtype: str,
               provenance: dict[str, Any]) -> str:
    """README.md of the release: what it is, how it was made, how to load it."""
    rope_json = json.dumps(plan.rope_parameters)
    loss = facts.final_loss
    return f"""---
base_model: {recipe.model.name}
tags: [pi-lora, long-context, rope-scaling, {plan.method}]
---
# {Path(recipe.output_dir).name}

Context window extended from {plan.original_context} to {plan.target_context} tokens
with **{plan.method}** rope scaling (factor {plan.factor:g}) and a LoRA fine-tune, made with
pi-lora. LoRA (and the trained extras: {', '.join(recipe.lora.trainable_extras) or 'none'})
are merged into the weights; the scaling lives in `config.json`, so plain transformers loads it:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this directory>")
```

| | |
|---|---|
| base model | `{recipe.model.name}` |
| rope | `{rope_json}` |
| max_position_embeddings | {plan.max_position_embeddings} |
| LoRA | r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, modules={recipe.lora.target_modules or 'default'} |
| training | {facts.steps} steps at {recipe.seq_len} tokens, lr {recipe.training.learning_rate:g} |
| final loss | {loss if loss is None else f'{loss:.4f}'} |
| release dtype | {dtype} |

The full recipe is in `{RELEASE_RECIPE_FILE}`; the merge check in `{MERGE_REPORT_FILE}`.

## Provenance

{_provenance_table(provenance)}
Machine-readable (with per-file hashes): `{PROVENANCE_FILE}`.
"""
