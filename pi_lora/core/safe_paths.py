"""Deleting a directory only when pi-lora made it: the one gate every `--overwrite` goes through.

`--overwrite` once removed whatever `output_dir` named: `output_dir: .` emptied the working
directory, and `merge RUN --output RUN --overwrite` wiped the run. A directory may now be
replaced only when (a) it carries pi-lora's own marker (the caller says which: a run's, a
release's) and (b) it is not the working directory, $HOME, or an ancestor of either, nor equal
to or an ancestor of a path the caller protects (the recipe, the run being merged, the base
model, the data). An empty directory is reused as it is. Everything else is a refusal.

The other half: a file pi-lora publishes (a GGUF, a model card) is written beside its name and
renamed into place (`staged_file`), so a failure or a kill never leaves half of one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from pi_lora.core.errors import PiLoraError


def canonical(path: str | Path) -> Path:
    """The one spelling of a path that every lock and output check compares: `~` expanded,
    symbolic links and `..` resolved. Two names of one directory (`runs/latest -> runs/x`,
    `a/../x`) then share one lock file; a bind mount needs nothing more, since the lock lies
    in the directory's parent, which is the same directory through either mount point."""
    return Path(path).expanduser().resolve()


def _is_within(inner: Path, outer: Path) -> bool:
    """inner == outer or inner lies below outer (both already resolved)."""
    return inner == outer or outer in inner.parents


def _always_protected() -> list[tuple[Path, str]]:
    protected = [(Path.cwd().resolve(), "the working directory")]
    home = os.environ.get("HOME")
    if home:
        protected.append((Path(home).resolve(), "$HOME"))
    return protected


def check_replaceable(path: str | Path, *, owned: Callable[[Path], bool], what: str,
                      protect: Iterable[str | Path] = (), field: str = "output_dir") -> bool:
    """Raise PiLoraError unless `path` may be deleted and written anew; no side effects.

    Returns False when there is nothing to delete (missing or empty directory), True when the
    directory exists, is pi-lora's (`owned(path)`, e.g. RunDir.is_run or release.is_release)
    and touches nothing protected. `what` names the kind for messages ("run directory").
    """
    path = Path(path)
    if path.is_symlink():
        raise PiLoraError(f"{path} is a symbolic link; pi-lora does not delete through links",
                          field=field, fix="name the real directory, or a new one")
    if not path.exists():
        return False
    if not path.is_dir():
        raise PiLoraError(f"{path} is a file, not a {what}", field=field,
                          fix="choose a new output path")
    target = path.resolve()
    named = [(Path(p).resolve(), f"{p}") for p in protect]
    for guarded, label in [*_always_protected(), *named]:
        if _is_within(guarded, target):
            raise PiLoraError(
                f"refusing to replace {path}: it is or contains {label}", field=field,
                fix="choose an output directory of its own (e.g. runs/NAME)")
    if not any(path.iterdir()):
        return False
    if not owned(path):
        raise PiLoraError(
            f"refusing to replace {path}: it is not a {what} written by pi-lora", field=field,
            fix="choose a new output path, or move that directory away yourself")
    return True


def remove_owned_dir(path: str | Path, *, owned: Callable[[Path], bool], what: str,
                     protect: Iterable[str | Path] = (), field: str = "output_dir") -> None:
    """Delete `path` after `check_replaceable` allowed it; an empty directory is kept as is."""
    if check_replaceable(path, owned=owned, what=what, protect=protect, field=field):
        shutil.rmtree(path)


def process_umask() -> int:
    """This process's umask, read without changing it (Linux /proc); 0o022 where unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def follow_umask(root: Path) -> None:
    """Give every file under `root` the mode a plain open() would: safetensors writes its
    files 0600 (through a private temporary file), so a serving container or a teammate could
    not read a release or an adapter whose other files are world-readable."""
    mode = 0o666 & ~process_umask()
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(mode)


@contextlib.contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """A temporary path beside `out` (same file system, so os.replace is atomic), removed on
    exit unless the caller renamed it onto `out`."""
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)
