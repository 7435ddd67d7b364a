"""run_eval end to end on tiny random targets: report.json protocol, report.md, PNGs, reloads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pi_lora.eval import passkey
from pi_lora.eval.runner import EvalTarget, has_stateful_rope, run_eval
from pi_lora.eval.settings import EvalSettings
from pi_lora.recipe import dtypes
from pi_lora.testing import tiny_config

TEXT = " ".join([passkey.INSTRUCTION, passkey.FILLER * 4, passkey.QUESTION, "0123456789"])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")


def make_target(label: str, rope_parameters: dict, loads: list[str]) -> EvalTarget:
    tokenizer = tiny_tokenizer()

    def load() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
        loads.append(label)
        torch.manual_seed(0)
        config = tiny_config("llama", vocab_size=len(tokenizer), max_positions=128,
                             rope_parameters={"rope_theta": 10000.0, **rope_parameters},
                             hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1,
                             eos_token_id=tokenizer.eos_token_id)
        return LlamaForCausalLM(config).eval(), tokenizer

    return EvalTarget(label, load, {"kind": "base", "rope": rope_parameters})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[dict, Path, list[str], EvalSettings]:
    out = tmp_path_factory.mktemp("report")
    doc = out / "doc.txt"
    doc.write_text(TEXT * 3)
    loads: list[str] = []
    targets = [
        make_target("base (plain RoPE)", {"rope_type": "default"}, loads),
        make_target("dynamic NTK x2", {"rope_type": "dynamic", "factor": 2.0}, loads),
    ]
    settings = EvalSettings(
        passkey_lengths=[160, 200], passkey_depths=[0.0, 1.0], passkey_trials=1,
        max_new_tokens=3, ppl_lengths=[64, 128], ppl_stride=32, ppl_max_windows=3,
        documents=[doc], dtype="fp32", device="cpu", progress=False,
    )
    return run_eval(targets, settings, out), out, loads, settings


def test_report_json_states_the_protocol(evaluated):
    report, out, _, settings = evaluated
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["protocol"] == report["protocol"]
    pk, ppl = report["protocol"]["passkey"], report["protocol"]["perplexity"]
    assert pk["lengths"] == [160, 200] and pk["depths"] == [0.0, 1.0]
    assert (pk["trials_per_cell"], pk["seed"], pk["k_max_threshold"]) == (1, 0, 0.2)
    assert pk["filler"] == passkey.FILLER and pk["decoding"] == "greedy"
    assert (ppl["mode"], ppl["stride"], ppl["lengths"]) == ("sliding", 32, [64, 128])
    assert ppl["documents"][0]["name"] == "doc.txt"
    assert report["protocol"]["settings"] == settings.model_dump(mode="json")
    assert {"torch", "transformers"} <= set(report["versions"])


def test_report_json_has_numbers_per_target(evaluated):
    report, *_ = evaluated
    assert [t["label"] for t in report["targets"]] == ["base (plain RoPE)", "dynamic NTK x2"]
    for target in report["targets"]:
        assert target["facts"]["dtype"] == "float32"
        assert target["describe"]["kind"] == "base"
        assert set(target["passkey"]["accuracy_by_length"]) == {"160", "200"}
        assert len(target["passkey"]["trials"]) == 4
        assert target["passkey"]["k_max"] in (0, 160, 200)
        by_length = target["perplexity"]["by_length"]
        assert set(by_length) == {"64", "128"}
        assert all(v["windows"] <= 3 and v["ppl"] > 1 for v in by_length.values())
        assert target["perplexity"]["document_tokens"][0] > 128
    dynamic = report["targets"][1]
    assert dynamic["facts"]["rope_parameters"]["rope_type"] == "dynamic"


def test_report_md_references_existing_pngs(evaluated):
    _, out, _, _ = evaluated
    markdown = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert "ppl_vs_length.png" in images
    assert len([i for i in images if i.startswith("passkey_")]) == 2
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| base (plain RoPE) |" in markdown and "| dynamic NTK x2 |" in markdown
    assert "k_max" in markdown and "sliding" in markdown


def test_stateful_rope_target_is_reloaded_for_every_length(evaluated):
    _, _, loads, settings = evaluated
    assert loads.count("base (plain RoPE)") == 1
    # every passkey length, the head check, every ppl length
    assert loads.count("dynamic NTK x2") == len(settings.passkey_lengths) + 1 + len(
        settings.ppl_lengths
    )
    model, _ = make_target("d", {"rope_type": "dynamic", "factor": 2.0}, []).load()
    assert has_stateful_rope(model)


def test_settings_refuse_incoherent_protocols():
    assert EvalSettings(perplexity=True, ppl_lengths=[128]).ppl_stride == 64  # default halves
    with pytest.raises(ValueError, match="depths"):
        EvalSettings(perplexity=False, passkey_depths=[1.5])
    with pytest.raises(ValueError, match="stride"):
        EvalSettings(documents=[Path("x.txt")], ppl_lengths=[128], ppl_stride=256)


def test_auto_dtype_is_bf16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch):
    from pi_lora.eval import runner

    settings = EvalSettings(perplexity=False, device="cpu")
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    assert runner.resolve_dtype(settings) == torch.float32  # AVX2: bf16 is ~8x slower
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: True)
    assert runner.resolve_dtype(settings) == torch.bfloat16
    explicit = EvalSettings(perplexity=False, device="cpu", dtype="bf16")
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)
    assert runner.resolve_dtype(explicit) == torch.bfloat16  # asked for: honoured


def test_eval_dataset_is_the_recipe_source_with_a_named_split(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    """One DatasetSource for recipes and eval; eval refuses a split it would have to guess
    (the recipe default "train" would flatter a model) and passes the revision on."""
    from pi_lora.eval import texts
    from pi_lora.recipe.loading import DatasetSource

    with pytest.raises(ValueError, match="name the split"):
        EvalSettings(passkey=False, dataset={"name": "org/corpus"})
    settings = EvalSettings(passkey=False, dataset={"name": "org/corpus", "split": "test",
                                                    "revision": "abc123"})
    assert isinstance(settings.dataset, DatasetSource)

    import datasets

    seen: dict = {}

    def fake_load(name: str, config: str | None, split: str, revision: str | None):
        seen.update(name=name, config=config, split=split, revision=revision)
        return datasets.Dataset.from_dict({"text": ["one document", "two"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    documents = texts.load_dataset_documents(settings.dataset, "text", 1)
    assert seen == {"name": "org/corpus", "config": None, "split": "test", "revision": "abc123"}
    assert [d.text for d in documents] == ["one document"]
