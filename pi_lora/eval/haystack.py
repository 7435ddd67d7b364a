"""Contexts of an exact token length: a haystack with the tasks' needles and blocks placed at
seeded depths, fitted to the length by binary search on the haystack's size (as RULER does).

The haystack is RULER's noise (the passkey filler sentences, repeated) or text (the user's
files or the public-domain plays pi-lora ships, split into sentences and cycled). A `Prompt`
is one context and every question asked after it: the model reads the context once and
answers all of them (pi_lora.eval.decoding), so tasks sharing a haystack cost one prefill.

Length means what it means in RULER: context + question + the answer's token budget <= L.
The context and each question are tokenized separately and concatenated (the shared prefix's
ids are exactly what the model was given), the context with the tokenizer's special tokens.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pi_lora.core.errors import PiLoraError
from pi_lora.eval.passkey import FILLER
from pi_lora.eval.ruler_tasks import Sample
from pi_lora.eval.texts import Document

BLOCK_SHARE = 0.25  # of the context each cwe / fwe block gets when it shares a haystack
DEPTH_SLOTS = 40  # RULER's depths: 40 points evenly spaced over the haystack, drawn without replacement
SHORTFALL = 0.95  # a lone word list must reach this fraction of its length (else it is refused)


@dataclass(frozen=True)
class Haystack:
    """Filler pieces, cycled; `separator` joins them (noise: lines; text: sentences)."""

    kind: Literal["noise", "text"]
    pieces: tuple[str, ...]
    separator: str
    source: str

    def filler(self, count: int) -> list[str]:
        return [self.pieces[i % len(self.pieces)] for i in range(count)]


def noise_haystack() -> Haystack:
    """RULER's noise haystack: 'The grass is green. ...' repeated, one line each."""
    return Haystack("noise", (FILLER,), "\n", "RULER noise sentences")


def text_haystack(documents: Sequence[Document]) -> Haystack:
    """The documents' sentences in order (whitespace collapsed), as RULER uses its essays."""
    text = " ".join(re.sub(r"\s+", " ", d.text).strip() for d in documents)
    sentences = tuple(s for s in re.split(r"(?<=[.!?])\s+", text) if s)
    if not sentences:
        raise PiLoraError("the haystack documents hold no text", field="--haystack",
                          fix="give text files with sentences in them")
    return Haystack("text", sentences, " ", ", ".join(d.source for d in documents))


@dataclass(frozen=True)
class Question:
    """One question after a context: its ids, what the answer must contain, its budget."""

    task: str
    ids: tuple[int, ...]
    references: tuple[str, ...]
    max_new_tokens: int
    depths: tuple[float, ...]  # where its needles (or block) sit, as fractions of the haystack


@dataclass(frozen=True)
class Prompt:
    """One context (read once) and the questions asked after it."""

    length: int
    trial: int
    context_ids: tuple[int, ...]
    questions: tuple[Question, ...]
    filler_pieces: int

    @property
    def tokens(self) -> int:
        """Prompt tokens incl. every question (what the progress bar counts)."""
        return len(self.context_ids) + sum(len(q.ids) for q in self.questions)


def _count(tokenizer: Any, text: str, special: bool) -> int:
    return len(tokenizer(text, add_special_tokens=special)["input_ids"])


def answer_budget(tokenizer: Any, sample: Sample) -> int:
    """Twice the references' tokens + 8, at most RULER's tokens_to_generate for the task:
    room for the answer and some words around it, without decoding 128 tokens per needle."""
    needed = _count(tokenizer, ", ".join(sample.references), special=False)
    return min(sample.generation_cap, 2 * needed + 8)


def _largest(fits: Callable[[int], bool], low: int, high: int) -> int | None:
    """Largest n in [low, high] with fits(n) (fits is monotone: True then False); None if none."""
    if not fits(low):
        return None
    step = 1
    while low + step <= high and fits(low + step):  # gallop, then bisect
        low, step = low + step, step * 2
    high = min(high, low + step - 1)
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _too_short(length: int, what: str) -> PiLoraError:
    return PiLoraError(f"length {length} leaves no room for {what} with this tokenizer",
                       field="--lengths", fix="use longer lengths (or fewer --tasks)")


