"""Issue #37's newcomer frictions: shipped recipes usable by name after `pip install`
(`pi-lora recipes`, names as recipe arguments, `extends:` a shipped base, `validate` over
several files), chat / alpaca data under the wrong `data.format` naming the setting, and
other tools' recipe keys pointing at pi-lora's fields."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pi_lora.cli import main
from pi_lora.cli.recipes import recipe_argument
from pi_lora.core.errors import PiLoraError, RecipeErrors
from pi_lora.data.build import build_train_dataset
from pi_lora.recipe.loading import DataSection, load_recipe
from pi_lora.recipe.shipped import SHIPPED_RECIPES_DIR, find_shipped, shipped_recipes
from pi_lora.testing import make_tokenizer

REPO = Path(__file__).resolve().parent.parent
FLAGSHIP = SHIPPED_RECIPES_DIR / "llama2-13b-16k.yaml"

# --------------------------------------------------------------------------- pi-lora recipes


def test_shipped_recipes_are_the_repositorys_recipes() -> None:
    listed = {r.path for r in shipped_recipes()}
    assert listed == {p.resolve() for p in (REPO / "recipes").rglob("*.yaml")}
    assert all(r.description for r in shipped_recipes()), "each opens with a comment line"


def test_recipes_lists_each_with_its_first_comment_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert main(["recipes", "list"]) == 0
    assert capsys.readouterr().out == out
    lines = out.splitlines()
    for recipe in shipped_recipes():
        (line,) = [x for x in lines if x.split()[:1] == [recipe.name]]
        assert line.endswith(recipe.description)
    assert any(x.split()[:1] == ["llama2-13b-16k"] and "Flagship: Llama-2-13B" in x for x in lines)


def test_recipes_show_prints_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "show", "llama2-13b-16k"]) == 0
    shown = capsys.readouterr()
    assert shown.out == FLAGSHIP.read_text()
    assert str(FLAGSHIP) in shown.err  # where it lies, outside the printed file
    assert main(["recipes", "show", "llama2-13b"]) == 2
    err = capsys.readouterr().err
    assert "no shipped recipe named 'llama2-13b'" in err and "llama2-13b-16k" in err


def test_recipes_cp_copies_and_refuses_to_replace(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes", "cp", "llama2-13b-16k", str(tmp_path)]) == 0
    copied = tmp_path / "llama2-13b-16k.yaml"
    assert copied.read_text() == FLAGSHIP.read_text()
    assert "extends base/llama2.yaml" in capsys.readouterr().out
    copied.write_text("# mine\n")
    assert main(["recipes", "cp", "llama2-13b-16k", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{copied} already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert copied.read_text() == "# mine\n"
    assert main(["recipes", "cp", "llama2-13b-16k", str(copied), "--overwrite"]) == 0
    assert copied.read_text() == FLAGSHIP.read_text()
    assert main(["recipes", "cp", "tiny", str(tmp_path / "mine")]) == 0  # like `tune cp`
    assert (tmp_path / "mine.yaml").read_text() == (SHIPPED_RECIPES_DIR / "tiny.yaml").read_text()
    assert not list(tmp_path.glob(".*partial*"))


def test_a_copied_recipe_extends_the_shipped_base(tmp_path: Path) -> None:
    assert main(["recipes", "cp", "llama2-13b-16k", str(tmp_path)]) == 0
    assert load_recipe(tmp_path / "llama2-13b-16k.yaml") == load_recipe(FLAGSHIP)


# --------------------------------------------------------------------------- shipped names


def test_a_recipe_argument_names_a_shipped_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ here: an installed wheel's view
    for argument in ("llama2-13b-16k", "llama2-13b-16k.yaml", "recipes/llama2-13b-16k.yaml"):
        assert recipe_argument(argument) == str(FLAGSHIP)
        assert capsys.readouterr().err == (f"pi-lora: using the shipped recipe llama2-13b-16k "
                                           f"({FLAGSHIP})\n")
    Path("llama2-13b-16k.yaml").write_text("# a local file\n")
    assert recipe_argument("llama2-13b-16k.yaml") == "llama2-13b-16k.yaml"  # the local one wins
    assert capsys.readouterr().err == ""
    assert recipe_argument("missing.yaml") == "missing.yaml"  # the loader says it is missing
    assert main(["validate", "missing.yaml"]) == 2
    assert "pi-lora recipes" in capsys.readouterr().err


def test_plan_runs_a_shipped_recipe_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "llama2-13b-16k", "--gpus", "8", "--json"]) == 0
    captured = capsys.readouterr()
    assert "using the shipped recipe llama2-13b-16k" in captured.err
    assert json.loads(captured.out)


def _child(tmp_path: Path, parent: str, name: str = "mine.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"extends": parent, "model": {"name": "org/model"},
                                    "rope": {"method": "linear", "target_context": 8192},
                                    "data": {"files": ["x.jsonl"]}, "output_dir": "runs/x"}))
    return path


def test_extends_names_a_shipped_base(tmp_path: Path) -> None:
    base = yaml.safe_load((SHIPPED_RECIPES_DIR / "base" / "pi-paper.yaml").read_text())
    for parent in ("pi-paper", "pi-paper.yaml", "base/pi-paper.yaml"):
        recipe = load_recipe(_child(tmp_path, parent))
        assert recipe.lora.trainable_extras == base["lora"]["trainable_extras"]
        assert recipe.training.global_batch_size == base["training"]["global_batch_size"]
    (tmp_path / "base").mkdir()  # a file beside the recipe wins over the shipped base
    (tmp_path / "base" / "pi-paper.yaml").write_text("lora: {r: 3}\n")
    assert load_recipe(_child(tmp_path, "base/pi-paper.yaml")).lora.r == 3
    with pytest.raises(PiLoraError) as info:
        load_recipe(_child(tmp_path, "pi-papr"))
    assert info.value.field == "extends" and "pi-lora recipes" in info.value.fix
    assert find_shipped("../../etc/passwd") is None  # names in the listing only


def test_validate_gives_each_recipe_its_verdict(tiny_models: Any, write_recipe: Any,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_models()
    good = [write_recipe(model, name=f"good{i}.yaml") for i in range(2)]
    bad = write_recipe(model, name="bad.yaml", training={"lerning_rate": 1e-4})
    assert main(["validate", *map(str, good)]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")] == [
        "ok", "ok", "pi-lora:"]
    assert main(["validate", str(good[0]), str(bad), str(good[1])]) == 2
    captured = capsys.readouterr()
    assert f"ok     {good[0]}" in captured.out and f"ok     {good[1]}" in captured.out
    assert f"FAILED {bad}" in captured.out and "did you mean 'learning_rate'" in captured.out
    assert f"1 of 3 recipes failed: {bad}" in captured.err


# --------------------------------------------------------------------------- data.format


CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
ALPACA = {"instruction": "say hi", "input": "", "output": "hi"}
SHAPES = [  # (record, recipe data settings, what the message calls them, the fix)
    (CHAT, {}, "chat conversations", "set data.format: chat"),
    (SHAREGPT, {}, "ShareGPT conversations",
     "set data.format: chat and data.messages_field: conversations"),
    (ALPACA, {}, "instruction/response pairs", "set data.format: instruction"),
    (ALPACA, {"format": "chat"}, "instruction/response pairs", "set data.format: instruction"),
    (CHAT, {"format": "instruction"}, "chat conversations", "set data.format: chat"),
    ({"text": "plain"}, {"format": "chat"}, "plain text", "set data.format: pretrain"),
    ({"dialog": CHAT["messages"]}, {"format": "chat"}, "chat conversations",
     "set data.messages_field: dialog"),
]


def _records(tmp_path: Path, record: dict[str, Any]) -> Path:
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(record) for _ in range(8)) + "\n")
    return path


@pytest.mark.parametrize(("record", "settings", "what", "fix"), SHAPES,
                         ids=[f"{next(iter(r))}-{s.get('format', 'pretrain')}"
                              for r, s, _, _ in SHAPES])
def test_train_names_the_format_the_records_need(tmp_path: Path, record: dict[str, Any],
                                                 settings: dict[str, str], what: str,
                                                 fix: str) -> None:
    section = DataSection(files=[str(_records(tmp_path, record))], **settings)
    with pytest.raises(PiLoraError) as info:
        build_train_dataset(section, make_tokenizer(), 64, seed=0, cache_dir=tmp_path / "cache")
    assert f"these records are {what}" in info.value.message
    assert info.value.fix == fix
    expected_field = "data.format" if "data.format" in fix else "data.messages_field"
    assert info.value.field == expected_field


def test_a_stream_names_the_format_too(tmp_path: Path) -> None:
    section = DataSection(files=[str(_records(tmp_path, CHAT))], streaming=True)
    with pytest.raises(PiLoraError) as info:
        build_train_dataset(section, make_tokenizer(), 64, seed=0)
    assert "chat conversations" in info.value.message
    assert info.value.fix == "set data.format: chat"


@pytest.mark.parametrize(("record", "settings", "what", "fix"), SHAPES[:3],
                         ids=["chat", "sharegpt", "alpaca"])
def test_validate_reads_the_first_record_and_refuses(
        tmp_path: Path, tiny_models: Any, write_recipe: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], record: dict[str, Any], settings: dict[str, str],
        what: str, fix: str) -> None:
    import datasets

    def no_loading(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("validate must not load the data with datasets")

    monkeypatch.setattr(datasets, "load_dataset", no_loading)
    data = {"files": [str(_records(tmp_path, record))]}
    path = write_recipe(tiny_models(), data=data)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"these records are {what}" in err and f"fix: {fix}" in err
    right = {"format": "instruction"} if record is ALPACA else {"format": "chat"}
    if record is SHAREGPT:
        right["messages_field"] = "conversations"
    assert main(["validate", str(write_recipe(tiny_models(), data={**data, **right}))]) == 0
    assert f"format {right['format']}, columns {', '.join(record)}" in capsys.readouterr().out


def test_validate_refuses_a_data_file_that_is_not_jsonl(tmp_path: Path, tiny_models: Any,
                                                        write_recipe: Any,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    assert main(["validate", str(write_recipe(tiny_models(), data={"files": [str(bad)]}))]) == 2
    assert f"{bad}: line 2 is not valid JSON" in capsys.readouterr().err


# --------------------------------------------------------------------------- foreign keys


FOREIGN = [  # (key, value, pi-lora's field as the fix names it)
    ("base_model", "meta-llama/Llama-2-7b-hf", "model.name"),
    ("model_name_or_path", "meta-llama/Llama-2-7b-hf", "model.name"),
    ("lora_r", 16, "lora.r"),
    ("lora_rank", 16, "lora.r"),
    ("lora_alpha", 32, "lora.alpha"),
    ("datasets", [{"path": "x"}], "data.files"),
    ("sequence_len", 8192, "data.seq_len"),
    ("cutoff_len", 8192, "data.seq_len"),
    ("learning_rate", 1e-4, "training.learning_rate"),
    ("num_epochs", 1, "training.max_steps"),
    ("micro_batch_size", 1, "training.per_device_batch_size"),
]


def test_other_tools_keys_point_at_pi_lora_fields(tmp_path: Path) -> None:
    recipe = {"model": {"name": "org/model"}, "rope": {"method": "linear", "target_context": 8192},
              "data": {"files": ["x.txt"]}, "output_dir": "runs/x"}
    recipe.update({key: value for key, value, _ in FOREIGN})
    path = tmp_path / "ported.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeErrors) as info:
        load_recipe(path)
    fixes = {e.field: (e.message, e.fix) for e in info.value.errors}
    for key, _, ours in FOREIGN:
        message, fix = fixes[key]
        assert fix.startswith(f"pi-lora's is {ours}"), (key, fix)
        assert message.startswith(f"unknown key '{key}' ("), message
    assert "axolotl's name" in fixes["base_model"][0]
    assert "LLaMA-Factory's name" in fixes["cutoff_len"][0]
    assert fixes["learning_rate"][0] == "unknown key 'learning_rate' (a training setting)"


# --------------------------------------------------------------------------- polish (item 11)


def test_every_flag_says_what_it_does_and_its_default() -> None:
    import argparse

    from pi_lora.cli.main import build_parser

    missing = []
    for action in build_parser()._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for command, sub in action.choices.items():
            for flag in sub._actions:
                name = flag.option_strings or [flag.dest]
                if flag.help is None:
                    missing.append(f"{command} {name[0]}: no help")
                elif flag.default not in (None, False, [], argparse.SUPPRESS) \
                        and "default" not in flag.help:
                    missing.append(f"{command} {name[0]}: default {flag.default!r} not shown")
    assert missing == []


def test_a_list_field_given_one_value_shows_the_list_syntax(tmp_path: Path) -> None:
    with pytest.raises(RecipeErrors) as caught:
        load_recipe(SHIPPED_RECIPES_DIR / "tiny.yaml", ["data.files=/tmp/x.jsonl"])
    fixes = [e.fix for e in caught.value.errors]
    assert any('--set "data.files=[a, b]"' in (f or "") for f in fixes), fixes


def test_report_targets_read_as_words_not_json() -> None:
    from pi_lora.eval.report import _limit, _rope_words, _target_words

    assert _rope_words({"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}) \
        == "linear x2, theta 100000"
    assert _rope_words(None) == "plain RoPE"
    gemma = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    assert _rope_words(gemma) == ("full_attention: linear x8, theta 1000000; "
                                  "sliding_attention: plain RoPE, theta 10000")
    words = _target_words({"kind": "release", "model": "release/x", "rope": "as in the model "
                           "config", "window": {"original": 8192, "extended": 16384}})
    assert words == "release `release/x`, rope as in the model config, window 8192 -> 16384"
    assert "{" not in _target_words({"kind": "model", "model": "m",
                                     "rope": {"method": "yarn", "factor": 2.0}})
    assert _limit(None) == "no limit" and _limit(4096) == "4,096"


def test_the_direct_control_is_not_called_none_x4() -> None:
    from pi_lora.model.rope import RopePlan
    from pi_lora.train.assembly import _rope_words

    fields = {f: None for f in RopePlan.__dataclass_fields__}
    direct = RopePlan(**{**fields, "method": "none", "factor": 4.0, "original_context": 256,
                         "target_context": 1024})
    assert "none x" not in _rope_words(direct) and "no interpolation" in _rope_words(direct)
    linear = RopePlan(**{**fields, "method": "linear", "factor": 2.0, "original_context": 8192,
                         "target_context": 16384})
    assert _rope_words(linear) == "linear x2 (8192 -> 16384)"


def test_ctrl_c_names_the_kept_checkpoint_and_resume_logs_the_last_step(
        tiny_models: Any, write_recipe: Any, tmp_path: Path) -> None:
    """Ctrl-C at step 4 of 6 (checkpoint at 3): the kept checkpoint, the lost step and the
    exact command; the resumed run's final_loss is step 6's own loss, not a mean back to the
    last logging step (logging every 4 steps would otherwise report the 5-6 mean)."""
    import json
    import os
    import subprocess
    import sys

    recipe = write_recipe(tiny_models(), training={"logging_steps": 4})
    script = Path(__file__).with_name("interrupt_train.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INTERRUPT_AT_STEP": "4", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(script), "train", str(recipe)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 130, done.stderr[-2000:]
    assert "stopped at step 4 of 6; kept " in done.stderr, done.stderr[-2000:]
    assert "checkpoint-3 (step 3): step 4 is redone on resume" in done.stderr
    assert f"continue with: pi-lora train {recipe} --resume" in done.stderr
    assert "Traceback" not in done.stderr

    from pi_lora.cli import main

    assert main(["train", str(recipe), "--resume"]) == 0
    run = tmp_path / "run"
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in losses if "loss" in r]
    assert logged[-2:] == [5, 6]  # the step before the last is logged, so 6's log is 6 alone
    facts = json.loads((run / "run.json").read_text())
    assert facts["final_loss"] == next(r["loss"] for r in losses if r.get("step") == 6)


def test_the_parser_imports_no_torch() -> None:
    """`pi-lora --help` (and the start of every command) took 26 s when building the parser
    imported torch and transformers through eval's and certify's modules."""
    import subprocess
    import sys

    code = ("import sys; from pi_lora.cli.main import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]"


def test_validate_and_plan_say_what_they_are_doing(tiny_models: Any, write_recipe: Any,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora.cli import main

    recipe = str(write_recipe(tiny_models()))
    for command in ("validate", "plan"):
        assert main([command, recipe]) == 0
        assert f"pi-lora {command}: reading the model config" in capsys.readouterr().err


def test_a_long_test_is_named_while_it_runs(tmp_path: Path) -> None:
    """`make test` sat on a row of dots for 27 minutes; a test past the notice is named."""
    import os
    import subprocess
    import sys

    (tmp_path / "test_long.py").write_text("import time\n\ndef test_long():\n    time.sleep(3)\n")
    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.slow_notice", "-p", "no:cacheprovider",
         str(tmp_path / "test_long.py")], cwd=repo, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PI_LORA_SLOW_NOTICE": "1", "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[still running after 1 s: " in done.stdout and "test_long.py::test_long]" in done.stdout
