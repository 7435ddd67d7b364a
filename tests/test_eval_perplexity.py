"""Perplexity windows and chunked scoring against brute-force references on a tiny Llama."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from pi_lora.eval import perplexity
from pi_lora.eval.perplexity import WindowSpec
from pi_lora.testing import tiny_config

VOCAB = 128


def tiny_llama(tied: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=VOCAB, max_positions=64, hidden_size=32,
                         intermediate_size=64, tie_word_embeddings=tied)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def random_docs(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=generator) for n in lengths]


@pytest.mark.parametrize(
    ("doc_lengths", "length", "stride"),
    [([1000], 128, 32), ([1000, 50, 333], 64, 7), ([64], 64, 16), ([65, 200], 64, 63)],
)
def test_sliding_scores_every_token_exactly_once(doc_lengths, length, stride):
    windows = perplexity.plan_windows(doc_lengths, WindowSpec(length, stride))
    for doc, n_tokens in enumerate(doc_lengths):
        mine = [w for w in windows if w.doc == doc]
        if n_tokens < length:
            assert not mine  # too short to give `length` tokens of context
            continue
        counts = Counter(p for w in mine for p in range(w.score_from, w.end))
        assert counts == Counter(range(1, n_tokens))  # every token but the first, once
        assert all(w.end - w.begin == length and w.score_from > w.begin for w in mine)
        # after the first window every scored token sees >= length - stride tokens of context
        assert all(w.score_from - w.begin >= length - stride for w in mine[1:])


def test_stride_equal_to_window_is_independent_windows():
    lengths = [640, 320]
    sliding = perplexity.plan_windows(lengths, WindowSpec(64, 64))
    whole = perplexity.plan_windows(lengths, WindowSpec(64, mode="whole-window"))
    assert sliding == whole
    assert all(w.scored == 63 for w in whole)


def test_bounds_stop_early():
    windows = perplexity.plan_windows([10_000], WindowSpec(100, 10, max_windows=5))
    assert len(windows) == 5
    windows = perplexity.plan_windows([10_000], WindowSpec(100, 10, max_tokens=150))
    assert sum(w.scored for w in windows) == 99 + 10 * 6  # stops once >= 150 scored


def test_span_makes_every_length_score_the_same_tokens():
    for length in (64, 128, 256):
        windows = perplexity.plan_windows([5000, 300], WindowSpec(length, 32, span_tokens=256))
        scored = sorted((w.doc, p) for w in windows for p in range(w.score_from, w.end))
        assert scored == [(0, p) for p in range(1, 256)] + [(1, p) for p in range(1, 256)]
    # whole-window: L=64 -> 4 windows over the span, a length above the span -> one window
    whole = perplexity.plan_windows([5000], WindowSpec(64, mode="whole-window", span_tokens=256))
    assert [(w.begin, w.end) for w in whole] == [(0, 64), (64, 128), (128, 192), (192, 256)]
    long = perplexity.plan_windows([5000], WindowSpec(512, mode="whole-window", span_tokens=256))
    assert [(w.begin, w.end) for w in long] == [(0, 512)]


def test_stride_must_fit_the_window():
    with pytest.raises(ValueError, match="stride"):
        WindowSpec(64, 128)
    WindowSpec(64, 128, mode="whole-window")  # stride unused there


def brute_force_sliding(model, doc: torch.Tensor, length: int, stride: int) -> tuple[float, int]:
    """Press et al. written out directly: full logits per window, score the unscored tail."""
    n_tokens = doc.numel()
    ends = [*range(length, n_tokens, stride), n_tokens]
    nll, count, scored_until = 0.0, 0, 1
    for end in ends:
        begin = end - length
        with torch.no_grad():
            logp = F.log_softmax(model(doc[begin:end][None]).logits[0].float(), -1)
        for position in range(max(scored_until, begin + 1), end):
            nll -= logp[position - begin - 1, doc[position]].item()
            count += 1
        scored_until = end
    return nll, count


def test_sliding_ppl_matches_brute_force():
    model = tiny_llama()
    docs = random_docs(200, 20, 100)
    result = perplexity.measure_perplexity(model, docs, WindowSpec(48, 20), chunk_tokens=10)
    reference = [brute_force_sliding(model, d, 48, 20) for d in (docs[0], docs[2])]
    nll = sum(r[0] for r in reference)
    count = sum(r[1] for r in reference)
    assert result.tokens == count == 199 + 99
    assert result.nll_sum == pytest.approx(nll, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result.documents_used == [0, 2]
    assert result.windows == len(perplexity.plan_windows([200, 20, 100], WindowSpec(48, 20)))


def test_sliding_with_stride_equal_to_window_equals_whole_window():
    model = tiny_llama()
    docs = random_docs(256)
    sliding = perplexity.measure_perplexity(model, docs, WindowSpec(64, 64))
    whole = perplexity.measure_perplexity(model, docs, WindowSpec(64, mode="whole-window"))
    assert (sliding.tokens, sliding.windows) == (whole.tokens, whole.windows) == (4 * 63, 4)
    assert sliding.nll_sum == pytest.approx(whole.nll_sum, rel=1e-6)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize(("score_from", "chunk"), [(1, 7), (1, 1024), (40, 3)])
def test_chunked_scoring_equals_full_logits(tied: bool, score_from: int, chunk: int):
    model = tiny_llama(tied)
    ids = random_docs(61)[0][None]
    nll, count = perplexity.score_window(model, ids, score_from, chunk_tokens=chunk)
    with torch.no_grad():
        logits = model(ids).logits[0, score_from - 1 : -1].float()
    expected = F.cross_entropy(logits, ids[0, score_from:], reduction="sum").item()
    assert count == 61 - score_from
    assert nll == pytest.approx(expected, rel=1e-5)


def test_chunked_scoring_through_a_lora_wrapper():
    model = tiny_llama()
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    wrapped = get_peft_model(model, config).eval()
    ids = random_docs(40)[0][None]
    perplexity.check_chunked_head(wrapped, ids)
    nll, _ = perplexity.score_window(wrapped, ids, 1, chunk_tokens=8)
    with torch.no_grad():
        logits = wrapped(input_ids=ids).logits[0, :-1].float()
    expected = F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
    assert nll == pytest.approx(expected, rel=1e-5)


def test_no_long_enough_document_is_an_error():
    with pytest.raises(ValueError, match="no document has 64 tokens"):
        perplexity.measure_perplexity(tiny_llama(), random_docs(30, 40), WindowSpec(64, 16))