def _depths(samples: Sequence[Sample], rng: random.Random) -> list[list[float]]:
    """Per sample, the depth of each needle (a chain's in order) or of its block."""
    counts = [len(s.needles) if s.block is None else 1 for s in samples]
    slots = max(DEPTH_SLOTS, sum(counts))
    drawn = [i / (slots - 1) for i in rng.sample(range(slots), sum(counts))]
    out, start = [], 0
    for sample, count in zip(samples, counts, strict=True):
        mine = drawn[start:start + count]
        out.append(sorted(mine) if sample.chained else mine)
        start += count
    return out


def _body(haystack: Haystack, count: int, placed: list[tuple[float, str, bool]]) -> str:
    """`count` filler pieces with the (depth, text, is_block) items before the piece at
    round(depth * count); blocks stand on their own lines."""
    before: dict[int, list[tuple[str, bool]]] = {}
    for depth, text, is_block in sorted(placed, key=lambda p: p[0]):
        before.setdefault(round(depth * count), []).append((text, is_block))
    pieces: list[tuple[str, bool]] = []
    for index, filler in enumerate([*haystack.filler(count), None]):
        pieces += before.get(index, [])
        if filler is not None:
            pieces.append((filler, False))
    out = pieces[0][0] if pieces else ""
    for (_, after_block), (text, block) in itertools.pairwise(pieces):
        out += ("\n" if block or after_block else haystack.separator) + text
    return out


def _fit_block(sample: Sample, tokenizer: Any, budget: int, length: int) -> str:
    assert sample.block is not None
    low, high = sample.block_sizes
    n = _largest(lambda k: _count(tokenizer, sample.block(k), False) <= budget, low, high)  # type: ignore[misc]
    if n is None:
        raise _too_short(length, f"the {sample.task} block")
    return sample.block(n)


def build_prompt(samples: Sequence[Sample], haystack: Haystack, tokenizer: Any, length: int,
                 trial: int, layout_rng: random.Random) -> Prompt:
    """The largest context whose every question, plus its answer budget, fits in `length`.

    A lone block task (cwe or fwe by itself) is its own context, as in RULER; otherwise
    blocks get BLOCK_SHARE of the room each and haystack pieces fill the rest.
    """
    budgets = [answer_budget(tokenizer, s) for s in samples]
    q_ids = [tuple(tokenizer(s.question, add_special_tokens=False)["input_ids"]) for s in samples]
    room = length - max(len(q) + b for q, b in zip(q_ids, budgets, strict=True))
    depths = _depths(samples, layout_rng)
    instructions = "\n".join(dict.fromkeys(s.instruction for s in samples if s.instruction))
    head = instructions + "\n" if instructions else ""
    alone = len(samples) == 1 and samples[0].block is not None
    placed: list[tuple[float, str, bool]] = []
    for sample, where in zip(samples, depths, strict=True):
        if sample.block is not None and not alone:
            block = _fit_block(sample, tokenizer, int(room * BLOCK_SHARE), length)
            placed.append((where[0], block, True))
        elif sample.block is None:
            placed += [(d, needle, False) for d, needle in zip(where, sample.needles, strict=True)]

    if alone:
        block = _fit_block(samples[0], tokenizer, room - _count(tokenizer, head + "\n", True), length)
        text, count = head + block + "\n", 0
    else:
        def context(n: int) -> str:
            return head + _body(haystack, n, placed) + "\n"

        found = _largest(lambda n: _count(tokenizer, context(n), True) <= room, 0, 10**7)
        if found is None:
            raise _too_short(length, "the needles and questions")
        text, count = context(found), found
    ids = tuple(tokenizer(text)["input_ids"])
    questions = tuple(Question(s.task, q, s.references, b, tuple(d))
                      for s, q, b, d in zip(samples, q_ids, budgets, depths, strict=True))
    prompt = Prompt(length, trial, ids, questions, count)
    longest = len(ids) + max(len(q.ids) + q.max_new_tokens for q in questions)
    if alone and longest < SHORTFALL * length:  # the word list ran out before the length
        raise PiLoraError(f"the {samples[0].task} context reaches only {longest} of {length} "
                          "tokens", field="--lengths",
                          fix="use shorter lengths or --layout shared")
    return prompt
