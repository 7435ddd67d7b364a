"""`run_eval`: every target through the same passkey and perplexity protocol, then the report.

Targets arrive as loaders, not models, because transformers' dynamic NTK keeps state
between calls (it keeps the longest frequencies it has seen): such a model is loaded afresh
for every length of every measurement, so no length sees another's rotary state. Other
models are loaded once per target.
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pi_lora.core.errors import PiLoraError
from pi_lora.eval import passkey, perplexity, report, texts
from pi_lora.eval.settings import EvalSettings
from pi_lora.recipe.dtypes import auto_dtype, torch_dtype

ModelPair = tuple[PreTrainedModel, PreTrainedTokenizerBase]


@dataclass
class EvalTarget:
    """One row of the report: a label, a fresh-model factory, and facts for the JSON."""

    label: str  # e.g. "base (plain RoPE)", "linear PI x4", "run: llama-16k"
    load: Callable[[], ModelPair]  # returns a model with a clean rotary state on each call
    describe: dict[str, Any] = field(default_factory=dict)  # model path, rope, kind, ...
    # (original, extended) context window in tokens: the default lengths and the plots' marks
    window: tuple[int, int] | None = None


PASSKEY_MIN_DEFAULT = 256  # the passkey's instruction + key + question need ~100-250 tokens


def default_lengths(targets: list[EvalTarget], *, passkey: bool = False) -> list[int]:
    """Lengths that test what each target claims: its original window, half its extended
    window and the extended window (a 512-token release is scored at 128/256/512, not at
    fixed 1k-8k); passkey leaves out windows too short for its prompt."""
    lengths = sorted({n for t in targets if t.window
                      for n in (t.window[0], t.window[1] // 2, t.window[1])})
    if passkey:
        return [n for n in lengths if n >= PASSKEY_MIN_DEFAULT] or lengths[-1:]
    return lengths


def resolve_device(settings: EvalSettings) -> torch.device:
    """settings.device, with "auto" = the GPU when there is one."""
    if settings.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(settings.device)
    except RuntimeError:
        raise PiLoraError(f"{settings.device[:40]!r} is not a device", field="--device",
                          fix="auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise PiLoraError(f"{settings.device} is not available here "
                          f"({torch.cuda.device_count()} CUDA device(s))", field="--device",
                          fix="--device cpu, or auto")
    return device


def resolve_dtype(settings: EvalSettings) -> torch.dtype:
    """The dtype target loaders use; "auto" = bf16 where the device computes it natively.

    On a CPU without native bf16 (AVX2), bf16 matmuls run ~8x slower than fp32, which turns
    a minutes-long perplexity sweep into hours, so "auto" evaluates in fp32 there.
    """
    if settings.dtype != "auto":
        return torch_dtype(settings.dtype)
    return auto_dtype(resolve_device(settings))


def has_stateful_rope(model: torch.nn.Module) -> bool:
    """True for dynamic NTK, whose rotary modules change their frequencies as they run."""
    return any("dynamic" in str(getattr(m, "rope_type", "")) for m in model.modules())


class ModelLoader:
    """Hands out the target's model, reloading only when the rotary state may be stale."""

    def __init__(self, target: EvalTarget, device: torch.device) -> None:
        self.target, self.device = target, device
        self.pair: ModelPair | None = None
        self.used = False
        self.load_seconds: list[float] = []

    def fresh(self) -> ModelPair:
        """The model for the next measurement unit (one length of passkey or perplexity)."""
        stale = self.pair is not None and self.used and has_stateful_rope(self.pair[0])
        if self.pair is None or stale:
            self.close()
            started = time.perf_counter()
            model, tokenizer = self.target.load()
            if next(model.parameters()).device != self.device:
                model = model.to(self.device)
            self.pair = (model.eval(), tokenizer)
            self.load_seconds.append(time.perf_counter() - started)
        self.used = True
        return self.pair

    def close(self) -> None:
        self.pair, self.used = None, False
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _progress(settings: EvalSettings, total: int, desc: str) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr,
        disable=not settings.progress, dynamic_ncols=True,
    )


def _run_passkey(loader: ModelLoader, settings: EvalSettings) -> report.PasskeyOutcome:
    cells = len(settings.passkey_depths) * settings.passkey_trials
    total = sum(settings.passkey_lengths) * cells
    outcome = report.PasskeyOutcome(passkey.PasskeyResult())
    with _progress(settings, total, f"{loader.target.label} | passkey") as bar:
        for length in settings.passkey_lengths:
            model, tokenizer = loader.fresh()
            generate = passkey.greedy_generate_fn(model, tokenizer, settings.max_new_tokens)
            started = time.perf_counter()
            try:
                trials = passkey.run_passkey_length(
                    generate, tokenizer, length, settings.passkey_depths,
                    settings.passkey_trials, settings.seed, on_trial=bar.update,
                )
            except (torch.OutOfMemoryError, MemoryError) as exc:
                outcome.failures[length] = f"out of memory: {exc}".splitlines()[0]
                bar.update(length * cells)
                continue
            outcome.result.trials.extend(trials)
            outcome.result.seconds_by_length[length] = time.perf_counter() - started
    return outcome


