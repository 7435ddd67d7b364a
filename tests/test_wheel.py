"""An installed wheel (not an editable checkout) has everything pi-lora reads at run time:
the shipped DeepSpeed configs, the recipes (the demo's included) and the demo's base model."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, site dir it is installed into with --target)."""
    root = tmp_path_factory.mktemp("wheel")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(root / "dist"), str(REPO), cwd=root)
    (wheel,) = (root / "dist").glob("pi_lora-*.whl")
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
         str(root / "site"), str(wheel), cwd=root)
    return wheel, root / "site"


def test_wheel_carries_configs_recipes_and_demo(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_recipes = {f"pi_lora/{p.relative_to(REPO / 'pi_lora')}"
                       for p in (REPO / "pi_lora" / "recipes").rglob("*.yaml")}
    assert shipped_recipes and shipped_recipes <= names, sorted(shipped_recipes - names)
    for needed in ("pi_lora/deepspeed_configs/zero3.json", "pi_lora/deepspeed_configs/zero2.json",
                   "pi_lora/demo/base/model.safetensors", "pi_lora/demo/data/plays.jsonl.gz"):
        assert needed in names
    # the product and the demo only: no measurement harness, no evidence runs, no benchmarks
    modules = sorted(n for n in names if n.endswith(".py"))
    sources = {f"pi_lora/{p.relative_to(REPO / 'pi_lora')}" for p in (REPO / "pi_lora").rglob("*.py")}
    assert set(modules) == sources, sorted(set(modules) ^ sources)
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/"))]
    for absent in ("harness", "validation", "smollm2", "longrope.py"):
        assert not [n for n in modules if n.startswith(("pi_lora/plan/", "pi_lora/demo/"))
                    and absent in n], absent


def test_installed_wheel_resolves_shipped_files_outside_the_checkout(
        installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    location = _run(sys.executable, "-c", "import pi_lora; print(pi_lora.__file__)",
                    cwd=tmp_path, env=env)
    assert location.strip().startswith(str(site)), location  # not the editable checkout
    out = _run(sys.executable, "-m", "pi_lora.cli", "validate",
               str(site / "pi_lora" / "recipes" / "llama2-13b-16k.yaml"),
               "--set", "training.deepspeed=zero3", cwd=tmp_path, env=env)
    assert f"deepspeed config: {site / 'pi_lora' / 'deepspeed_configs' / 'zero3.json'}" in out
    _run(sys.executable, "-c", "from pi_lora.demo.run import RECIPES; "
         "assert (RECIPES / 'linear.yaml').is_file(), RECIPES", cwd=tmp_path, env=env)


def test_installed_wheel_runs_shipped_recipes_by_name(installed: tuple[Path, Path],
                                                      tmp_path: Path) -> None:
    """`pip install pi-lora` then a recipe's name: listed, validated, copied and extended."""
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    cli = (sys.executable, "-m", "pi_lora.cli")
    assert "llama2-13b-16k" in _run(*cli, "recipes", cwd=tmp_path, env=env)
    proc = subprocess.run([*cli, "validate", "llama2-13b-16k"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    shipped = site / "pi_lora" / "recipes" / "llama2-13b-16k.yaml"
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"using the shipped recipe llama2-13b-16k ({shipped})" in proc.stderr
    _run(*cli, "recipes", "cp", "llama2-13b-16k", ".", cwd=tmp_path, env=env)
    out = _run(*cli, "validate", "llama2-13b-16k.yaml", cwd=tmp_path, env=env)  # extends the
    assert "factor: 4 (4096 -> 16384)" in out  # shipped base/llama2.yaml
