"""Bad input is a message, never a traceback, a hang or a silently ignored setting (issue 20):
duplicate YAML keys, unbounded numbers, alias bombs, unreadable data files, other chat layouts,
bad command-line numbers."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError, RecipeErrors
from pi_lora.data.build import build_train_dataset, load_raw
from pi_lora.recipe.loading import deep_merge, load_recipe
from pi_lora.testing import make_tokenizer

BASE = {"model": {"name": "org/model"}, "rope": {"method": "linear", "target_context": 8192},
        "data": {"files": ["x.txt"]}, "output_dir": "runs/x"}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _validate(path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    """`pi-lora validate`: exit 2 and one message, no traceback; returns stderr."""
    assert main(["validate", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------------- recipes


def test_duplicate_top_level_key_is_an_error_naming_key_and_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False) + "training:\n  max_steps: 5\n"
                    "lora:\n  r: 4\ntraining:\n  learning_rate: 1.0e-4\n")
    err = _validate(path, capsys)
    assert "duplicate key 'training'" in err and "line" in err


def test_duplicate_nested_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    text = yaml.safe_dump(BASE, sort_keys=False).replace(
        "  method: linear\n", "  method: linear\n  method: yarn\n")
    path.write_text(text)
    with pytest.raises(PiLoraError, match=r"duplicate key 'method' on line 5") as info:
        load_recipe(path)
    assert info.value.field == "rope.method"


def test_merge_keys_may_override_without_being_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: org/model}\nrope: {method: linear, target_context: 8192}\n"
                    "data: {files: [x.txt]}\noutput_dir: runs/x\n"
                    "training:\n  <<: {max_steps: 5, learning_rate: 1.0e-4}\n  max_steps: 7\n")
    assert load_recipe(path).training.max_steps == 7


@pytest.mark.parametrize(("section", "key", "value"), [
    ("training", "learning_rate", float("inf")),
    ("training", "learning_rate", float("nan")),
    ("training", "learning_rate", 5.0),
    ("training", "max_grad_norm", float("inf")),
    ("training", "weight_decay", float("nan")),
    ("training", "seed", -1),
    ("training", "max_steps", 10**30),
    ("lora", "dropout", 1.5),
    ("lora", "dropout", 1.0),
    ("lora", "alpha", float("inf")),
    ("rope", "target_context", 10**12),
    ("data", "seq_len", 10**12),
])
def test_numbers_are_finite_and_bounded(tmp_path: Path, section: str, key: str,
                                        value: float) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE, {section: {key: value}})))
    with pytest.raises(RecipeErrors) as info:
        load_recipe(path)
    assert f"{section}.{key}" in {e.field for e in info.value.errors}


def test_inf_learning_rate_from_set_exits_2(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    err = _validate(path, capsys, "--set", "training.learning_rate=.inf")
    assert "training.learning_rate" in err


def _bomb(levels: int, width: int = 9) -> str:
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_fast_with_a_short_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(BASE) + _bomb(9) + "lora:\n  target_modules: *a8\n")
    started = time.perf_counter()
    err = _validate(path, capsys)
    assert time.perf_counter() - started < 10
    assert "expands to more than" in err and len(err) < 2000


def test_alias_bomb_through_set_is_refused(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    bomb = "{" + _bomb(9).replace("\n", ", ").rstrip(", ") + "}"
    err = _validate(path, capsys, "--set", f"lora.x={bomb}")
    assert "expands to more than" in err and len(err) < 2000


def test_recursive_alias_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE) + "lora: &l {target_modules: [*l]}\n")
    assert "recursive alias" in _validate(path, capsys)


def test_values_in_errors_are_cut_short(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A large (in-budget) wrong value is quoted in a few hundred characters, not in full."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE, {
        "model": {"name": ["x" * 100] * 500},
        "lora": {"target_modules": list(range(5000))}})))
    err = _validate(path, capsys)
    assert "model.name" in err and "lora.target_modules" in err and len(err) < 8000


def test_non_utf8_recipe_is_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(yaml.safe_dump(BASE).encode() + b"# caf\xe9\n")
    assert "not UTF-8" in _validate(path, capsys)


def test_directory_as_recipe_is_a_message(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert "is a directory" in _validate(tmp_path, capsys)


def test_set_into_an_empty_section(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE) + "training:\n")
    assert load_recipe(path, ["training.max_steps=3"]).training.max_steps == 3


# --------------------------------------------------------------------------- data files


def _section(path: Path, **options) -> dict:
    return {"files": [str(path)], **options}


def _build_error(tokenizer, tmp_path: Path, **data) -> PiLoraError:
    from pi_lora.recipe.loading import DataSection

    with pytest.raises(PiLoraError) as info:
        build_train_dataset(DataSection(**data), tokenizer, 32, seed=0, cache_dir=tmp_path / "c")
    return info.value


def test_binary_jsonl_names_file_and_line(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n\x89PNG\xff\xfe\x00\x01\n')
    err = _build_error(tokenizer, tmp_path, files=[str(path)])
    assert str(path) in err.message and "line 3" in err.message and "UTF-8" in err.message


def test_non_utf8_text_file_names_the_file(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.txt"
    path.write_bytes(b"plain words\nmore\xe9 words\n")
    err = _build_error(tokenizer, tmp_path, files=[str(path)])
    assert str(path) in err.message and "line 2" in err.message


def test_broken_jsonl_line_is_named(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": "c"\n{"text": "d"}\n')
    err = _build_error(tokenizer, tmp_path, files=[str(path)])
    assert str(path) in err.message and "line 4" in err.message and err.field == "data.files"


def test_jsonl_line_that_is_not_an_object_is_named(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n[1, 2]\n')
    err = _build_error(tokenizer, tmp_path, files=[str(path)])
    assert "line 2" in err.message and "not an object" in err.message


def test_broken_jsonl_in_a_stream_is_named(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n')
    err = _build_error(tokenizer, tmp_path, files=[str(path)], streaming=True)
    assert str(path) in err.message and "line 2" in err.message


def test_file_that_is_not_parquet_is_named(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    path.write_text("text\nnot parquet at all\n")
    err = _build_error(tokenizer, tmp_path, files=[str(path)])
    assert str(path) in err.message and "Parquet" in err.message


def test_directory_in_data_files_is_a_message(tokenizer, tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "a"}\n')
    err = _build_error(tokenizer, tmp_path, files=[str(folder)])
    assert err.field == "data.files[0]" and "directory" in err.message and "*.jsonl" in err.fix


@pytest.mark.parametrize("values", [[1, 2, 3], ["words", 7], [{"nested": "x"}]])
def test_non_string_text_values_name_the_field(tokenizer, tmp_path: Path, values: list) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": v}) for v in values))
    err = _build_error(tokenizer, tmp_path, files=[str(path)])
    assert err.field == "data.text_field" and "not text" in err.message


def test_non_string_text_values_in_a_stream(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": v}) for v in [1, 2, 3]))
    err = _build_error(tokenizer, tmp_path, files=[str(path)], streaming=True)
    assert err.field == "data.text_field"


def _sharegpt(question: str, answer: str) -> dict:
    return {"conversations": [{"from": "system", "value": "be brief"},
                              {"from": "human", "value": question},
                              {"from": "gpt", "value": answer}]}


def _openai(question: str, answer: str) -> dict:
    return {"conversations": [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": question},
                              {"role": "assistant", "content": answer}]}


def test_sharegpt_records_train_like_role_content(tokenizer, tmp_path: Path) -> None:
    from pi_lora.recipe.loading import DataSection

    built = {}
    for name, make in (("sharegpt", _sharegpt), ("openai", _openai)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps(make(f"question {i}", f"answer {i} " * (i % 4 + 1)))
                                  for i in range(12)))
        section = DataSection(files=[str(path)], format="chat", messages_field="conversations")
        built[name] = build_train_dataset(section, tokenizer, 64, seed=0,
                                          cache_dir=tmp_path / name).train
    assert built["sharegpt"][:] == built["openai"][:]
    assert len(built["sharegpt"]) > 0


@pytest.mark.parametrize("message", [{"speaker": "human", "text": "hi"},
                                     {"from": "robot", "value": "hi"},
                                     {"role": "user", "content": 5}])
def test_unknown_chat_layout_says_what_is_expected(tokenizer, tmp_path: Path,
                                                   message: dict) -> None:
    path = tmp_path / "d.jsonl"
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [message, {"role": "assistant", "content": "x"}]}
    path.write_text("\n".join(json.dumps(r) for r in [good, good, bad, good]))
    err = _build_error(tokenizer, tmp_path, files=[str(path)], format="chat", num_proc=2)
    assert err.field == "data.messages_field" and '"from"' in err.fix and '"role"' in err.fix
    assert f"record 3 of {path}" in err.message


def test_good_jsonl_still_loads_through_datasets(tmp_path: Path) -> None:
    from pi_lora.recipe.loading import DataSection

    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert load_raw(DataSection(files=[str(path)]))["text"] == ["a", "b"]


def test_train_with_a_broken_data_file_exits_2(tiny_models, write_recipe, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"\n')
    recipe = write_recipe(tiny_models("llama"), data={"files": [str(path)]})
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "line 2" in err and "Traceback" not in err


# --------------------------------------------------------------------------- models


def test_remote_code_model_names_trust_remote_code(tmp_path: Path) -> None:
    from pi_lora.model.loading import load_config
    from pi_lora.recipe.loading import ModelSection

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "pilora_custom", "auto_map": {"AutoConfig": "custom.CustomConfig"}}))
    (tmp_path / "custom.py").write_text(
        "from transformers import PretrainedConfig\n"
        "class CustomConfig(PretrainedConfig):\n    model_type = 'pilora_custom'\n")
    with pytest.raises(PiLoraError) as info:
        load_config(ModelSection(name=str(tmp_path)))
    assert info.value.field == "model.trust_remote_code"
    assert "model.trust_remote_code" in info.value.fix


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("argv", [
    ["merge", "RUN", "--probe-tokens", "-5"],
    ["merge", "RUN", "--probe-tokens", "0"],
    ["merge", "RUN", "--probe-tokens", "many"],
    ["eval", "M", "--trials", "0"],
    ["eval", "M", "--stride", "-64"],
    ["eval", "M", "--max-windows", "0"],
    ["eval", "M", "--seed", "-1"],
    ["eval", "M", "--k-max-threshold", "nan"],
    ["plan", "r.yaml", "--gpus", "0"],
    ["plan", "r.yaml", "--nodes", "-2"],
])
def test_bad_numeric_flags_exit_2_naming_the_flag(argv: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert argv[2] in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "value"), [
    ("--depths", "x"), ("--depths", "0,nan"), ("--depths", "2"),
    ("--passkey-lengths", "1e400k"), ("--passkey-lengths", "10000000000"),
    ("--ppl-lengths", "0"), ("--trials", "100000"),
])
def test_bad_eval_values_exit_2_naming_the_flag(tmp_path: Path, flag: str, value: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    docs = tmp_path / "d.txt"
    docs.write_text("words " * 50)
    try:  # out of a field's bounds: argparse refuses it (exit 2) before eval starts
        code = main(["eval", str(tmp_path / "no-model"), flag, value, "--docs", str(docs),
                     "--out", str(tmp_path / "out")])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_eval_out_that_is_a_file_fails_before_evaluating(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.txt"
    out.write_text("keep me")
    # the target does not exist either: --out is checked first, before any model is looked at
    assert main(["eval", str(tmp_path / "no-model"), "--no-ppl", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "file" in err
    assert out.read_text() == "keep me"
    assert main(["eval", str(tmp_path / "no-model"), "--no-ppl", "--out", str(out / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


def test_eval_non_utf8_document_is_a_message(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora.eval.texts import load_documents

    docs = tmp_path / "d.txt"
    docs.write_bytes(b"\x89PNG\xff\xfe\x00")
    with pytest.raises(PiLoraError, match="not UTF-8"):
        load_documents([docs])


def test_cli_subprocess_bomb_exits_2_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(yaml.safe_dump(BASE) + _bomb(7) + "lora:\n  target_modules: *a6\n")
    done = subprocess.run([sys.executable, "-m", "pi_lora.cli", "validate", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(done.stderr) < 2000


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("empty.jsonl", "", "empty"),
    ("array.json", '[{"text": "a"}, 3]', "item 1"),
    ("broken.json", '[{"text": "a"},', "line 1"),
    ("empty.parquet", "", "Parquet"),
])
def test_other_unreadable_files_are_named(tokenizer, tmp_path: Path, name: str, content: str,
                                          expected: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    err = _build_error(tokenizer, tmp_path, files=[str(path)])
    assert str(path) in err.message and expected in err.message


def test_instruction_values_must_be_text(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "add", "input": "1 + 1", "output": 2}))
    err = _build_error(tokenizer, tmp_path, files=[str(path)], format="instruction")
    assert err.field == "data.instruction_fields" and "int" in err.message


@pytest.mark.parametrize("rope", ["linear:0", "linear:-5", "yarn:99999999999"])
def test_eval_rope_lengths_are_bounded(rope: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "no-model", "--rope", rope, "--no-ppl"]) == 2
    assert "--rope" in capsys.readouterr().err


def test_recipe_with_control_characters_is_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(yaml.safe_dump(BASE).encode() + b"\x00\x01\x02binary\n")
    assert "not valid YAML" in _validate(path, capsys)


def test_oversized_recipe_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import pi_lora.recipe.loading

    monkeypatch.setattr(pi_lora.recipe.loading, "MAX_RECIPE_BYTES", 1000)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE) + "#" * 2000 + "\n")
    assert "not a recipe" in _validate(path, capsys)


def test_broken_link_and_literal_glob_characters_in_data_files(tmp_path: Path) -> None:
    from pi_lora.data.build import expand_files

    (tmp_path / "gone.jsonl").symlink_to(tmp_path / "missing.jsonl")
    with pytest.raises(PiLoraError, match="not a regular file") as info:
        expand_files([str(tmp_path / "gone.jsonl")])
    assert info.value.field == "data.files[0]"
    literal = tmp_path / "part[1].jsonl"
    literal.write_text('{"text": "a"}\n')
    assert expand_files([str(literal)]) == [literal.resolve()]


@pytest.mark.parametrize("content", [b"\x89PNG\xff\x00", b'{"zero_optimization": ', b"[1, 2]"])
def test_unreadable_deepspeed_config_is_a_recipe_error(tmp_path: Path, content: bytes) -> None:
    config = tmp_path / "ds.json"
    config.write_bytes(content)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE, {"training": {"deepspeed": str(config)}})))
    with pytest.raises(RecipeErrors) as info:
        load_recipe(path)
    assert "training.deepspeed" in {e.field for e in info.value.errors}


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])
def test_eval_unknown_device_exits_2(tmp_path: Path, device: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tmp_path / "no-model"), "--no-ppl", "--device", device]) == 2
    err = capsys.readouterr().err
    assert "--device" in err and "Traceback" not in err


@pytest.mark.parametrize(("section", "value"), [
    ("output_dir", ""), ("model", {"name": ""}), ("lora", {"target_modules": []}),
    ("data", {"text_field": ""}),
])
def test_empty_names_are_errors_not_defaults(tmp_path: Path, section: str, value) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({**BASE, section: value}))
    with pytest.raises(RecipeErrors) as info:
        load_recipe(path)
    assert any(e.field.startswith(section) for e in info.value.errors)
