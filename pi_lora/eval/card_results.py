"""`pi-lora eval` on a release: its numbers go into the release's model card.

A card that says "extended to 16k" without saying how the model does at 16k is an ad, not a
card. So when a target of the eval is a release (the directory `pi-lora merge` wrote), its
perplexity by length and passkey accuracy and k_max, with the protocol that produced them,
replace the card's evaluation section (pi_lora.release.model_card.with_eval_section; the rest of the card
is left as it is). The numbers are the report's, nothing recomputed.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from pi_lora.core.safe_paths import staged_file
from pi_lora.eval.plots import format_length, format_ppl
from pi_lora.release.files import is_release
from pi_lora.release.model_card import with_eval_section

CARD_FILE = "README.md"


def release_results(report: dict[str, Any]) -> dict[Path, dict[str, Any]]:
    """Release directory -> its target in the report (the last one when given twice)."""
    found: dict[Path, dict[str, Any]] = {}
    for target in report["targets"]:
        describe = target.get("describe") or {}
        if describe.get("kind") == "release" and is_release(describe.get("model", "")):
            found[Path(describe["model"]).resolve()] = target
    return found


def _rows(target: dict[str, Any]) -> tuple[list[int], list[tuple[str, list[str]]]]:
    """The columns (every length measured) and one row per measurement."""
    ppl, passkey = target.get("perplexity"), target.get("passkey")
    rows: list[tuple[str, dict[int, str]]] = []
    if ppl is not None:
        cells = {int(n): format_ppl(e["ppl"]) for n, e in ppl["by_length"].items()}
        cells |= {int(n): "failed" for n in ppl["failures"]}
        rows.append(("perplexity", cells))
    if passkey is not None:
        cells = {int(n): f"{a:.0%}" for n, a in passkey["accuracy_by_length"].items()}
        cells |= {int(n): "failed" for n in passkey["failures"]}
        rows.append(("passkey accuracy", cells))
    columns = sorted({n for _, cells in rows for n in cells})
    return columns, [(name, [cells.get(n, "") for n in columns]) for name, cells in rows]


def eval_section(report: dict[str, Any], target: dict[str, Any], command: list[str]) -> str:
    """The card's '## Evaluation' section for one release target."""
    columns, rows = _rows(target)
    facts, versions, proto = target.get("facts") or {}, report["versions"], report["protocol"]
    lines = [
        "## Evaluation", "",
        f"Measured with `pi-lora eval` on {report['created']} ({facts.get('dtype')} on "
        f"{facts.get('device')}; torch {versions['torch']}, transformers "
        f"{versions['transformers']}).", "",
        "| tokens | " + " | ".join(format_length(n) for n in columns) + " |",
        "|---|" + "---|" * len(columns),
        *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows), "",
    ]
    if "perplexity" in proto and target.get("perplexity") is not None:
        ppl = proto["perplexity"]
        docs = ", ".join(d["name"] for d in ppl["documents"]) or "none"
        lines.append(f"- Perplexity (lower is better): {ppl['scoring']}; on {docs}; at most "
                     f"{ppl['max_windows']} windows per length.")
    if "passkey" in proto and target.get("passkey") is not None:
        key = proto["passkey"]
        k_max = target["passkey"]["k_max"]
        lines.append(
            f"- Passkey retrieval: a 5-digit key hidden in filler at {len(key['depths'])} depths "
            f"x {key['trials_per_cell']} trials per length (seed {key['seed']}), greedy, exact "
            f"match. **k_max {format_length(k_max) if k_max else 0}**: the longest length up to "
            f"which every length reaches at least {key['k_max_threshold']:.0%}.")
    lines.append(f"- Command: `{shlex.join(command)}`")  # quoted: labels hold spaces
    return "\n".join(lines) + "\n"


def update_release_cards(report: dict[str, Any], command: list[str]) -> list[str]:
    """Write each evaluated release's results into its card; one line per release saying
    where, or why not (a read-only release keeps its card; the report has the numbers)."""
    notes = []
    for release, target in release_results(report).items():
        card_path = release / CARD_FILE
        try:
            card = card_path.read_text() if card_path.is_file() else ""
            updated = with_eval_section(card, eval_section(report, target, command))
            with staged_file(card_path) as staged:  # never half of the new card
                staged.write_text(updated)
                os.replace(staged, card_path)
        except OSError as exc:
            notes.append(f"{card_path} not updated ({exc.strerror or exc}): the numbers are in "
                         "the report only")
            continue
        notes.append(f"{card_path}: evaluation section written")
    return notes
