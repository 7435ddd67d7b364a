"""One process per run directory: an exclusive lock beside it, naming its holder.

Two `pi-lora train` into one output_dir (or a `--resume` into a run still training) would
interleave checkpoints and metrics. The lock is `fcntl.flock` on `.<run name>.lock` next to
the run directory (beside, not inside: the run directory is created only after the model and
data load, and the second process must be refused before it spends minutes loading them).
The kernel drops a flock when its holder dies, even by kill -9, so a dead run never blocks a
resume; the pid, host and start time written into the file name the holder in the refusal.

Across machines: on Linux, flock on NFS is carried to the server as a whole-file fcntl lock,
so it holds between hosts; some shared filesystems keep locks per machine (Lustre mounted
`localflock`, FUSE mounts) or have none. For those the file is also a lease: the holder
rewrites its record every BEAT_SECONDS, and a record from another host that beat within
LEASE_SECONDS refuses the run even where the kernel granted the lock. A machine that died
frees the directory LEASE_SECONDS after its last beat.

Under a launcher only one process holds it: `pi-lora train --nproc N` holds it in the parent
across the children (`hold(..., for_children=True)` exports it in PI_LORA_RUN_LOCK and the
children's main rank inherits it); under a bare torchrun the global main rank takes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pi_lora.core.errors import PiLoraError
from pi_lora.core.safe_paths import canonical

LOCK_ENV = "PI_LORA_RUN_LOCK"  # {"path": lock file, "pid": holder}: handed to launched ranks
BEAT_SECONDS = 15.0   # how often a holder rewrites its record
LEASE_SECONDS = 60.0  # a record from another host younger than this is a live holder


def lock_path(run_dir: str | Path) -> Path:
    run_dir = canonical(run_dir)  # a symlinked output_dir locks the directory it names
    return run_dir.parent / f".{run_dir.name}.lock"


def _record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _remote_lease(path: Path) -> dict | None:
    """The record of a holder on another host whose last beat is within the lease, if any:
    the one holder a machine-local lock cannot see."""
    record = _record(path)
    beat = record.get("beat", record.get("since"))
    if record.get("host") in (None, socket.gethostname()) or not isinstance(beat, int | float):
        return None
    return record if time.time() - beat < LEASE_SECONDS else None


def _holder_text(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder["since"]))
        text = f"pid {holder['pid']} on {holder['host']} since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
    if "beat" in holder and holder["host"] != socket.gethostname():
        text += f", last heartbeat {time.time() - holder['beat']:.0f} s ago"
    if holder["host"] == socket.gethostname() and not _alive(int(holder["pid"])):
        text += " (exited; a process it forked still holds the lock: stop that one)"
    return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _inherited(path: Path) -> bool:
    """A launched rank whose launching `pi-lora train` holds this very lock."""
    handed = os.environ.get(LOCK_ENV)
    if not handed:
        return False
    try:
        given = json.loads(handed)
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (given.get("path") == str(path) and given.get("pid") == holder.get("pid")
            and holder.get("host") == socket.gethostname())


def holder(run_dir: str | Path) -> str | None:
    """Who holds the run's lock right now ("pid N on HOST since T"), or None if nobody."""
    path = lock_path(run_dir)
    if not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            return _holder_text(path)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    return _holder_text(path) if _remote_lease(path) else None


def held_by_another(run_dir: str | Path) -> bool:
    """Someone else holds the run: not this process (which may hold it while it checks) and
    not the `pi-lora train` that launched it."""
    if holder(run_dir) is None:
        return False
    path = lock_path(run_dir)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return True
    mine = record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
    return not (mine or _inherited(path))


def _in_use(run_dir: str | Path, path: Path, more_fix: str = "") -> PiLoraError:
    return PiLoraError(f"{Path(run_dir)} is in use by {_holder_text(path)}", field="output_dir",
                       fix="wait for that run to finish (or stop it), or train into another "
                           "output_dir" + more_fix)


class RunLock:
    """A held lock; `release()` (or process exit) frees it."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path = path
        self._fd = fd
        self._stop = threading.Event()
        self._beats: threading.Thread | None = None

    @classmethod
    def acquire(cls, run_dir: str | Path) -> RunLock:
        """Take the run's lock or raise PiLoraError naming the process that holds it."""
        path = lock_path(run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                if _inherited(path):
                    return cls(path, None)
                raise _in_use(run_dir, path) from None
            print(f"pi-lora: WARNING: cannot lock {path} ({exc.strerror}: this filesystem has "
                  "no locks); only the heartbeat lease guards this run", flush=True)
        if _remote_lease(path):  # granted here, but a live holder on another machine
            os.close(fd)
            raise _in_use(run_dir, path, f"; this filesystem's locks do not reach across "
                          f"machines: a host that died frees it {LEASE_SECONDS:.0f} s after "
                          "its last heartbeat")
        lock = cls(path, fd)
        lock._start_beats()
        return lock

    def _start_beats(self) -> None:
        """Write the record now and every BEAT_SECONDS until release (the lease)."""
        since = time.time()
        fd = self._fd

        def write() -> None:
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": since,
                      "beat": time.time()}
            data = json.dumps(record).encode()
            os.pwrite(fd, data.ljust(max(len(data), 160)), 0)  # same length: no truncation race

        os.ftruncate(fd, 0)
        write()

        def beat() -> None:
            while not self._stop.wait(BEAT_SECONDS):
                with contextlib.suppress(OSError):  # a full disk keeps the old beat
                    write()

        self._beats = threading.Thread(target=beat, name="pi-lora-lock-beat", daemon=True)
        self._beats.start()

    def export_to_children(self) -> None:
        """Processes this one launches inherit the lock instead of contending for it."""
        os.environ[LOCK_ENV] = json.dumps({"path": str(self.path), "pid": os.getpid()})

    def release(self) -> None:
        if self._fd is None:
            return
        if os.environ.get(LOCK_ENV, "").find(f'"pid": {os.getpid()}') >= 0:
            del os.environ[LOCK_ENV]
        self._stop.set()
        if self._beats is not None:
            self._beats.join()
        with contextlib.suppress(OSError):  # the next holder reads "no live lease" at once
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


@contextlib.contextmanager
def hold(run_dir: str | Path, *, enabled: bool = True,
         for_children: bool = False) -> Iterator[RunLock | None]:
    """`with hold(output_dir):` the run is this process's (and its launched children's)."""
    if not enabled:
        yield None
        return
    lock = RunLock.acquire(run_dir)
    if for_children:
        lock.export_to_children()
    try:
        yield lock
    finally:
        lock.release()