def window_spec(settings: EvalSettings, length: int) -> perplexity.WindowSpec:
    """The perplexity protocol of one length, from the settings."""
    return perplexity.WindowSpec(
        length, settings.ppl_stride, settings.ppl_mode, settings.ppl_max_windows,
        settings.ppl_max_tokens, settings.ppl_span_tokens,
    )


def _tokenize(tokenizer: PreTrainedTokenizerBase, documents: list[texts.Document]) -> list:
    """Each document as a 1-D id tensor, tokenizer defaults (BOS at document start if any)."""
    return [torch.tensor(tokenizer(d.text)["input_ids"], dtype=torch.long) for d in documents]


def _run_perplexity(
    loader: ModelLoader, settings: EvalSettings, documents: list[texts.Document]
) -> report.PerplexityOutcome:
    model, tokenizer = loader.fresh()
    ids = _tokenize(tokenizer, documents)
    probe = max(ids, key=len)[:64].unsqueeze(0).to(loader.device)
    perplexity.check_chunked_head(model, probe)
    outcome = report.PerplexityOutcome(document_tokens=[int(t.numel()) for t in ids])
    specs = {length: window_spec(settings, length) for length in settings.ppl_lengths}
    plans = {n: perplexity.plan_windows(outcome.document_tokens, spec) for n, spec in specs.items()}
    total = sum(w.end - w.begin for plan in plans.values() for w in plan)
    with _progress(settings, total, f"{loader.target.label} | ppl") as bar:
        for length in settings.ppl_lengths:
            if not plans[length]:
                outcome.failures[length] = f"no document has {length} tokens"
                continue
            model, _ = loader.fresh()
            started = time.perf_counter()
            try:
                result = perplexity.measure_perplexity(
                    model, ids, specs[length], settings.chunk_tokens, on_window=bar.update
                )
            except (torch.OutOfMemoryError, MemoryError) as exc:
                outcome.failures[length] = f"out of memory: {exc}".splitlines()[0]
                bar.update(sum(w.end - w.begin for w in plans[length]))
                continue
            result.seconds = time.perf_counter() - started
            outcome.results[length] = result
    return outcome


def evaluate_target(
    target: EvalTarget, settings: EvalSettings, documents: list[texts.Document]
) -> report.TargetOutcome:
    """Passkey then perplexity for one target; failures of one length do not stop the rest."""
    loader = ModelLoader(target, resolve_device(settings))
    outcome = report.TargetOutcome(target.label, dict(target.describe))
    try:
        if settings.passkey:
            outcome.passkey = _run_passkey(loader, settings)
            outcome.facts = outcome.facts or report.model_facts(*loader.pair)
        if settings.perplexity:
            outcome.perplexity = _run_perplexity(loader, settings, documents)
            outcome.facts = outcome.facts or report.model_facts(*loader.pair)
    finally:
        outcome.load_seconds = loader.load_seconds
        loader.close()
    return outcome


def gather_documents(settings: EvalSettings) -> list[texts.Document]:
    """Local files first, then the dataset split if one is configured; neither: the
    held-out plays pi-lora ships (the report names them as such)."""
    documents = texts.load_documents(settings.documents)
    if settings.dataset is not None:
        documents += texts.load_dataset_documents(
            settings.dataset, settings.dataset_text_field, settings.dataset_max_documents)
    return documents or texts.shipped_documents()


def run_eval(targets: list[EvalTarget], settings: EvalSettings, out_dir: Path) -> dict:
    """Evaluate every target; write report.json, report.md and the PNGs; return the JSON dict."""
    if not targets:
        raise ValueError("run_eval needs at least one target")
    out_dir = Path(out_dir)  # created by the first write: a bad input leaves no directory
    documents = gather_documents(settings) if settings.perplexity else []
    started = time.perf_counter()
    outcomes: list[report.TargetOutcome] = []
    for target in targets:
        outcomes.append(evaluate_target(target, settings, documents))
        # rewritten after every target: a crash in a long run keeps what was measured
        data = report.build_report(outcomes, settings, documents, time.perf_counter() - started)
        report.write_report(data, out_dir)
    return data
