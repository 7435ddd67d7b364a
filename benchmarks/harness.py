"""Measuring in a fresh worker process: start it, read its one result line, and its own peak.

Shared by the plan's validation (`benchmarks.plan_validation`, run by tests/test_plan.py and
benchmarks/measure_memory.py) and the step benchmark (benchmarks/bench_train_step.py).

A measurement runs in a process of its own so that no earlier peak leaks into it. The peak is
the worker's own high-water mark: on CPU VmHWM of /proc/self/status, which a write of "5" to
/proc/self/clear_refs resets (Linux); on CUDA `torch.cuda.max_memory_allocated`. Not
`getrusage`: RUSAGE_CHILDREN in the parent is the largest of all its children, and the
worker's own ru_maxrss keeps the peak of the process image exec replaced, i.e. of the
(v)forked parent (pytest after loading models would report its own peak as the worker's).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]  # the checkout: workers import benchmarks.* from it

RESULT_PREFIX = "RESULT "

# Random Llama shapes for measurements: big vocabularies so logits matter at short lengths.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384},
    "mini": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000},
}


# ----------------------------------------------------------------------------- parent side


@dataclass
class WorkerOutput:
    """What a finished worker left: its exit status, its last result line (parsed), stderr."""

    returncode: int
    result: dict[str, Any] | None
    stderr: str

    @property
    def killed(self) -> bool:
        """Killed by a signal (most likely the OOM killer) before it could report."""
        return self.returncode < 0 or self.returncode == 137

    def failure(self, what: str) -> RuntimeError:
        tail = "\n".join(self.stderr.splitlines()[-20:])
        return RuntimeError(f"worker {what} failed (rc {self.returncode}):\n{tail}")


def worker_env(threads: int = 1, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment, offline, with `threads` OpenMP threads (+ `extra`); the
    checkout on PYTHONPATH, so a worker started as a script path imports `benchmarks.*`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **(extra or {})}


def start_worker(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`python ARGS` (a script path or `-m module`, then its options) in a new process."""
    pipe = subprocess.PIPE
    return subprocess.Popen([sys.executable, *args], env=env, stdout=pipe, stderr=pipe, text=True)


def finish_worker(process: subprocess.Popen, timeout_s: float | None = None) -> WorkerOutput:
    """Wait for the worker (killed on timeout, which is re-raised) and parse its result."""
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX):]) if lines else None
    return WorkerOutput(process.returncode, result, stderr)


def run_worker(args: list[str], env: dict[str, str], timeout_s: float | None = None) -> WorkerOutput:
    return finish_worker(start_worker(args, env), timeout_s)


# ----------------------------------------------------------------------------- worker side


def print_result(record: dict[str, Any]) -> None:
    """The worker's answer: one line on stdout, the last one of its kind wins."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def reset_peak(device: str) -> bool:
    """Start a new high-water mark; False where the platform cannot (the peak then spans all)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_bytes(device: str) -> int:
    """This process's peak: allocated bytes on CUDA, resident bytes (VmHWM) on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def current_bytes(device: str) -> int:
    """This process's bytes now: allocated on CUDA, resident (VmRSS) on CPU."""
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated()
    return _status_kib("VmRSS") * 1024


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status; Linux only, on purpose (see the module docstring)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: CPU memory is measured on Linux only")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str) -> str:
    """A dtype name of pi_lora.recipe.dtypes; "auto" becomes its choice for this machine's device."""
    if name != "auto":
        return name
    import torch

    from pi_lora.recipe.dtypes import auto_dtype, dtype_name

    return dtype_name(auto_dtype(torch.device(default_device())))


def llama_config(shape: str, **overrides: Any) -> Any:
    """A LlamaConfig of a SHAPES entry (random weights are made from it, never downloaded)."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**SHAPES[shape], **overrides})
