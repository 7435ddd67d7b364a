"""`pi-lora certify` measured: inputs checked, prompts built once, base then release run.

Everything the user gave is checked before any model loads (exit 2): the release, a base
that is the one the release records, lengths within the window and long enough for the
suite, perplexity text long enough for the original window, the base's tokenizer the
release's. The prompts are built once with the release's tokenizer and given to both models,
so release / base compares the same samples. Models load through eval's loader (a dynamic-NTK
model is loaded afresh for every length).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from pi_lora.core.errors import PiLoraError
from pi_lora.eval import haystack as hay
from pi_lora.eval import perplexity, ruler_tasks, texts
from pi_lora.eval.certify import (
    CertifySettings,
    Plan,
    Verdict,
    decide,
    plan_lengths,
    retention,
    suite_threshold,
)
from pi_lora.eval.decoding import answer_questions, end_token_ids
from pi_lora.eval.report import model_facts
from pi_lora.eval.runner import EvalTarget, ModelLoader, resolve_device, resolve_dtype
from pi_lora.eval.settings import EvalSettings
from pi_lora.model.loading import load_config, load_model, load_tokenizer
from pi_lora.model.rope import RopePlan, plan_rope
from pi_lora.recipe.dtypes import dtype_name
from pi_lora.recipe.loading import ModelSection
from pi_lora.release.files import Release, open_release
from pi_lora.run.base_integrity import base_differences
from pi_lora.run.provenance import ModelIdentity, model_identity


@dataclass
class Inputs:
    """What certify runs on, every part checked."""

    release: Release
    release_model: ModelSection
    base_model: ModelSection
    base_identity: ModelIdentity
    config: Any  # the base's: its shapes size the progress bar's work
    rope: RopePlan
    plan: Plan
    tokenizer: Any  # the release's
    documents: list[texts.Document]  # perplexity text
    document_ids: list[torch.Tensor]
    device: torch.device


def _as_base_error(err: PiLoraError) -> PiLoraError:
    err.field = "--base"
    return err


def _base_section(release: Release, base: str, dtype: torch.dtype) -> ModelSection:
    """The base as published (no quantization, no sliding-window change), loaded the way the
    recipe named it (GGUF file, revision, tokenizer)."""
    return release.recipe.model.model_copy(update={
        "name": base, "dtype": dtype_name(dtype), "quantization": None, "sliding_window": None})


def check_base(release: Release, section: ModelSection, config: Any) -> ModelIdentity:
    """The base given is the one the release was trained from: the same weights by content
    (a copy elsewhere is fine), else the same hub id and revision."""
    current = model_identity(section, config)
    recorded = release.trained.model
    if recorded is None:  # an older release: only the recipe's name to compare
        recorded = ModelIdentity(release.recipe.model.name, current.source)
    if recorded.sha256 and current.sha256:
        problems = [] if recorded.sha256 == current.sha256 else [
            f"weights sha256 {recorded.sha256[:12]} recorded, {current.sha256[:12]} given"]
    else:
        problems = base_differences(recorded, current)
    if problems:
        raise PiLoraError(f"{section.name} is not the base {release.path.name} was trained from "
                          f"({'; '.join(problems)})", field="--base",
                          fix=f"pass the base the release records: {recorded.name}")
    return current


def _check_lengths(settings: CertifySettings, plan: Plan) -> None:
    past = [n for n in plan.release_lengths if n > plan.target]
    if past:
        raise PiLoraError(f"lengths {past} are past the release's {plan.target}-token window",
                          field="--lengths", fix=f"use lengths up to {plan.target}")
    required = settings.required_length or plan.target
    if required > max(plan.release_lengths):
        raise PiLoraError(f"the required length {required} is longer than every tested length",
                          field="--required-length" if settings.required_length else "--lengths",
                          fix=f"test up to {required} (or lower --required-length)")


def _check_tokenizers(release_tok: Any, base_tok: Any) -> None:
    if release_tok.get_vocab() != base_tok.get_vocab() or \
            release_tok.bos_token != base_tok.bos_token:
        raise PiLoraError("the base's tokenizer differs from the release's: the two cannot be "
                          "given the same prompts", field="--base",
                          fix="pass the base the release was trained from")


def _ppl_documents(settings: CertifySettings, tokenizer: Any, original: int
                   ) -> tuple[list[texts.Document], list[torch.Tensor]]:
    documents = texts.load_documents(settings.documents) if settings.documents \
        else texts.shipped_documents()
    ids = [torch.tensor(tokenizer(d.text)["input_ids"], dtype=torch.long) for d in documents]
    spec = perplexity.WindowSpec(original, mode="whole-window", max_windows=settings.ppl_windows)
    if not perplexity.plan_windows([len(t) for t in ids], spec):
        raise PiLoraError(f"no perplexity document has {original} tokens (the original window)",
                          field="--docs", fix=f"give a text of at least {original} tokens")
    return documents, ids


def prepare(release_dir: str, base: str, settings: CertifySettings) -> Inputs:
    """Every input checked, before any weights load."""
    release = open_release(release_dir)
    eval_settings = EvalSettings(dtype=settings.dtype, device=settings.device, passkey=False,
                                 perplexity=False)
    device, dtype = resolve_device(eval_settings), resolve_dtype(eval_settings)
    base_model = _base_section(release, base, dtype)
    try:
        config = load_config(base_model)
        base_tok = load_tokenizer(base_model)
    except PiLoraError as err:
        raise _as_base_error(err) from None
    identity = check_base(release, base_model, config)
    rope = plan_rope(release.recipe.rope, config)
    plan = plan_lengths(settings, rope.original_context, rope.target_context)
    _check_lengths(settings, plan)
    release_model = ModelSection(name=str(release.path), dtype=dtype_name(dtype),
                                 trust_remote_code=release.recipe.model.trust_remote_code)
    tokenizer = load_tokenizer(release_model)
    _check_tokenizers(tokenizer, base_tok)
    documents, ids = _ppl_documents(settings, tokenizer, rope.original_context)
    return Inputs(release, release_model, base_model, identity, config, rope, plan, tokenizer,
                  documents, ids, device)


# ---------------------------------------------------------------------------- prompts


def make_haystack(settings: CertifySettings) -> hay.Haystack:
    if not settings.haystack:
        return hay.noise_haystack()
    if settings.haystack == ["shipped"]:
        return hay.text_haystack(texts.shipped_documents())
    try:
        return hay.text_haystack(texts.load_documents(settings.haystack))  # type: ignore[arg-type]
    except PiLoraError as err:
        err.field = "--haystack"
        raise


def build_prompts(settings: CertifySettings, lengths: list[int], tokenizer: Any,
                  haystack: hay.Haystack) -> dict[int, list[hay.Prompt]]:
    """Every context of every (length, trial): one holding all tasks (shared), or one per task."""
    words = ruler_tasks.word_list([d.text for d in texts.shipped_documents()]) \
        if "cwe" in settings.tasks else []
    shared = settings.layout == "shared"
    prompts: dict[int, list[hay.Prompt]] = {}
    for length in lengths:
        block_tokens = int(length * hay.BLOCK_SHARE) if shared else length
        for trial in range(settings.trials):
            draws = ruler_tasks.Draws()
            samples = [ruler_tasks.generate(task, settings.seed, length, trial, draws, words,
                                            block_tokens) for task in settings.tasks]
            for group in [samples] if shared else [[s] for s in samples]:
                names = "+".join(s.task for s in group)
                rng = random.Random(f"{settings.seed}:layout:{names}:{length}:{trial}")
                prompts.setdefault(length, []).append(
                    hay.build_prompt(group, haystack, tokenizer, length, trial, rng))
    return prompts


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Answer:
    task: str
    length: int
    trial: int
    score: float
    answer: str
    references: tuple[str, ...]
    context_tokens: int
    question_tokens: int
    new_tokens: int
    max_new_tokens: int
    depths: tuple[float, ...]


@dataclass
class ModelScores:
    """Everything measured for one model (base or release)."""

    label: str
    describe: dict[str, Any]
    answers: list[Answer] = field(default_factory=list)
    failures: dict[int, str] = field(default_factory=dict)  # length -> why it has no score
    perplexity: perplexity.PerplexityResult | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    seconds_by_length: dict[int, float] = field(default_factory=dict)
    load_seconds: list[float] = field(default_factory=list)

    def task_means(self) -> dict[int, dict[str, float]]:
        """length -> task -> mean score over its trials."""
        groups: dict[int, dict[str, list[float]]] = {}
        for a in self.answers:
            groups.setdefault(a.length, {}).setdefault(a.task, []).append(a.score)
        return {n: {t: sum(v) / len(v) for t, v in tasks.items()}
                for n, tasks in sorted(groups.items())}

    def suite_means(self, lengths: list[int]) -> dict[int, float | None]:
        """length -> mean over tasks (RULER's average); None where the length failed."""
        means = self.task_means()
        return {n: (None if n in self.failures or n not in means
                    else sum(means[n].values()) / len(means[n])) for n in lengths}


def work(config: Any, tokens: int, scored: bool = False) -> float:
    """Multiply-adds of one forward over `tokens` (weights once per token, causal attention
    over half the context on average), in units of 1e9: the progress bar's ETA unit."""
    layers, hidden = config.num_hidden_layers, config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    body = layers * (4 * hidden * hidden + 3 * hidden * inner)
    head = config.vocab_size * hidden if scored else 0
    return tokens * (body + head + layers * hidden * tokens) / 1e9


def _answer_prompt(model: Any, tokenizer: Any, prompt: hay.Prompt, end_ids: set[int]
                   ) -> list[Answer]:
    questions = prompt.questions

    def finished(row: int, ids: list[int]) -> bool:  # more tokens cannot change a full score
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return ruler_tasks.string_match_all(text, questions[row].references) == 1.0

    generated = answer_questions(model, prompt.context_ids, [q.ids for q in questions],
                                 [q.max_new_tokens for q in questions], end_ids, finished,
                                 tokenizer.pad_token_id or 0)
    out = []
    for q, ids in zip(questions, generated, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        out.append(Answer(q.task, prompt.length, prompt.trial,
                          ruler_tasks.string_match_all(text, q.references), text, q.references,
                          len(prompt.context_ids), len(q.ids), len(ids), q.max_new_tokens,
                          q.depths))
    return out


def measure(target: EvalTarget, lengths: list[int], prompts: dict[int, list[hay.Prompt]],
            inputs: Inputs, settings: CertifySettings, advance: Callable[[float, str], None]
            ) -> ModelScores:
    """The suite at `lengths`, then perplexity at the original window."""
    loader, tokenizer = ModelLoader(target, inputs.device), inputs.tokenizer
    scores = ModelScores(target.label, dict(target.describe))
    config = inputs.config
    try:
        for length in lengths:
            model, _ = loader.fresh()
            scores.facts = scores.facts or model_facts(model, tokenizer)
            started, ends = time.perf_counter(), end_token_ids(model, tokenizer)
            for index, prompt in enumerate(prompts[length]):
                advance(0.0, f"{target.label} | {length} tok, context {index + 1}/"
                             f"{len(prompts[length])}")
                try:
                    scores.answers += _answer_prompt(model, tokenizer, prompt, ends)
                except (torch.OutOfMemoryError, MemoryError) as exc:
                    scores.failures[length] = f"out of memory: {exc}".splitlines()[0]
                    advance(sum(work(config, p.tokens) for p in prompts[length][index:]), "")
                    break
                advance(work(config, prompt.tokens), "")
            scores.seconds_by_length[length] = time.perf_counter() - started
        model, _ = loader.fresh()
        advance(0.0, f"{target.label} | perplexity at {inputs.plan.original}")
        spec = perplexity.WindowSpec(inputs.plan.original, mode="whole-window",
                                     max_windows=settings.ppl_windows)
        probe = max(inputs.document_ids, key=len)[:64].unsqueeze(0).to(inputs.device)
        perplexity.check_chunked_head(model, probe)
        scores.perplexity = perplexity.measure_perplexity(
            model, inputs.document_ids, spec, settings.chunk_tokens,
            on_window=lambda n: advance(work(config, n, scored=True), ""))
    finally:
        scores.load_seconds = loader.load_seconds
        loader.close()
    return scores


def _target(label: str, section: ModelSection, describe: dict[str, Any]) -> EvalTarget:
    return EvalTarget(label, lambda: (load_model(section, None), load_tokenizer(section)),
                      describe)


def run_models(inputs: Inputs, settings: CertifySettings, prompts: dict[int, list[hay.Prompt]]
               ) -> tuple[ModelScores, ModelScores]:
    """(base, release) scores; one progress bar over both, its ETA in forward multiply-adds."""
    plan, config = inputs.plan, inputs.config
    windows = min(settings.ppl_windows, sum(len(t) // plan.original for t in inputs.document_ids))
    total = sum(work(config, p.tokens) for n in plan.base_lengths + plan.release_lengths
                for p in prompts[n]) + 2 * windows * work(config, plan.original, scored=True)
    bar = tqdm(total=total, file=sys.stderr, disable=not settings.progress, dynamic_ncols=True,
               desc="certify", bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}"
                                          " {postfix}")

    def advance(amount: float, what: str) -> None:
        if what:
            bar.set_postfix_str(what)
        bar.update(amount)

    window = {"original": plan.original, "target": plan.target}
    base = _target("base", inputs.base_model, {"kind": "base", "model": inputs.base_model.name,
                                               "window": window})
    release = _target("release", inputs.release_model, {
        "kind": "release", "model": str(inputs.release.path), "rope": inputs.rope.to_dict(),
        "window": window})
    with bar:
        base_scores = measure(base, plan.base_lengths, prompts, inputs, settings, advance)
        release_scores = measure(release, plan.release_lengths, prompts, inputs, settings,
                                 advance)
    return base_scores, release_scores


def judge(inputs: Inputs, settings: CertifySettings, base: ModelScores, release: ModelScores
          ) -> Verdict:
    """The verdict from the two models' numbers (pi_lora.eval.certify's rules)."""
    plan = inputs.plan
    base_means = base.suite_means(plan.base_lengths)
    release_means = release.suite_means(plan.release_lengths)
    threshold = suite_threshold(base_means[plan.original], settings)
    kept = retention(release.perplexity and release.perplexity.ppl,
                     base.perplexity and base.perplexity.ppl, release_means, base_means,
                     plan.short_lengths)
    return decide(release_means, threshold, kept, settings.required_length or plan.target,
                  settings.min_retention,
                  None if settings.threshold is not None else base_means[plan.original])
