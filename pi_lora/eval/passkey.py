"""Passkey retrieval (PI paper, LongChat/landmark prompt): can the model find a key at depth d?

The prompt is built as text and tokenized whole, so it is exactly what the model would see
from a user; filler is added word by word until the prompt has the requested number of
tokens, and the key line is placed where the requested fraction of the filler *tokens*
(not characters) lies before it. Pieces are joined by newlines, the layout the demo base
(`pi_lora.demo.passkey`) is trained on.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pi_lora.core.errors import PiLoraError

INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
SEPARATOR = "\n"
_FILLER_WORDS = FILLER.split()
_FIT_ROUNDS = 6  # length/depth refinement rounds; converges in 2-3 for BPE tokenizers

# ids -> generated text; injected so scoring can be tested without a model
GenerateFn = Callable[[list[int]], str]


def key_line(key: str) -> str:
    """The sentence that hides the key (PI paper wording)."""
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def make_key(seed: int, length: int, depth: float, trial: int) -> str:
    """A 5-digit key that depends only on (seed, cell, trial), not on which other cells run."""
    rng = random.Random(f"{seed}:{length}:{depth:.6f}:{trial}")
    return str(rng.randint(10000, 99999))


@dataclass(frozen=True)
class PasskeyPrompt:
    """One prompt; token positions count the tokenizer's special tokens (e.g. BOS)."""

    text: str
    input_ids: list[int]
    key: str
    key_token_index: int  # first token of the key line
    filler_tokens: int  # tokens of filler text, the denominator of the depth
    depth: float  # depth measured in tokens: filler tokens before the key / filler_tokens


def _count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def _filler(start: int, count: int) -> str:
    """`count` filler words, continuing the cycle at word `start`."""
    n = len(_FILLER_WORDS)
    return " ".join(_FILLER_WORDS[(start + i) % n] for i in range(count))


def _layout(key: str, words_before: int, words_after: int) -> tuple[str, str]:
    """(text up to the key line, full text); empty filler pieces are left out."""
    head = [INSTRUCTION, _filler(0, words_before)]
    tail = [key_line(key), _filler(words_before, words_after), QUESTION]
    prefix = SEPARATOR.join(p for p in head if p) + SEPARATOR
    return prefix, prefix + SEPARATOR.join(p for p in tail if p)


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, length_tokens: int, depth: float, key: str
) -> PasskeyPrompt:
    """A prompt of ~length_tokens tokens (within a word) with the key at `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head_tokens = _count(tokenizer, INSTRUCTION + SEPARATOR)
    bare_tokens = _count(tokenizer, _layout(key, 0, 0)[1])
    sample_words = 200
    per_word = (_count(tokenizer, _filler(0, sample_words)) - _count(tokenizer, "")) / sample_words
    if length_tokens - bare_tokens < 2 * per_word:
        shortest = int(bare_tokens + 2 * per_word) + 1
        raise PiLoraError(
            f"passkey length {length_tokens} leaves no room for filler with this tokenizer",
            field="--passkey-lengths", fix=f"use lengths of at least {shortest} tokens",
        )
    words = round((length_tokens - bare_tokens) / per_word)
    before = round(depth * words)
    for _ in range(_FIT_ROUNDS):
        prefix, text = _layout(key, before, words - before)
        total = _count(tokenizer, text)
        filler_tokens = total - bare_tokens
        before_tokens = _count(tokenizer, prefix) - head_tokens
        grow = round((length_tokens - total) / per_word)
        shift = round((depth * filler_tokens - before_tokens) / per_word)
        if grow == 0 and shift == 0:
            break
        words = max(words + grow, 1)
        before = min(max(before + shift + round(depth * grow), 0), words)
    ids = tokenizer(text)["input_ids"]
    key_index = _count(tokenizer, prefix)
    measured = (key_index - head_tokens) / max(filler_tokens, 1)
    return PasskeyPrompt(text, ids, key, key_index, filler_tokens, measured)


def score_answer(generated: str, key: str) -> bool:
    """Exact match: the first run of digits in the answer must be the key, nothing more or less."""
    found = re.search(r"\d+", generated)
    return found is not None and found.group() == key


def greedy_generate_fn(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> GenerateFn:
    """Greedy decoding of the answer; returns only the new text."""
    pad_id = tokenizer.pad_token_id
    pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
    device = next(model.parameters()).device

    @torch.no_grad()
    def generate(input_ids: list[int]) -> str:
        ids = torch.tensor([input_ids], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
        )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    return generate


@dataclass(frozen=True)
class PasskeyTrial:
    length: int
    depth: float
    trial: int
    key: str
    answer: str
    correct: bool
    prompt_tokens: int
    measured_depth: float


@dataclass
class PasskeyResult:
    """All trials of one target plus the derived accuracies."""

    trials: list[PasskeyTrial] = field(default_factory=list)
    seconds_by_length: dict[int, float] = field(default_factory=dict)

    def accuracy_by_cell(self) -> dict[tuple[int, float], float]:
        return _mean_by(self.trials, lambda t: (t.length, t.depth))

    def accuracy_by_length(self) -> dict[int, float]:
        return _mean_by(self.trials, lambda t: t.length)

    def k_max(self, threshold: float) -> int:
        return k_max(self.accuracy_by_length(), threshold)


def _mean_by(trials: Iterable[PasskeyTrial], key: Callable[[PasskeyTrial], object]) -> dict:
    groups: dict = {}
    for t in trials:
        groups.setdefault(key(t), []).append(t.correct)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


def run_passkey_length(
    generate: GenerateFn,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    depths: Iterable[float],
    trials: int,
    seed: int,
    on_trial: Callable[[int], None] | None = None,
) -> list[PasskeyTrial]:
    """All (depth, trial) cells of one length; `on_trial(prompt_tokens)` drives progress."""
    results = []
    for depth in depths:
        for trial in range(trials):
            prompt = build_prompt(tokenizer, length, depth, make_key(seed, length, depth, trial))
            answer = generate(prompt.input_ids)
            results.append(
                PasskeyTrial(
                    length, depth, trial, prompt.key, answer, score_answer(answer, prompt.key),
                    len(prompt.input_ids), prompt.depth,
                )
            )
            if on_trial is not None:
                on_trial(len(prompt.input_ids))
    return results


def k_max(acc_by_length: Mapping[int, float], threshold: float = 0.2) -> int:
    """Largest length k such that every evaluated length <= k reaches `threshold` (PI paper).

    A pass at a longer length after a failure does not count: the window is what works
    without gaps. 0 when the shortest length already fails.
    """
    best = 0
    for length in sorted(acc_by_length):
        if acc_by_length[length] < threshold:
            break
        best = length
    return best
