"""Passkey prompts (length, depth in tokens, keys), scoring and k_max, without a real model."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from pi_lora.core.errors import PiLoraError
from pi_lora.eval import passkey


def tiny_tokenizer(add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on the prompt's own words, digits split like Llama's."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [passkey.INSTRUCTION, passkey.FILLER * 3, passkey.QUESTION, passkey.key_line("12345")]
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    if add_bos:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", bos)]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer()


def _key_line_start(ids: list[int], line_ids: list[int]) -> int:
    starts = [i for i in range(len(ids)) if ids[i : i + len(line_ids)] == line_ids]
    assert len(starts) == 1
    return starts[0]


@pytest.mark.parametrize("length", [300, 1000, 4000])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_key_line_sits_at_requested_depth_in_tokens(tokenizer, length: int, depth: float):
    prompt = passkey.build_prompt(tokenizer, length, depth, "40417")
    line_ids = tokenizer("\n" + passkey.key_line("40417"), add_special_tokens=False)["input_ids"]
    start = _key_line_start(prompt.input_ids, line_ids[1:])  # the line without its newline
    assert start == prompt.key_token_index
    head = len(tokenizer(passkey.INSTRUCTION + "\n")["input_ids"])
    measured = (start - head) / prompt.filler_tokens
    assert measured == pytest.approx(prompt.depth)
    assert abs(measured - depth) <= max(0.01, 3 / prompt.filler_tokens)
    assert prompt.input_ids == tokenizer(prompt.text)["input_ids"]


@pytest.mark.parametrize("length", [200, 777, 2048, 6000])
def test_prompt_length_is_close_to_requested(tokenizer, length: int):
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey.build_prompt(tokenizer, length, depth, "99999")
        assert abs(len(prompt.input_ids) - length) <= 2
        assert prompt.text.startswith(passkey.INSTRUCTION)
        assert prompt.text.endswith(passkey.QUESTION)
        assert prompt.input_ids[0] == tokenizer.bos_token_id


def test_prompt_without_bos_tokenizer():
    tokenizer = tiny_tokenizer(add_bos=False)
    prompt = passkey.build_prompt(tokenizer, 500, 0.5, "11111")
    assert abs(len(prompt.input_ids) - 500) <= 2
    assert abs(prompt.depth - 0.5) <= 0.01


def test_too_short_length_is_refused(tokenizer):
    with pytest.raises(PiLoraError, match="no room") as refused:
        passkey.build_prompt(tokenizer, 40, 0.5, "12345")
    assert refused.value.field == "--passkey-lengths" and "at least" in (refused.value.fix or "")


def test_same_seed_same_keys():
    cells = [(n, d, t) for n in (1024, 4096) for d in (0.0, 0.5) for t in range(3)]
    first = [passkey.make_key(7, *cell) for cell in cells]
    assert first == [passkey.make_key(7, *cell) for cell in cells]
    assert first != [passkey.make_key(8, *cell) for cell in cells]
    assert all(re.fullmatch(r"[1-9]\d{4}", key) for key in first)
    assert len(set(first)) > len(first) // 2


def test_k_max_rule():
    assert passkey.k_max({1024: 1.0, 2048: 0.5, 4096: 0.2}, 0.2) == 4096
    assert passkey.k_max({1024: 1.0, 2048: 0.5, 4096: 0.1}, 0.2) == 2048
    # non-monotone: a pass after a failure does not extend the window
    assert passkey.k_max({1024: 1.0, 2048: 0.0, 4096: 0.9, 8192: 1.0}, 0.2) == 1024
    assert passkey.k_max({4096: 0.9, 1024: 0.1, 2048: 1.0}, 0.2) == 0
    assert passkey.k_max({}, 0.2) == 0


@pytest.mark.parametrize(
    ("generated", "correct"),
    [(" 12345. Remember", True), ("12345", True), (" 1234", False), (" 123456", False),
     (" 54321 12345", False), (" the key", False), (" 12 345", False)],
)
def test_exact_match_scoring(generated: str, correct: bool):
    assert passkey.score_answer(generated, "12345") is correct


def test_run_with_fake_generate_scores_exact_matches(tokenizer):
    """A fake model that reads the key from the prompt, but only for short prompts."""

    def generate(input_ids: list[int]) -> str:
        key = re.search(r"pass key is (\d{5})", tokenizer.decode(input_ids)).group(1)
        return f" {key}." if len(input_ids) <= 600 else f" {key[::-1]}0"

    result = passkey.PasskeyResult()
    seen: list[int] = []
    for length in (300, 600, 900):
        result.trials += passkey.run_passkey_length(
            generate, tokenizer, length, [0.0, 1.0], trials=2, seed=3, on_trial=seen.append
        )
    assert len(result.trials) == 12 and len(seen) == 12
    assert result.accuracy_by_length() == {300: 1.0, 600: 1.0, 900: 0.0}
    assert result.accuracy_by_cell()[(600, 1.0)] == 1.0
    assert result.k_max(0.2) == 600
    assert [t.key for t in result.trials[:2]] == [passkey.make_key(3, 300, 0.0, t) for t in (0, 1)]
