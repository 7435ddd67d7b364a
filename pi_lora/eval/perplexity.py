"""Perplexity at a fixed context length, sliding (Press et al.) or whole-window.

Sliding: windows of L tokens whose ends advance by the stride S; each window scores only
the tokens no earlier window scored, so with S < L every token after the first of a
document is scored exactly once, each with at least L - S tokens of context (the first
window scores all of its tokens). Whole-window: disjoint windows of L tokens, every
prediction inside a window scored (LongLoRA's protocol; gives different numbers).

Scoring never materializes the logits of a whole window: the decoder body gives hidden
states [1, T, D], and the lm_head runs over chunks of `chunk_tokens` positions, so a 32k
window of a 128k-vocab model needs ~0.5 GB of logits instead of 16 GB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedModel

from pi_lora.core.errors import PiLoraError
from pi_lora.eval.settings import PplMode


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) of document `doc` go in; predictions of [score_from, end) count."""

    doc: int
    begin: int
    end: int
    score_from: int

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def _sliding(doc: int, n_tokens: int, length: int, stride: int) -> list[Window]:
    windows, scored_until, end = [], 1, min(length, n_tokens)
    while True:
        begin = max(0, end - length)
        windows.append(Window(doc, begin, end, max(scored_until, begin + 1)))
        scored_until = end
        if end == n_tokens:
            return windows
        end = min(end + stride, n_tokens)


def _whole(doc: int, n_tokens: int, length: int) -> list[Window]:
    return [Window(doc, b, b + length, b + 1) for b in range(0, n_tokens - length + 1, length)]


@dataclass(frozen=True)
class WindowSpec:
    """How one length is measured; the cost bounds apply per length, over all documents."""

    length: int
    stride: int = 256  # sliding only
    mode: PplMode = "sliding"
    max_windows: int | None = None
    max_tokens: int | None = None  # no new window once this many tokens are scored
    span_tokens: int | None = None  # only the first max(span, length) tokens of each document

    def __post_init__(self) -> None:
        if self.mode == "sliding" and not 0 < self.stride <= self.length:
            raise ValueError(f"stride must be in (0, length={self.length}], got {self.stride}")


def plan_windows(doc_lengths: Sequence[int], spec: WindowSpec) -> list[Window]:
    """Windows over the documents in order, stopping at spec.max_windows / max_tokens.

    Documents shorter than the length are skipped: their windows would measure a shorter
    context than the one reported. A span makes every length score the same stretch of
    text (in sliding mode exactly the same tokens), so lengths differ only in context.
    """
    windows: list[Window] = []
    scored = 0
    for doc, n_tokens in enumerate(doc_lengths):
        if spec.span_tokens is not None:
            n_tokens = min(n_tokens, max(spec.span_tokens, spec.length))
        if n_tokens < spec.length:
            continue
        if spec.mode == "sliding":
            doc_windows = _sliding(doc, n_tokens, spec.length, spec.stride)
        else:
            doc_windows = _whole(doc, n_tokens, spec.length)
        for window in doc_windows:
            if spec.max_windows is not None and len(windows) >= spec.max_windows:
                return windows
            if spec.max_tokens is not None and scored >= spec.max_tokens:
                return windows
            windows.append(window)
            scored += window.scored
    return windows


def _decoder_hidden(model: PreTrainedModel, input_ids: Tensor) -> Tensor:
    """Final hidden states [1, T, D] (after the last norm), without the lm_head."""
    out = model.get_decoder()(input_ids=input_ids, use_cache=False)
    return out.last_hidden_state


def _head_logits(model: PreTrainedModel, hidden: Tensor) -> Tensor:
    """lm_head on a chunk [1, C, D] -> fp32 logits [1, C, V], with the model's soft-capping."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)  # Gemma 2/3
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@torch.no_grad()
def score_window(
    model: PreTrainedModel, input_ids: Tensor, score_from: int, chunk_tokens: int = 1024
) -> tuple[float, int]:
    """(sum of NLL in nats, tokens scored) for positions [score_from, T) of input_ids [1, T].

    Position p is predicted from hidden state p - 1; only the scored rows reach the head.
    """
    assert input_ids.dim() == 2 and input_ids.shape[0] == 1 and score_from >= 1
    hidden = _decoder_hidden(model, input_ids)
    n_positions = input_ids.shape[1]
    nll = torch.zeros((), dtype=torch.float64)
    for start in range(score_from, n_positions, chunk_tokens):
        stop = min(start + chunk_tokens, n_positions)
        logits = _head_logits(model, hidden[:, start - 1 : stop - 1])
        targets = input_ids[0, start:stop]
        nll += F.cross_entropy(logits[0], targets, reduction="sum").double().cpu()
    return float(nll), n_positions - score_from


@torch.no_grad()
def check_chunked_head(model: PreTrainedModel, input_ids: Tensor, tolerance: float = 0.05) -> None:
    """Fail loudly if body + lm_head differs from the model's own logits (custom heads).

    Architectures that post-process logits in ways `_head_logits` does not know (logit
    scales, extra heads) would otherwise give silently wrong perplexities.
    """
    reference = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
    expected = F.cross_entropy(reference, input_ids[0, 1:], reduction="mean").item()
    nll, count = score_window(model, input_ids, 1, chunk_tokens=max(2, input_ids.shape[1] // 2))
    if abs(nll / count - expected) > tolerance:
        raise PiLoraError(
            f"chunked scoring gives mean NLL {nll / count:.4f}, the model's own logits "
            f"{expected:.4f}: this architecture post-processes logits in a way pi-lora's "
            "perplexity scorer does not know",
            field="model", fix="evaluate a supported family (see docs/eval.md) or use --no-ppl",
        )


@dataclass
class PerplexityResult:
    """Token accounting for one length: ppl = exp(nll_sum / tokens)."""

    spec: WindowSpec
    nll_sum: float = 0.0
    tokens: int = 0
    windows: int = 0
    documents_used: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.tokens) if self.tokens else float("nan")


def measure_perplexity(
    model: PreTrainedModel,
    documents: Sequence[Tensor],
    spec: WindowSpec,
    chunk_tokens: int = 1024,
    on_window: Callable[[int], None] | None = None,
) -> PerplexityResult:
    """Perplexity of tokenized documents (1-D id tensors) at context `spec.length`."""
    lengths = [int(d.numel()) for d in documents]
    windows = plan_windows(lengths, spec)
    if not windows:
        raise ValueError(
            f"no document has {spec.length} tokens (longest: {max(lengths, default=0)}); "
            "add longer documents or drop this length"
        )
    device = next(model.parameters()).device
    result = PerplexityResult(spec)
    for window in windows:
        ids = documents[window.doc][window.begin : window.end].unsqueeze(0).to(device)
        nll, count = score_window(model, ids, window.score_from - window.begin, chunk_tokens)
        result.nll_sum += nll
        result.tokens += count
        result.windows += 1
        if window.doc not in result.documents_used:
            result.documents_used.append(window.doc)
        if on_window is not None:
            on_window(window.end - window.begin)
    return result
