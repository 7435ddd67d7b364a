"""`pi-lora push RELEASE REPO_ID`: a complete release uploaded to the Hugging Face Hub as one
commit, model card (README.md) and certificate.json included.

The file list is made here once and is what both `--dry-run` prints and the commit carries,
so a dry run shows exactly what would be uploaded. A dry run needs no network and no token.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from pi_lora.core.errors import PiLoraError
from pi_lora.release.files import MERGE_REPORT_FILE, PROVENANCE_FILE, open_release

CARD_FILE = "README.md"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# what `pi-lora merge` writes into every release besides the weights and the recipe copy
REQUIRED_FILES = (CONFIG_FILE, CARD_FILE, MERGE_REPORT_FILE, PROVENANCE_FILE, "tokenizer_config.json")
FIX_INCOMPLETE = "merge again (`pi-lora merge RUN --overwrite`) and push the directory it writes"
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading of a boolean variable


@dataclass(frozen=True)
class PushPlan:
    """What one push uploads: each file (relative path, bytes), where, and how."""

    release: Path
    repo_id: str
    revision: str
    private: bool
    files: tuple[tuple[str, int], ...]

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def plan_push(release_dir: str | Path, repo_id: str, *, revision: str | None = None,
              private: bool = False) -> PushPlan:
    """The release checked complete and its files listed; user errors name the path and fix."""
    release = open_release(release_dir).path
    check_complete(release)
    check_repo_id(repo_id)
    return PushPlan(release, repo_id, revision or "main", private, tuple(release_files(release)))


def check_complete(release: Path) -> None:
    """Every file merge writes is there, and every weight shard the index names."""
    missing = [name for name in REQUIRED_FILES if not (release / name).is_file()]
    index = release / WEIGHTS_INDEX
    if index.is_file():
        missing += sorted(shard for shard in _indexed_shards(index) if not (release / shard).is_file())
    elif not (release / WEIGHTS_FILE).is_file():
        missing.append(f"{WEIGHTS_FILE} (or {WEIGHTS_INDEX} and its shards)")
    if missing:
        raise PiLoraError(f"{release} is not a complete release: missing {', '.join(missing)}",
                          field="RELEASE", fix=FIX_INCOMPLETE)


def _indexed_shards(index: Path) -> set[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(shard) for shard in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise PiLoraError(f"{index} is not a safetensors index", field="RELEASE",
                          fix=FIX_INCOMPLETE) from None


def check_repo_id(repo_id: str) -> None:
    """`owner/name` or `name`, as the hub spells them (its own validator, no network)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PiLoraError(f"{repo_id!r} is not a hub repository id ({str(exc).splitlines()[0]})",
                          field="REPO_ID", fix="give it as OWNER/NAME, e.g. my-org/llama2-7b-32k") from None


def release_files(release: Path) -> list[tuple[str, int]]:
    """Every file under the release (relative POSIX path, bytes), hidden ones left out (a
    hub cache, an editor's swap file)."""
    found = []
    for path in sorted(release.rglob("*")):
        relative = path.relative_to(release)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        found.append((relative.as_posix(), path.stat().st_size))
    return found


def describe(plan: PushPlan, *, dry_run: bool) -> str:
    """The file table and the destination; what `--dry-run` prints and a push prints first."""
    width = max(len(name) for name, _ in plan.files)
    lines = [f"  {name:<{width}}  {format_bytes(size):>10}" for name, size in plan.files]
    visibility = f"a new repository is {'private' if plan.private else 'public'}"
    head = "would upload" if dry_run else "uploading"
    return "\n".join([
        f"pi-lora: {head} {len(plan.files)} files from {plan.release} to "
        f"https://huggingface.co/{plan.repo_id} (revision {plan.revision}; {visibility}):",
        *lines, f"  total {format_bytes(plan.total_bytes)} ({plan.total_bytes:,} bytes)"])


def format_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as this process was started with it (huggingface_hub reads it once,
    at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE


def check_can_upload() -> str:
    """The token a push uses; offline mode or no login is a user error, before any request."""
    if hub_offline():
        raise PiLoraError("offline mode is on (HF_HUB_OFFLINE is set): nothing can be uploaded",
                          field="HF_HUB_OFFLINE", fix="unset HF_HUB_OFFLINE to push, or pass "
                          "--dry-run to list what would be uploaded")
    from huggingface_hub import get_token

    token = get_token()
    if token is None:
        raise PiLoraError("no Hugging Face token found: pushing needs one with write access",
                          field="REPO_ID", fix="run `hf auth login`, or set HF_TOKEN")
    return token


def push_release(plan: PushPlan, token: str) -> str:
    """Create the repository (and branch) when missing, then one commit of the plan's files;
    returns the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.revision != "main":
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(plan.release / name))
                      for name, _ in plan.files]
        commit = api.create_commit(plan.repo_id, operations, revision=plan.revision,
                                   commit_message=f"pi-lora push {plan.release.name}")
    except HfHubHTTPError as exc:  # an HTTP answer: 401, 403, 404 ...
        raise PiLoraError(f"the hub refused the push: {_first_line(exc)}", field="REPO_ID",
                          fix=f"check the token can write to {plan.repo_id} (`hf auth whoami`) "
                              "and the repository id") from None
    except Exception as exc:
        if not type(exc).__module__.startswith(("httpx", "huggingface_hub")):
            raise
        raise PiLoraError(f"could not reach the hub: {type(exc).__name__}: {_first_line(exc)}",
                          field="REPO_ID", fix="check the network (HF_ENDPOINT, proxies) and "
                          "push again; a commit is all or nothing") from None
    return str(commit.commit_url)


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [""])[0][:300]
