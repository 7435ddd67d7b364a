"""The eval report: report.json holds every number and the exact protocol (so a result can
be reproduced or challenged), report.md and the PNGs are rendered from that JSON alone.
"""

from __future__ import annotations

import json
import platform
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from pi_lora.eval import passkey, plots
from pi_lora.eval.perplexity import PerplexityResult
from pi_lora.eval.plots import format_length, format_ppl
from pi_lora.eval.settings import EvalSettings
from pi_lora.eval.texts import Document

REPORT_FORMAT = "pi-lora-eval/1"
PPL_FIGURE = "ppl_vs_length.png"


@dataclass
class PasskeyOutcome:
    result: passkey.PasskeyResult
    failures: dict[int, str] = field(default_factory=dict)  # length -> why it has no number


@dataclass
class PerplexityOutcome:
    document_tokens: list[int]
    results: dict[int, PerplexityResult] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)


@dataclass
class TargetOutcome:
    """Everything measured for one target, before it becomes JSON."""

    label: str
    describe: dict[str, Any]
    facts: dict[str, Any] = field(default_factory=dict)
    load_seconds: list[float] = field(default_factory=list)
    passkey: PasskeyOutcome | None = None
    perplexity: PerplexityOutcome | None = None


def model_facts(model: Any, tokenizer: Any) -> dict[str, Any]:
    """What was actually evaluated, read from the loaded objects rather than trusted."""
    config = model.config
    return {
        "model_class": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "rope_parameters": getattr(config, "rope_parameters", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "tokenizer": getattr(tokenizer, "name_or_path", type(tokenizer).__name__),
        "bos_token": tokenizer.bos_token,
    }


# ---------------------------------------------------------------------------- JSON


def _protocol(settings: EvalSettings, documents: list[Document]) -> dict[str, Any]:
    proto: dict[str, Any] = {"settings": settings.model_dump(mode="json")}
    if settings.passkey:
        proto["passkey"] = {
            "lengths": settings.passkey_lengths, "depths": settings.passkey_depths,
            "trials_per_cell": settings.passkey_trials, "seed": settings.seed,
            "k_max_threshold": settings.k_max_threshold,
            "max_new_tokens": settings.max_new_tokens, "decoding": "greedy",
            "instruction": passkey.INSTRUCTION, "filler": passkey.FILLER,
            "key_line": passkey.key_line("NNNNN"), "question": passkey.QUESTION,
            "separator": passkey.SEPARATOR,
            "length_unit": "prompt tokens incl. the tokenizer's special tokens",
            "depth_unit": "fraction of filler tokens before the key line",
            "scoring": "exact match: first run of digits in the generated text == key",
        }
    if settings.perplexity:
        proto["perplexity"] = {
            "mode": settings.ppl_mode,
            "stride": settings.ppl_stride if settings.ppl_mode == "sliding" else None,
            "lengths": settings.ppl_lengths, "max_windows": settings.ppl_max_windows,
            "max_tokens": settings.ppl_max_tokens, "span_tokens": settings.ppl_span_tokens,
            "chunk_tokens": settings.chunk_tokens,
            "scoring": _scoring_text(settings), "tokenization": "tokenizer defaults per document",
            "documents": [
                {"name": d.name, "source": d.source, "chars": len(d.text)} for d in documents
            ],
        }
    return proto


def _scoring_text(settings: EvalSettings) -> str:
    if settings.ppl_mode == "sliding":
        return (
            f"sliding window (Press et al.): windows of L tokens advance by {settings.ppl_stride};"
            " each scores only tokens no earlier window scored; the first scores all its tokens"
        )
    return "whole-window: disjoint windows of L tokens, every prediction in a window scored"


def _passkey_json(outcome: PasskeyOutcome, threshold: float) -> dict[str, Any]:
    result = outcome.result
    counts: dict[tuple[int, float], int] = {}
    for t in result.trials:
        counts[(t.length, t.depth)] = counts.get((t.length, t.depth), 0) + 1
    return {
        "accuracy_by_length": {str(k): v for k, v in result.accuracy_by_length().items()},
        "cells": [
            {"length": k[0], "depth": k[1], "accuracy": v, "trials": counts[k]}
            for k, v in result.accuracy_by_cell().items()
        ],
        "k_max": result.k_max(threshold),
        "seconds_by_length": {str(k): v for k, v in result.seconds_by_length.items()},
        "failures": {str(k): v for k, v in outcome.failures.items()},
        "trials": [asdict(t) for t in result.trials],
    }


def _perplexity_json(outcome: PerplexityOutcome) -> dict[str, Any]:
    return {
        "by_length": {
            str(length): {
                "ppl": r.ppl, "nll_sum": r.nll_sum, "tokens": r.tokens, "windows": r.windows,
                "mean_nll": r.nll_sum / r.tokens, "documents_used": r.documents_used,
                "seconds": r.seconds,
            }
            for length, r in outcome.results.items()
        },
        "document_tokens": outcome.document_tokens,
        "failures": {str(k): v for k, v in outcome.failures.items()},
    }


def _target_json(outcome: TargetOutcome, settings: EvalSettings) -> dict[str, Any]:
    return {
        "label": outcome.label,
        "describe": outcome.describe,
        "facts": outcome.facts,
        "load_seconds": outcome.load_seconds,
        "passkey": outcome.passkey and _passkey_json(outcome.passkey, settings.k_max_threshold),
        "perplexity": outcome.perplexity and _perplexity_json(outcome.perplexity),
    }


def build_report(
    outcomes: list[TargetOutcome],
    settings: EvalSettings,
    documents: list[Document],
    seconds: float,
) -> dict[str, Any]:
    """The report as a JSON-ready dict: protocol, versions, per-target numbers and timings."""
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
        },
        "protocol": _protocol(settings, documents),
        "targets": [_target_json(o, settings) for o in outcomes],
        "seconds": seconds,
    }


