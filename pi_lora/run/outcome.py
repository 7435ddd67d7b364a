"""How a run that did not succeed says so: run.json status "failed" with the step and the
reason, and a full disk reported as one user error instead of a library's traceback.

Shared by train (which records the failure) and merge (which also writes big files).
"""

from __future__ import annotations

import contextlib
import errno
import sys
from pathlib import Path

from pi_lora.core.errors import PiLoraError
from pi_lora.run.directory import RunDir, RunFacts

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# how torch's and safetensors' writers report a failed write (they drop the errno)
WRITE_FAILURES = ("No space left", "File too large", "FileTooLarge", "StorageFull",
                  "file write failed", "basic_ios::clear", "PytorchStreamWriter failed")


def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC and friends, also when torch or safetensors wrap them in their own errors."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return True
        if any(sign in str(exc) for sign in WRITE_FAILURES):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return False


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def record_failure(run: RunDir, facts: RunFacts, step: int, reason: str) -> None:
    """run.json says failed, at which step and why; best effort (the disk may be full)."""
    with contextlib.suppress(OSError):
        run.write_facts(facts.model_copy(update={"status": "failed", "failure": reason,
                                                 "failed_step": step}))


def disk_full_error(exc: BaseException) -> PiLoraError:
    """The user error for `is_disk_full(exc)`: what failed, and how to carry on."""
    return PiLoraError(f"the disk filled (a write failed): {str(exc).splitlines()[0][:300]}",
                       field="output_dir",
                       fix="free space (or move output_dir / data.cache_dir), then rerun; "
                           "a run with a checkpoint continues with --resume")


def resume_failed(run: RunDir, checkpoint: Path, exc: BaseException) -> PiLoraError:
    """A resume that failed before its first new step. The caller has put run.json back as
    it was (a complete run stays complete and mergeable); this names the checkpoint that could
    not be resumed and offers the one before it."""
    earlier = [p for p in run.checkpoints() if p != checkpoint]
    aside = f"move {checkpoint} aside"
    fix = (f"{aside} to resume from {earlier[-1].name} (`pi-lora train RECIPE --resume`)"
           if earlier else f"{aside} and start again with --overwrite")
    return PiLoraError(f"resuming from {checkpoint.name} failed before its first step "
                       f"({describe_failure(exc)}); the checkpoint may be damaged, and "
                       f"{run.facts_path.name} keeps what it recorded",
                       field="--resume", fix=f"{fix}, or let the run stand as it is")


def say_what_is_kept(run: RunDir, step: int, max_steps: int) -> None:
    """After Ctrl-C: which checkpoint a resume starts from, and what it loses."""
    last = run.latest_checkpoint()
    if last is None:
        print(f"pi-lora: stopped at step {step} of {max_steps} before the first checkpoint "
              "(training.save_steps): a resume starts from step 0", file=sys.stderr, flush=True)
        return
    kept = int(last.name.rsplit("-", 1)[1])
    lost = "" if step <= kept else (f": step {step} is redone on resume" if step == kept + 1
                                    else f": steps {kept + 1}-{step} are redone on resume")
    print(f"pi-lora: stopped at step {step} of {max_steps}; kept {last} (step {kept}){lost}",
          file=sys.stderr, flush=True)
