"""What made a run or a release, so a team can audit and repeat it.

Recorded: pi-lora's version (and git commit when run from a checkout), the versions of the
libraries that shape the numbers, the exact command, the base model by hub revision or by the
content hash of its weights, and the training data by content hash. run.json carries the
training side; a release adds the merge side in `pi_lora_provenance.json`.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pi_lora import __version__
from pi_lora.core.digest import combined_sha256, files_sha256
from pi_lora.recipe.loading import DataSection, ModelSection

# the libraries whose versions change what a run computes
PACKAGES = ("torch", "transformers", "peft", "accelerate", "datasets", "deepspeed",
            "bitsandbytes", "trl", "tokenizers", "safetensors")
COMMAND_ENV = "PI_LORA_COMMAND"  # the user's command, handed to launched processes
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class Software:
    """The code that ran: pi-lora (+ checkout), Python, libraries, command line."""

    pi_lora: str
    git_commit: str | None
    git_dirty: bool | None
    python: str
    packages: dict[str, str | None]
    command: list[str]
    time: float


@dataclass
class ModelIdentity:
    """The base model: a hub revision (commit hash), or the content hash of local weights."""

    name: str
    source: str  # hub | local | gguf
    revision: str | None = None
    sha256: str | None = None
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class DataIdentity:
    """The training data: sha256 per file, or a hub dataset's name, split and revision."""

    sha256: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_checkout() -> tuple[str | None, bool | None]:
    """(commit, dirty) when pi-lora runs from a git checkout, else (None, None)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None, None
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=20, check=True).stdout.strip()


_command: list[str] | None = None


def remember_command(argv: list[str]) -> None:
    """The CLI records the user's command; `launch` hands it to the processes it starts."""
    global _command
    _command = ["pi-lora", *argv]


def command_line() -> list[str]:
    """The user's command: from the launching process, else this one's CLI, else argv."""
    handed = os.environ.get(COMMAND_ENV)
    if handed:
        return list(json.loads(handed))
    return list(_command) if _command else [sys.executable, *sys.argv]


def software() -> Software:
    commit, dirty = source_checkout()
    return Software(__version__, commit, dirty, platform.python_version(), package_versions(),
                    command_line(), time.time())


def model_identity(model: ModelSection, config: Any) -> ModelIdentity:
    """Hub models by the revision transformers resolved; local weights by content."""
    from pi_lora.model.loading import resolve_source

    source = resolve_source(model)
    if not source.is_local:
        return ModelIdentity(model.name, "hub", getattr(config, "_commit_hash", None)
                             or model.revision)
    root = Path(source.path)
    if source.gguf_file:
        files = files_sha256([root / source.gguf_file], root)
        kind = "gguf"
    else:
        weights = [p for p in root.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
        files = files_sha256([*weights, root / "config.json"], root)
        kind = "local"
    return ModelIdentity(str(root / (source.gguf_file or "")).rstrip("/"), kind,
                         sha256=combined_sha256(files), files=files)


def data_identity(data: DataSection) -> DataIdentity:
    if not data.files:
        return DataIdentity(dataset=data.dataset.model_dump() if data.dataset else None)
    from pi_lora.data.build import expand_files

    files = files_sha256(expand_files(data.files))
    return DataIdentity(combined_sha256(files), files)


class IdentityJob:
    """Hashes the base weights and the data in a thread while the run loads and trains.

    At 70B the weights take minutes to read; other ranks must not wait on rank 0 for it
    (their first collective would time out), so the result is collected at the end.
    """

    def __init__(self, model: ModelSection, data: DataSection, config: Any) -> None:
        self._result: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(model, data, config),
                                        name="pi-lora-provenance", daemon=True)
        self._thread.start()

    def _run(self, model: ModelSection, data: DataSection, config: Any) -> None:
        try:
            self._result["model"] = asdict(model_identity(model, config))
            self._result["data"] = asdict(data_identity(data))
        except Exception as exc:  # a vanished file must not fail a finished run
            self._result["error"] = f"{type(exc).__name__}: {exc}"

    def result(self) -> dict[str, Any]:
        self._thread.join()
        return dict(self._result)