# ---------------------------------------------------------------------------- files


def slug(label: str) -> str:
    """A file-name-safe form of a target label."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "target"


def heatmap_name(index: int, label: str) -> str:
    return f"passkey_{index:02d}_{slug(label)}.png"


def _draw_figures(report: dict[str, Any], out_dir: Path) -> list[str]:
    drawn = []
    proto = report["protocol"]
    for index, target in enumerate(report["targets"]):
        if target["passkey"] is None:
            continue
        cells = {(c["length"], c["depth"]): c["accuracy"] for c in target["passkey"]["cells"]}
        name = heatmap_name(index, target["label"])
        plots.plot_passkey_heatmap(
            cells, proto["passkey"]["lengths"], proto["passkey"]["depths"],
            f"passkey: {target['label']}", out_dir / name,
        )
        drawn.append(name)
    curves = _ppl_curves(report)
    if curves:
        title = f"perplexity vs context length ({proto['perplexity']['mode']})"
        windows = sorted({w[k] for t in report["targets"] if (w := t["describe"].get("window"))
                          for k in ("original", "extended")})
        plots.plot_ppl_curves(curves, title, out_dir / PPL_FIGURE, windows)
        drawn.append(PPL_FIGURE)
    return drawn


def _ppl_curves(report: dict[str, Any]) -> dict[str, dict[int, float]]:
    return {
        t["label"]: {int(k): v["ppl"] for k, v in t["perplexity"]["by_length"].items()}
        for t in report["targets"]
        if t["perplexity"] is not None
    }


def write_report(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """report.json, report.md and the PNGs it references; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _draw_figures(report, out_dir)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out_dir / "report.md").write_text(render_markdown(report))
    return [out_dir / "report.json", out_dir / "report.md", *(out_dir / f for f in figures)]


# ---------------------------------------------------------------------------- markdown


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _passkey_cell(passkey_json: dict[str, Any], length: int) -> str:
    if str(length) in passkey_json["failures"]:
        return "failed"
    value = passkey_json["accuracy_by_length"].get(str(length))
    return "" if value is None else f"{value:.0%}"


def _ppl_cell(ppl_json: dict[str, Any], length: int) -> str:
    if str(length) in ppl_json["failures"]:
        return "n/a"
    entry = ppl_json["by_length"].get(str(length))
    if entry is None:
        return ""
    return format_ppl(entry["ppl"])


