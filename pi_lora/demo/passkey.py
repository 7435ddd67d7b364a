"""Passkey documents for the demo base, laid out exactly like ``pi-lora eval``'s prompts.

The base model learns retrieval from these documents during pre-training, like a real model
learns it from its corpus; the extension fine-tunes never see them, so passkey accuracy after
a fine-tune measures a held-out skill (the PI paper's protocol). The wording and layout come
from ``pi_lora.eval.passkey`` so that the evaluator measures the skill the base was taught.
"""

from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pi_lora.eval.passkey import FILLER, INSTRUCTION, QUESTION, SEPARATOR, build_prompt, key_line

_WORDS = FILLER.split()


def random_key(rng: random.Random) -> str:
    """A random 5-digit key, as the evaluator draws them."""
    return str(rng.randint(10000, 99999))


def _filler(start: int, count: int) -> str:
    return " ".join(_WORDS[(start + i) % len(_WORDS)] for i in range(count))


def passkey_text(key: str, words_before: int, words_after: int, instruction: bool = True) -> str:
    """Instruction, filler, key line, filler, question and answer, joined by newlines."""
    pieces = [INSTRUCTION if instruction else "", _filler(0, words_before), key_line(key)]
    pieces += [_filler(words_before, words_after), QUESTION]
    return SEPARATOR.join(p for p in pieces if p) + f" {key}."


def passkey_document(
    tokenizer: PreTrainedTokenizerBase, length: int, rng: random.Random
) -> list[int]:
    """Token ids of one training document, at most ``length`` long, padded with EOS.

    Documents shorter than 160 tokens leave the instruction out (it alone is ~30 tokens):
    they are the short retrieval drills the base learns to copy from.

    The first guess (80 tokens of instruction, key line and question, 1.8 tokens per filler
    word) is a little short; a document that comes out too long loses filler words until it
    fits, so the key's depth stays uniform in [0, 1].
    """
    key, depth = random_key(rng), rng.random()
    instruction = length >= 160
    words = max(0, int((length - (80 if instruction else 45)) / 1.8))
    while True:  # one or two rounds
        before = round(depth * words)
        ids = tokenizer(passkey_text(key, before, words - before, instruction))["input_ids"]
        if len(ids) <= length:
            return ids + [tokenizer.eos_token_id] * (length - len(ids))
        if words == 0:
            raise ValueError(f"a passkey document needs more than {length} tokens")
        words = max(0, words - max(1, (len(ids) - length) // 2))


@torch.no_grad()
def passkey_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    length: int,
    trials: int,
    seed: int = 0,
) -> float:
    """Share of ``pi-lora eval`` prompts whose key greedy decoding reproduces.

    Teacher-forced: greedy decoding emits " NNNNN" exactly when the argmax at each of its
    positions is the right token, so one forward pass replaces token-by-token generation.
    """
    rng = random.Random(seed)
    hits = 0
    for trial in range(trials):
        prompt = build_prompt(tokenizer, length, (trial + 0.5) / trials, random_key(rng))
        answer = tokenizer(f" {prompt.key}", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt.input_ids + answer])
        logits = model(input_ids=ids).logits[0]
        start = len(prompt.input_ids) - 1
        predicted = logits[start : start + len(answer)].argmax(-1)
        hits += int(torch.equal(predicted, ids[0, start + 1 :]))
    return hits / trials
