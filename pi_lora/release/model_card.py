"""The release's model card (README.md): what it is, how it was made, how to load and serve it.

Written for the hub: `base_model` is a hub id (never a local path), the licence is the base's,
and the serving notes say how vLLM and llama.cpp must be started for the extended window (and
when a rope method does not survive a stack). `pi-lora eval` on the release adds its
results (pi_lora.eval.card_results, between the EVAL_BEGIN / EVAL_END markers), `pi-lora
certify` its verdict (pi_lora.eval.certificate, between CERTIFY_BEGIN / CERTIFY_END).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from pi_lora.model.rope import RopePlan
from pi_lora.model.serving import serving_warnings
from pi_lora.recipe.loading import ModelSection, Recipe
from pi_lora.release.files import MERGE_REPORT_FILE, PROVENANCE_FILE, RELEASE_RECIPE_FILE
from pi_lora.run.directory import RunFacts

_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def hub_id(model: ModelSection) -> str | None:
    """The base's hub id: the name itself, or read back from a hub cache snapshot path."""
    name = model.name
    if not name.startswith((".", "/", "~")) and name.count("/") == 1 and not Path(name).exists():
        return name
    match = _SNAPSHOT.search(str(Path(name).expanduser().resolve()))
    return f"{match.group(1)}/{match.group(2)}" if match else None


def base_license(model: ModelSection) -> str | None:
    """The licence the base declares: its model card's front matter, or GGUF metadata."""
    path = Path(model.name).expanduser()
    card = (path if path.is_dir() else path.parent) / "README.md"
    if card.is_file() and path.suffix != ".gguf":
        text = card.read_text(errors="replace")
        if text.startswith("---"):
            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and front.get("license"):
                return str(front["license"])
    gguf = path if path.suffix == ".gguf" else (path / model.gguf_file if model.gguf_file else None)
    if gguf is not None and gguf.is_file():
        try:
            from gguf import GGUFReader

            field = GGUFReader(str(gguf)).get_field("general.license")
            if field is not None:
                return bytes(field.parts[field.data[0]]).decode()
        except Exception:  # a licence we cannot read is left out, never guessed
            return None
    return None


def serving_notes(plan: RopePlan, release: str = "<this directory>") -> str:
    """How the serving stacks must be started to get the extended window, and what breaks."""
    target = plan.target_context
    lines = [
        f"- transformers: `AutoModelForCausalLM.from_pretrained(\"{release}\")` reads the "
        "scaling from config.json.",
        f"- vLLM: `vllm serve {release} --max-model-len {target}` (vLLM multiplies the config's "
        "window by the factor for some rope types; give the trained length explicitly).",
        f"- llama.cpp: `pi-lora export {release} --gguf model.gguf` (llama.cpp's converter; the "
        f"rope scaling goes into the GGUF metadata and is checked) and run with `-c {target}`.",
    ]
    lines += [f"- **{warning}**." for warning in serving_warnings(plan.method)]
    return "\n".join(lines)


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
    """README.md of the release: what it is, how it was made, how to load and serve it."""
    rope_json = json.dumps(plan.rope_parameters)
    loss = facts.final_loss
    base = hub_id(recipe.model)
    licence = base_license(recipe.model)
    shown = base or Path(recipe.model.name).name
    front = {"tags": ["pi-lora", "long-context", "rope-scaling", plan.method]}
    if base:
        front["base_model"] = base
    if licence:
        front["license"] = licence
    return f"""---
{yaml.safe_dump(front, sort_keys=True).strip()}
---
# {shown}, extended to {plan.target_context:,} tokens ({plan.method} rope scaling)

`{Path(recipe.output_dir).name}`: context window extended from {plan.original_context} to
{plan.target_context} tokens with **{plan.method}** rope scaling (factor {plan.factor:g}) and a
LoRA fine-tune, made with pi-lora. LoRA (and the trained extras:
{', '.join(recipe.lora.trainable_extras) or 'none'}) are merged into the weights; the scaling
lives in `config.json`, so plain transformers loads it:

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this directory>")
```

| | |
|---|---|
| base model | `{base or recipe.model.name}` |
| licence | {licence or 'see the base model'} |
| rope | `{rope_json}` |
| max_position_embeddings | {plan.max_position_embeddings} |
| LoRA | r={recipe.lora.r}, alpha={recipe.lora.alpha:g}, modules={recipe.lora.target_modules or 'default'} |
| training | {facts.steps} steps at {recipe.seq_len} tokens, lr {recipe.training.learning_rate:g} |
| final loss | {loss if loss is None else f'{loss:.4f}'} |
| release dtype | {dtype} |

The full recipe is in `{RELEASE_RECIPE_FILE}`; the merge check in `{MERGE_REPORT_FILE}`.

## Serving at {plan.target_context:,} tokens

{serving_notes(plan)}

## Provenance

{_provenance_table(provenance)}
Machine-readable (with per-file hashes): `{PROVENANCE_FILE}`.
"""


# `pi-lora eval` on a release writes its results between these markers; a later eval replaces them
EVAL_BEGIN = "<!-- pi-lora eval: begin -->"
EVAL_END = "<!-- pi-lora eval: end -->"
# `pi-lora certify` writes its verdict between these; a later certify replaces them
CERTIFY_BEGIN = "<!-- pi-lora certify: begin -->"
CERTIFY_END = "<!-- pi-lora certify: end -->"


def with_eval_section(card: str, section: str) -> str:
    """The card with its evaluation section replaced (or added before Serving, else at the end)."""
    return with_marked_section(card, section, EVAL_BEGIN, EVAL_END)


def with_certificate_section(card: str, section: str) -> str:
    """The card with its Certificate section replaced (or added before Serving, else at the end)."""
    return with_marked_section(card, section, CERTIFY_BEGIN, CERTIFY_END)


def with_marked_section(card: str, section: str, begin: str, end: str) -> str:
    """The card with the text between `begin` and `end` replaced by `section` (added before
    Serving, else at the end, when the markers are not there yet).

    Only the text between the markers is ever touched, so whatever a user edited elsewhere in
    the card survives another eval or certify."""
    block = f"{begin}\n{section.strip()}\n{end}\n"
    start, stop = card.find(begin), card.find(end)
    if start != -1 and stop > start:
        return card[:start] + block + card[stop + len(end):].lstrip("\n")
    serving = card.find("\n## Serving")
    if serving != -1:
        return card[:serving + 1] + block + "\n" + card[serving + 1:]
    return card.rstrip("\n") + "\n\n" + block
