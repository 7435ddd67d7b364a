"""Greedy answers to several questions after one context, reading the context once.

The context is the expensive part (a 16k-token prefill); its questions are a few dozen tokens.
So the context runs once through the decoder body (no logits over it), its KV cache is
repeated once per question, and the questions run as one batch: left-padded inside the
question segment (masked; position ids continue from the context), then decoded together. A
row leaves the batch when it emits an end token, spends its budget, or `finished` says its
answer can no longer change its score; the others go on with the rows dropped from the cache.
Greedy decoding, so each answer equals `model.generate` on context + question (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel

# (question index, ids generated so far) -> True when decoding it further changes nothing
Finished = Callable[[int, list[int]], bool]


def end_token_ids(model: PreTrainedModel, tokenizer: object) -> set[int]:
    """Token ids that end an answer: the generation config's eos (one or a list) and the
    tokenizer's."""
    found: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None),
                  getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            found.add(value)
        elif value:
            found.update(int(v) for v in value)
    return found


@torch.no_grad()
def answer_questions(
    model: PreTrainedModel,
    context_ids: Sequence[int],
    questions: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    end_ids: set[int],
    finished: Finished | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """The greedy continuation of context + each question (ids, end token not included)."""
    device = next(model.parameters()).device
    context = torch.tensor([list(context_ids)], device=device)  # [1, C]
    cache = model.get_decoder()(input_ids=context, use_cache=True).cache
    rows, width, start = len(questions), max(len(q) for q in questions), context.shape[1]
    cache.batch_repeat_interleave(rows)
    pads = [width - len(q) for q in questions]
    ids = torch.tensor([[pad_id] * p + list(q) for p, q in zip(pads, questions, strict=True)],
                       device=device)  # [Q, W]
    mask = torch.tensor([[1] * start + [0] * p + [1] * len(q) for p, q in
                         zip(pads, questions, strict=True)], device=device)  # [Q, C + W]
    positions = torch.tensor([[start] * p + list(range(start, start + len(q))) for p, q in
                              zip(pads, questions, strict=True)], device=device)  # [Q, W]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                   use_cache=True).logits[:, -1]  # [Q, V]
    answers: list[list[int]] = [[] for _ in questions]
    active = list(range(rows))
    last = positions[:, -1]
    while True:
        tokens = logits.argmax(-1)  # [A]
        keep = [i for i, row in enumerate(active)
                if _extend(answers[row], int(tokens[i]), max_new_tokens[row], end_ids,
                           finished and (lambda ids, r=row: finished(r, ids)))]
        if not keep:
            return answers
        if len(keep) < len(active):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, last, tokens = mask[index], last[index], tokens[index]
            active = [active[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        last = last + 1
        logits = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last[:, None],
                       cache=cache, use_cache=True).logits[:, -1]


def _extend(answer: list[int], token: int, budget: int, end_ids: set[int],
            finished: Callable[[list[int]], bool] | None) -> bool:
    """Append `token` to the answer; True while the row should go on decoding."""
    if token in end_ids:
        return False
    answer.append(token)
    return len(answer) < budget and not (finished is not None and finished(answer))
