"""The lock file: exact pins of pi-lora's whole dependency closure, torch excepted, and the
installed environment matches it (what `make install` guarantees)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("lock_tool", REPO / "tools" / "lock.py")
assert spec and spec.loader
lock = importlib.util.module_from_spec(spec)
sys.modules["lock_tool"] = lock
spec.loader.exec_module(lock)

LOCK_FILE = REPO / "requirements-lock.txt"


def test_lock_pins_every_dependency_but_torch() -> None:
    pins = lock.read_lock(LOCK_FILE)
    closure = lock.closure("pi-lora", ("dev",))
    wanted = {name for name in closure if not lock.UNLOCKED.match(name)}
    assert wanted <= set(pins), sorted(wanted - set(pins))
    assert not [n for n in pins if lock.UNLOCKED.match(n)], "torch and CUDA packages stay free"
    for name in ("transformers", "peft", "accelerate", "datasets", "deepspeed", "bitsandbytes",
                 "pytest", "ruff"):
        assert name in pins


def test_the_environment_is_the_locked_one() -> None:
    assert lock.mismatches(lock.read_lock(LOCK_FILE), lock.installed()) == []


def test_mismatch_and_bad_lines_are_reported(tmp_path: Path) -> None:
    assert lock.mismatches({"peft": "0.1"}, {"peft": "0.2"}) == ["peft: installed 0.2, locked 0.1"]
    assert lock.mismatches({"absent": "1"}, {}) == []
    bad = tmp_path / "lock.txt"
    bad.write_text("peft>=0.1\n")
    try:
        lock.read_lock(bad)
    except SystemExit as exc:
        assert "not an exact pin" in str(exc)
    else:
        raise AssertionError("a range in the lock must be refused")
    assert lock.normalize("Foo_Bar.baz") == "foo-bar-baz"