def _passkey_section(report: dict[str, Any]) -> list[str]:
    proto = report["protocol"]["passkey"]
    lengths = proto["lengths"]
    lines = [
        "## Passkey retrieval", "",
        (
            f"Accuracy per prompt length over {len(proto['depths'])} depths x "
            f"{proto['trials_per_cell']} trials (seed {proto['seed']}, greedy, exact match). "
            "k_max = largest length such that every length up to it reaches "
            f">= {proto['k_max_threshold']:.0%}."
        ),
        "",
    ]
    rows = [
        [t["label"], *(_passkey_cell(t["passkey"], n) for n in lengths), format_length(
            t["passkey"]["k_max"]) if t["passkey"]["k_max"] else "0"]
        for t in report["targets"] if t["passkey"] is not None
    ]
    lines += [*_table(["target", *map(format_length, lengths), "k_max"], rows), ""]
    for index, target in enumerate(report["targets"]):
        if target["passkey"] is not None:
            lines += [f"![passkey {target['label']}]({heatmap_name(index, target['label'])})", ""]
    return lines


def _span(proto: dict[str, Any]) -> str:
    span = proto["span_tokens"]
    return "whole documents" if span is None else f"first max({span}, L) tokens of each document"


def _limit(value: int | None) -> str:
    return "no limit" if value is None else f"{value:,}"


def _rope_words(params: dict[str, Any] | None) -> str:
    """{"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5} -> "linear x2, theta 100000"."""
    if not params:
        return "plain RoPE"
    if all(isinstance(v, dict) for v in params.values()):  # per layer type (Gemma 3)
        return "; ".join(f"{layer}: {_rope_words(v)}" for layer, v in params.items())
    kind = params.get("rope_type") or params.get("type") or "default"
    words = "plain RoPE" if kind == "default" else kind
    if params.get("factor") not in (None, 1, 1.0):
        words += f" x{params['factor']:g}"
    if params.get("rope_theta") is not None:
        theta = float(params["rope_theta"])
        words += f", theta {int(theta)}" if theta.is_integer() else f", theta {theta:g}"
    return words


def _target_words(describe: dict[str, Any]) -> str:
    """The target's description as a sentence: what was loaded, its rope, its windows."""
    words = f"{describe.get('kind', 'model')} `{describe.get('model')}`"
    rope = describe.get("rope")
    if isinstance(rope, dict):
        words += f", zero-shot {rope.get('method')} x{rope.get('factor', 1):g}"
    elif rope:
        words += f", rope {rope}"
    window = describe.get("window")
    if isinstance(window, dict):
        words += f", window {window.get('original')} -> {window.get('extended')}"
    return words


def _perplexity_section(report: dict[str, Any]) -> list[str]:
    proto = report["protocol"]["perplexity"]
    lengths = proto["lengths"]
    docs = ", ".join(f"{d['name']} ({d['chars']:,} chars)" for d in proto["documents"])
    lines = [
        f"## Perplexity ({proto['mode']})", "", f"{proto['scoring']}.", "",
        (
            f"Documents: {docs}. Per length: max windows {proto['max_windows']}, "
            f"max scored tokens {_limit(proto['max_tokens'])}, text span {_span(proto)}."
        ),
        "",
    ]
    rows = [
        [t["label"], *(_ppl_cell(t["perplexity"], n) for n in lengths)]
        for t in report["targets"] if t["perplexity"] is not None
    ]
    lines += _table(["target", *map(format_length, lengths)], rows)
    return [*lines, "", f"![perplexity vs length]({PPL_FIGURE})", ""]


def _targets_section(report: dict[str, Any]) -> list[str]:
    lines = ["## Targets", ""]
    for target in report["targets"]:
        facts = target["facts"]
        loads = ", ".join(f"{s:.1f}" for s in target["load_seconds"])
        lines.append(
            f"- **{target['label']}**: {_target_words(target['describe'])}; "
            f"dtype {facts.get('dtype')}, device {facts.get('device')}, "
            f"rope as loaded: {_rope_words(facts.get('rope_parameters'))}, "
            f"max_position_embeddings {facts.get('max_position_embeddings')}, "
            f"tokenizer {facts.get('tokenizer')}; loads (s): {loads}"
        )
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: one table per measurement (rows = targets, columns = lengths), figures."""
    versions = report["versions"]
    lines = [
        "# pi-lora eval report", "",
        (
            f"{report['created']}; torch {versions['torch']}, transformers "
            f"{versions['transformers']}; total {report['seconds']:.0f} s. "
            "Every number and the full protocol are in report.json."
        ),
        "",
    ]
    if "passkey" in report["protocol"]:
        lines += _passkey_section(report)
    if "perplexity" in report["protocol"]:
        lines += _perplexity_section(report)
    return "\n".join(lines + _targets_section(report))
