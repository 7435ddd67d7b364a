"""Issue #37 item 9, tracking: loss.png in the run directory (end of training and Ctrl-C),
`training.report_to` checked by validate and said once by train, and a hub out of reach
failing at once instead of after huggingface_hub's five retries."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError
from pi_lora.recipe.loading import load_recipe
from pi_lora.run.directory import RunDir
from pi_lora.run.loss_curve import LOSS_PLOT_FILE, draw_loss_curve, read_losses

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- loss.png


def test_a_finished_run_has_its_loss_curve(finished_run: Path) -> None:
    """The session's tiny run (2 steps, a loss logged at each) drew loss.png at the end."""
    plot = finished_run / LOSS_PLOT_FILE
    assert plot.read_bytes()[:8] == PNG_SIGNATURE
    logged = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert read_losses(finished_run / "metrics.jsonl")["loss"] == \
        [(r["step"], r["loss"]) for r in logged if "loss" in r]
    assert [step for step, _ in read_losses(finished_run / "metrics.jsonl")["loss"]] == [1, 2]


def test_the_curve_skips_cut_and_non_finite_lines_and_waits_for_a_loss(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert draw_loss_curve(run) is None  # no metrics yet: nothing drawn
    run.append_metrics({"step": 1, "eval_loss": 3.0})
    assert draw_loss_curve(run) is None and not (tmp_path / LOSS_PLOT_FILE).exists()
    run.append_metrics({"step": 2, "loss": 2.5})
    run.append_metrics({"step": 3, "loss": float("nan")})
    with run.metrics_path.open("a") as f:
        f.write('{"step": 4, "lo')  # a kill mid-line
    assert read_losses(run.metrics_path) == {"loss": [(2, 2.5)], "eval_loss": [(1, 3.0)]}
    assert draw_loss_curve(run) == tmp_path / LOSS_PLOT_FILE
    assert (tmp_path / LOSS_PLOT_FILE).read_bytes()[:8] == PNG_SIGNATURE


def test_ctrl_c_draws_the_curve_so_far(tiny_models: Any, write_recipe: Any, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """pi-lora train stopped by Ctrl-C: loss.png from the steps logged before the stop."""
    import pi_lora.train.assembly

    recipe_path = write_recipe(tiny_models())
    run = RunDir(load_recipe(recipe_path).output_dir)

    def interrupted(recipe: Any, **kwargs: Any) -> Path:
        run.path.mkdir(parents=True)
        for step in (1, 2, 3):
            run.append_metrics({"step": step, "loss": 4.0 - step / 2})
        raise KeyboardInterrupt

    monkeypatch.setattr(pi_lora.train.assembly, "train", interrupted)
    assert main(["train", str(recipe_path)]) == 130
    assert (run.path / LOSS_PLOT_FILE).read_bytes()[:8] == PNG_SIGNATURE


# --------------------------------------------------------------------------- report_to


def _hide(monkeypatch: pytest.MonkeyPatch, *hidden: str) -> None:
    """importlib.util.find_spec as on a machine without these packages."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name in hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def _validate(recipe: Path, report_to: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", str(recipe), "--set", f"training.report_to={report_to}"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_validate_refuses_a_tracker_that_is_not_installed(
        tiny_models: Any, write_recipe: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _hide(monkeypatch, "wandb")
    code, out = _validate(write_recipe(tiny_models()), "wandb", capsys)
    assert code == 2
    assert "training.report_to: wandb is not installed" in out
    assert "fix: pip install wandb, or report_to: none" in out


def test_validate_says_what_report_to_auto_picks(tiny_models: Any, write_recipe: Any,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    recipe = write_recipe(tiny_models())
    run = tmp_path / "run"
    if importlib.util.find_spec("tensorboard") is not None:
        code, out = _validate(recipe, "auto", capsys)
        assert code == 0
        assert f"tracking: TensorBoard events in {run / 'tensorboard'} (report_to auto: " \
               "TensorBoard is installed)" in out
    _hide(monkeypatch, "tensorboard")
    code, out = _validate(recipe, "auto", capsys)
    assert code == 0
    assert "tracking: no tracker: report_to auto found none installed (pip install " \
           f"tensorboard); losses in {run / 'metrics.jsonl'} and {run / LOSS_PLOT_FILE}" in out


def test_train_says_once_where_the_curves_go(tiny_models: Any, write_recipe: Any, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora.train.arguments import tensorboard_callback

    recipe = load_recipe(write_recipe(tiny_models()))  # report_to: none
    run = RunDir(tmp_path / "run")
    assert tensorboard_callback(recipe, run, is_main=False) is None
    assert capsys.readouterr().out == ""
    assert tensorboard_callback(recipe, run, is_main=True) is None
    assert capsys.readouterr().out == (f"pi-lora: no tracker: report_to: none; losses in "
                                       f"{run.path / 'metrics.jsonl'} and {run.path / LOSS_PLOT_FILE}\n")


# --------------------------------------------------------------------------- hub out of reach


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A machine whose name lookups fail, outside offline mode; the probe's memo cleared."""
    from pi_lora.model.loading import hub_unreachable

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    hub_unreachable.cache_clear()
    yield hub_unreachable
    hub_unreachable.cache_clear()


def test_an_unreachable_hub_fails_at_once_naming_the_lookup(
        no_network: Any, caplog: pytest.LogCaptureFixture) -> None:
    from pi_lora.model.loading import load_config
    from pi_lora.recipe.loading import ModelSection

    started = time.time()
    with pytest.raises(PiLoraError) as caught:
        load_config(ModelSection(name="someorg/nonexistent"))
    assert time.time() - started < 10  # huggingface_hub's own retries wait 1+2+4+8+8 s
    assert caught.value.field == "model.name"
    assert caught.value.message == ("cannot load 'someorg/nonexistent': the hub cannot be reached "
                                    "(huggingface.co: Name or service not known) and it is not "
                                    "in the local cache")
    assert "hf download someorg/nonexistent --local-dir DIR" in caught.value.fix
    assert "Retrying" not in caplog.text


def test_the_probe_reads_the_cache_only_and_trusts_a_proxy(
        no_network: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pi_lora.model.loading import _common_kwargs, resolve_source
    from pi_lora.recipe.loading import ModelSection

    model = ModelSection(name="someorg/nonexistent")
    assert _common_kwargs(model, resolve_source(model))["local_files_only"] is True
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    no_network.cache_clear()
    assert no_network() is None  # only a real request through the proxy can tell
