"""The lock file: exact versions of every dependency CI tested, torch excepted.

`make install` installs through it as pip constraints, so a fresh machine gets what CI
tested; pyproject keeps compatible ranges for people installing pi-lora into their own
environment. torch (and the CUDA packages that come with a GPU build) stay out: an installed
CUDA torch is the user's and is left alone.

    python tools/lock.py freeze --out requirements-lock.txt   # from this interpreter's packages
    python tools/lock.py check requirements-lock.txt          # installed == locked, else exit 1
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path

# never locked: torch and what a CUDA build of it brings; the project itself; pip's own tools
UNLOCKED = re.compile(
    r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*|pi-lora|pip|setuptools|wheel)$")


def normalize(name: str) -> str:
    """PEP 503 name: `Foo_Bar` and `foo-bar` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    """{normalized name: version} of every distribution this interpreter sees."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def closure(root: str, extras: tuple[str, ...]) -> set[str]:
    """Normalized names of `root[extras]` and everything it requires, as installed here.

    Walking the requirements (not `pip freeze`) keeps packages that happen to be installed on
    the machine that makes the lock out of it.
    """
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue  # an optional dependency not installed on this platform
        seen.add(normalize(name))
        for text in requires:
            req = Requirement(text)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            key = (normalize(req.name), tuple(sorted(req.extras)))
            if key[0] not in seen or req.extras:
                todo.append(key)
                seen.add(key[0])
    return seen


def lockable(packages: dict[str, str], needed: set[str]) -> dict[str, str]:
    return {name: version for name, version in packages.items()
            if name in needed and not UNLOCKED.match(name)}


def render(packages: dict[str, str]) -> str:
    torch = installed().get("torch", "not installed")
    header = [
        "# pi-lora's tested dependency set: `make install` uses it as pip constraints.",
        "# Regenerate with `make test-latest` (newest allowed versions, full suite) then `make lock`.",
        f"# made {time.strftime('%Y-%m-%d')} on Python {platform.python_version()} "
        f"({sys.platform}, {platform.machine()}); torch {torch} is not locked.",
    ]
    return "\n".join(header + [f"{n}=={v}" for n, v in sorted(packages.items())]) + "\n"


def read_lock(path: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        if match is None:
            raise SystemExit(f"{path}: not an exact pin: {line!r}")
        pins[normalize(match.group(1))] = match.group(2)
    return pins


def mismatches(pins: dict[str, str], present: dict[str, str]) -> list[str]:
    """Locked packages installed at another version (absent ones are not needed here)."""
    return [f"{name}: installed {present[name]}, locked {version}"
            for name, version in sorted(pins.items())
            if name in present and present[name] != version]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    freeze = sub.add_parser("freeze", help="write the lock from this interpreter's packages")
    freeze.add_argument("--out", type=Path, required=True)
    check = sub.add_parser("check", help="exit 1 when an installed package differs from the lock")
    check.add_argument("lock", type=Path)
    args = parser.parse_args(argv)
    if args.command == "freeze":
        packages = lockable(installed(), closure("pi-lora", ("dev",)))
        args.out.write_text(render(packages))
        print(f"{args.out}: {len(packages)} packages locked")
        return 0
    pins = read_lock(args.lock)
    wrong = mismatches(pins, installed())
    for line in wrong:
        print(f"lock mismatch: {line}", file=sys.stderr)
    if wrong:
        print(f"fix: make install (installs through {args.lock})", file=sys.stderr)
        return 1
    print(f"environment matches {args.lock} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
