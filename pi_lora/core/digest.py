"""Content hashes of files (sha256), remembered by file identity so big files are read once.

A run names its base weights and training data by content, not by size and mtime, so a team
can tell whether two runs saw the same bytes. Hashing 140 GB of 70B weights takes minutes;
the digest is cached under the cache root keyed by (path, size, mtime_ns, ctime_ns, inode),
as git's index does, so a second run on the same files costs a stat per file. The change time
is what `cp -p` and `rsync -t` cannot restore: a file rewritten at the same size with its
mtime put back is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

CHUNK_BYTES = 16 << 20


def cache_root() -> Path:
    """pi-lora's cache directory (`PI_LORA_CACHE`, default ~/.cache/pi-lora)."""
    return Path(os.environ.get("PI_LORA_CACHE") or Path.home() / ".cache" / "pi-lora")


def file_sha256(path: Path, cache_dir: Path | None = None) -> str:
    """Hex sha256 of the file's bytes; reuses a cached digest while the file is unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    identity = json.dumps([str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns,
                           stat.st_ino])
    entry = (cache_dir or cache_root() / "digests") / (
        hashlib.sha256(identity.encode()).hexdigest()[:32] + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError):
        cached = json.loads(entry.read_text())
        if cached["identity"] == identity:
            return str(cached["sha256"])
    digest = _hash_bytes(path)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run a re-read
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"identity": identity, "sha256": digest}))
        os.replace(tmp, entry)
    return digest


def _hash_bytes(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha.update(chunk)
    return sha.hexdigest()


def files_sha256(paths: list[Path], root: Path | None = None) -> dict[str, str]:
    """{name: sha256} for several files; names relative to `root` when given."""
    return {str(p.relative_to(root) if root else p): file_sha256(p) for p in sorted(paths)}


def combined_sha256(digests: dict[str, str]) -> str:
    """One digest for a set of files: sha256 over sorted `name sha256` lines."""
    lines = "".join(f"{name} {digest}\n" for name, digest in sorted(digests.items()))
    return hashlib.sha256(lines.encode()).hexdigest()
