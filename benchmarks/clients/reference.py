"""The reference every client is compared with: pi-lora's own reload of a release
(`pi_lora.model.loading.load_model`, transformers 5 in this environment, fp32) and, beside it,
the same model with the rope scaling removed, which is what a client that drops the scaling
computes: each tolerance is shown next to the error it has to catch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.clients.releases import Prompt

TAIL = 8  # last positions whose whole logit rows transformers is compared on


def reference(release: Path, text: str, prompts: tuple[Prompt, ...], out: Path) -> list[dict[str, Any]]:
    """Next-token log-probabilities over `text`, the last logits and the greedy continuation of
    pi-lora's reload of `release`, one dict per prompt."""
    from pi_lora.model.loading import load_model, load_tokenizer
    from pi_lora.recipe.loading import ModelSection

    section = ModelSection(name=str(release), dtype="fp32")
    tokenizer = load_tokenizer(section)
    model = load_model(section, None).eval()
    unscaled = _without_scaling(release) if any(p.control for p in prompts) else None
    return [_reference_prompt(model, unscaled, tokenizer, release, text, prompt, out)
            for prompt in prompts]


def _reference_prompt(model: Any, unscaled: Any, tokenizer: Any, release: Path, text: str,
                      prompt: Prompt, out: Path) -> dict[str, Any]:
    import numpy as np

    # lm-eval's rolling log-likelihood puts this token before the text: the same layout here
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = tokenizer(text, add_special_tokens=False).input_ids[: prompt.tokens - 1]
    assert len(body) == prompt.tokens - 1, f"the text has only {len(body)} tokens"
    prompt_text = tokenizer.decode(body)
    assert tokenizer(prompt_text, add_special_tokens=False).input_ids == body, "decode round trip"
    ids = [prefix, *body]
    logprobs, logits, greedy = score_and_continue(model, ids, prompt.new_tokens,
                                                  _stop_ids(model, tokenizer))
    tail = out / f"{release.name}-{prompt.tokens}-tail-logits.npy"
    np.save(tail, logits[-TAIL:].numpy())
    found = {"prompt": prompt.tokens, "prompt_ids": ids, "prompt_text": prompt_text,
             "token_logprobs": logprobs, "tail_logits": str(tail), "greedy": greedy}
    if prompt.control:
        dropped, _, _ = score_and_continue(unscaled, ids, 0)
        found["unscaled_max_abs_logprob_diff"] = float(np.abs(np.subtract(dropped, logprobs)).max())
        found["unscaled_nll_diff"] = float(abs(np.mean(dropped) - np.mean(logprobs)))
    return found


def _stop_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    """The tokens greedy decoding ends on in generate() and vLLM: the tokenizer's eos and the
    generation config's (a random model may well emit one)."""
    configured = model.generation_config.eos_token_id
    configured = configured if isinstance(configured, list) else [configured]
    return tuple(sorted({t for t in (tokenizer.eos_token_id, *configured) if t is not None}))


def score_and_continue(model: Any, ids: list[int], new_tokens: int,
                       stop: tuple[int, ...] = ()) -> tuple[list[float], Any, list[int]]:
    """(log p(ids[i+1] | ids[:i+1]) for every i, the [T, V] logits, greedy continuation up to
    `new_tokens` or a `stop` token, included) from one prefill: at 8k tokens a second prefill
    for generate() would double the cost."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].float()
        targets = torch.tensor(ids[1:])[:, None]
        logprobs = (logits[:-1].gather(1, targets)[:, 0] - torch.logsumexp(logits[:-1], -1)).tolist()
        greedy, past, token = [], out.past_key_values, int(logits[-1].argmax())
        for _ in range(new_tokens):
            greedy.append(token)
            if token in stop:
                break
            step = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = step.past_key_values, int(step.logits[0, -1].argmax())
    return logprobs, logits, greedy


def _without_scaling(release: Path) -> Any:
    """The release as a client that drops the rope scaling would run it (its own rope_theta)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(release))
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return AutoModelForCausalLM.from_pretrained(str(release), config=config,
                                                dtype=torch.float32).eval()
