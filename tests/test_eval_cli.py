"""`pi-lora eval` over the three target kinds (base + rope override, run, release) in one report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError
from pi_lora.eval.targets import RopeSpec, parse_length


def test_rope_and_length_specs() -> None:
    assert RopeSpec.parse("yarn:16k") == RopeSpec("yarn", 16384)
    assert RopeSpec.parse("none") == RopeSpec("none", None)
    assert parse_length("4096", "x") == 4096
    with pytest.raises(PiLoraError, match="METHOD:LENGTH"):
        RopeSpec.parse("pi:4k")
    with pytest.raises(PiLoraError, match="not a length"):
        parse_length("lots", "--ppl-lengths")


def test_eval_base_run_and_release_in_one_report(tiny_models, write_recipe, corpus: Path,
                                                 tmp_path: Path) -> None:
    model_dir = tiny_models("llama")
    assert main(["train", str(write_recipe(model_dir, training={"max_steps": 2}))]) == 0
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "rel")]) == 0
    out = tmp_path / "report"
    code = main(["eval", str(model_dir), f"mine={tmp_path / 'run'}", str(tmp_path / "rel"),
                 "--rope", "none", "--rope", "linear:256", "--passkey-lengths", "256",
                 "--depths", "0,1", "--trials", "1", "--ppl-lengths", "128,256", "--stride", "64",
                 "--docs", str(corpus), "--max-windows", "2", "--dtype", "fp32", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    labels = [t["label"] for t in report["targets"]]
    assert labels == [f"{model_dir.name} (plain RoPE)", f"{model_dir.name} + linear x2 (untuned)",
                      "mine", "rel [release]"]
    ppl = {t["label"]: t["perplexity"]["by_length"] for t in report["targets"]}
    # the release is the run merged: same numbers up to float rounding
    for length in ("128", "256"):
        assert ppl["mine"][length]["ppl"] == pytest.approx(ppl["rel [release]"][length]["ppl"],
                                                           rel=1e-3)
    assert (out / "report.md").read_text().count("![") >= 2

    # the release's card now carries its own numbers (not the run's or the base's)
    release = report["targets"][3]
    card = (tmp_path / "rel" / "README.md").read_text()
    section = card[card.index("## Evaluation"):card.index("## Serving")]
    for length in ("128", "256"):
        assert f"{release['perplexity']['by_length'][length]['ppl']:.2f}" in section
    k_max = release["passkey"]["k_max"]
    assert f"**k_max {k_max // 1024}k**" in section if k_max else "**k_max 0**" in section
    assert "Command: `pi-lora eval" in section

    # a second eval replaces the section; the user's own lines elsewhere survive; --no-card
    (tmp_path / "rel" / "README.md").write_text(card + "\nMy own note.\n")
    again = ["eval", str(tmp_path / "rel"), "--no-passkey", "--ppl-lengths", "64", "--stride", "32", "--docs",
             str(corpus), "--max-windows", "1", "--dtype", "fp32"]
    assert main([*again, "--out", str(tmp_path / "r2")]) == 0
    card = (tmp_path / "rel" / "README.md").read_text()
    assert card.count("## Evaluation") == 1 and "My own note." in card
    assert "passkey accuracy" not in card and "| tokens | 64 |" in card
    assert main([*again, "--ppl-lengths", "96", "--out", str(tmp_path / "r3"), "--no-card"]) == 0
    assert (tmp_path / "rel" / "README.md").read_text() == card


def test_eval_bad_options_exit_2(tiny_models, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny_models("llama")), "--no-passkey", "--ppl-lengths", "128",
                 "--stride", "512", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "--stride" in err and "options" not in err and not (tmp_path / "r").exists()
    assert main(["eval", str(tmp_path / "nope" / "x" / "y")]) == 2
    # a passkey length the tokenizer cannot fill: exit 2 naming the flag, no report directory
    out = tmp_path / "short"
    assert main(["eval", str(tiny_models("llama")), "--no-ppl", "--passkey-lengths", "8",
                 "--trials", "1", "--dtype", "fp32", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--passkey-lengths" in err and "at least" in err
    assert not out.exists()


def test_every_eval_option_is_declared_once_and_sets_its_field() -> None:
    """The parser and the settings come from one table (EvalSettings' FLAGS): each flag parses
    into the field it names, and --help shows the field's own default."""
    from pi_lora.cli.commands import _eval_values
    from pi_lora.cli.main import build_parser
    from pi_lora.eval.settings import FLAGS, EvalSettings

    parser = build_parser()
    args = parser.parse_args(["eval", "model", "--passkey-lengths", "1k,2k", "--depths", "0,1",
                              "--trials", "3", "--seed", "7", "--k-max-threshold", "0.5",
                              "--ppl-lengths", "2k", "--stride", "64", "--ppl-mode",
                              "whole-window", "--docs", "a.txt", "--max-windows", "2",
                              "--dtype", "fp32", "--device", "cpu", "--no-passkey"])
    given = _eval_values(args)
    assert set(given) == set(FLAGS)
    assert given == {"passkey_lengths": [1024, 2048], "passkey_depths": [0.0, 1.0],
                     "passkey_trials": 3, "seed": 7, "k_max_threshold": 0.5,
                     "ppl_lengths": [2048], "ppl_stride": 64, "ppl_mode": "whole-window",
                     "documents": [Path("a.txt")], "ppl_max_windows": 2, "dtype": "fp32",
                     "device": "cpu", "passkey": False, "perplexity": True}
    EvalSettings(**given)  # every name is a field
    assert _eval_values(parser.parse_args(["eval", "model"])) == {"passkey": True,
                                                                  "perplexity": True}
    help_text = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "(default: 256)" in help_text and "each target's original" in help_text
    # lengths follow each target's window: no fixed list shown beside that (it said both)
    assert "(default: 1024,2048,4096,8192)" not in help_text


def test_eval_of_a_release_with_no_options_scores_its_own_windows_on_shipped_text(
        tiny_models, write_recipe, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """README's third command, as merge's `next:` prints it: no --docs, no lengths. It used
    to exit 2 naming a flag that does not exist ("options"); lengths were fixed at 1k-8k."""
    model_dir = tiny_models("llama")  # 128-token window; the recipe extends it to 256
    assert main(["train", str(write_recipe(model_dir, training={"max_steps": 1}))]) == 0
    assert main(["merge", str(tmp_path / "run"), "--output", str(tmp_path / "rel")]) == 0
    out = tmp_path / "report"
    assert main(["eval", str(tmp_path / "rel"), "--trials", "1", "--depths", "0.5",
                 "--max-windows", "1", "--dtype", "fp32", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lengths passkey 256; ppl 128,256" in printed and "plays pi-lora ships" in printed
    report = json.loads((out / "report.json").read_text())
    proto = report["protocol"]
    assert proto["passkey"]["lengths"] == [256]  # 128 cannot hold the passkey prompt
    assert [d["source"] for d in proto["perplexity"]["documents"]] == [
        "pi-lora shipped text: Shakespeare (public domain)"] * 2
    assert sorted(report["targets"][0]["perplexity"]["by_length"]) == ["128", "256"]
    assert report["targets"][0]["describe"]["window"] == {"original": 128, "extended": 256}
