"""`pi-lora certify`: each RULER task's generator and scorer against hand-computed cases, the
prompt fitting, the shared-prefix decoder against `generate`, the effective-length rule, the
verdict, the card section, and every exit code on a tiny random release (which must fail)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pi_lora.cli import main
from pi_lora.core.errors import PiLoraError
from pi_lora.eval import certificate as cert
from pi_lora.eval import haystack as hay
from pi_lora.eval import ruler_tasks as rt
from pi_lora.eval.certify import (
    CertifySettings,
    Retention,
    decide,
    default_lengths,
    effective_length,
    plan_lengths,
    retention,
    suite_threshold,
)
from pi_lora.release.model_card import with_certificate_section

# ----------------------------------------------------------------------------- scoring


def test_string_match_all_is_rulers_score() -> None:
    assert rt.string_match_all("The numbers are 123 and 456.", ["123", "456", "789"]) == 2 / 3
    assert rt.string_match_all("  answer: ABCDE\x00xyz ", ["abcde", "XYZ"]) == 1.0
    assert rt.postprocess("  a\tb\x01c  ") == "a\nb\nc"
    assert rt.string_match_all("nothing here", ["1234567"]) == 0.0


# ----------------------------------------------------------------------------- generators


def test_niah_single_pinned_and_scored() -> None:
    sample = rt.generate("niah_single", 0, 1024, 0, rt.Draws(), [], 0)
    assert sample.needles == ("One of the special magic numbers for gentle-shadow is: 6841294.",)
    assert sample.references == ("6841294",)
    assert sample.question.startswith("What is the special magic number for gentle-shadow ")
    assert sample.question.endswith("mentioned in the provided text is")
    assert rt.string_match_all(" 6841294.", sample.references) == 1.0
    # the same cell draws the same sample; another trial another one
    assert rt.generate("niah_single", 0, 1024, 0, rt.Draws(), [], 0) == sample
    assert rt.generate("niah_single", 0, 1024, 1, rt.Draws(), [], 0) != sample


def _needle_values(sample: rt.Sample) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for needle in sample.needles:
        key, value = re.fullmatch(r"One of the special magic numbers for (\S+) is: (\d{7})\.",
                                  needle).groups()
        found.setdefault(key, []).append(value)
    return found


def test_niah_multikey_multivalue_multiquery() -> None:
    draws = rt.Draws()
    multikey = rt.generate("niah_multikey", 3, 2048, 0, draws, [], 0)
    keys = _needle_values(multikey)
    assert len(keys) == 4 and all(len(v) == 1 for v in keys.values())
    asked = re.search(r"number for (\S+) mentioned", multikey.question).group(1)
    assert multikey.references == tuple(keys[asked])  # one key asked, three distractors

    multivalue = rt.generate("niah_multivalue", 3, 2048, 0, draws, [], 0)
    (key, values), = _needle_values(multivalue).items()
    assert len(values) == 4 and sorted(multivalue.references) == sorted(values)
    assert f"all the special magic numbers for {key} mentioned" in multivalue.question
    answer = f"{values[0]}, {values[2]} and {values[3]}"
    assert rt.string_match_all(answer, multivalue.references) == 0.75

    multiquery = rt.generate("niah_multiquery", 3, 2048, 0, draws, [], 0)
    keys = _needle_values(multiquery)
    asked = re.search(r"numbers for (.+) mentioned in the provided text\?",
                      multiquery.question).group(1)
    names = re.split(r", and |, ", asked)
    assert sorted(names) == sorted(keys) and len(names) == 4
    assert multiquery.references == tuple(keys[n][0] for n in names)
    # one context's tasks never share a key or a value
    every = [*_needle_values(multikey), *_needle_values(multivalue), *_needle_values(multiquery)]
    assert len(every) == len(set(every))


def test_draws_never_repeat_within_a_context() -> None:
    draws, rng = rt.Draws(), random.Random(0)
    keys = [draws.key(rng) for _ in range(1000)]
    assert len(set(keys)) == 1000 and all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)


def test_variable_tracking_chain() -> None:
    sample = rt.generate("vt", 0, 1024, 0, rt.Draws(), [], 0)
    assert sample.needles == ("VAR NTNIK = 79834", "VAR GSZXV = VAR NTNIK",
                              "VAR IBBDQ = VAR GSZXV", "VAR OMJTV = VAR IBBDQ",
                              "VAR IZDEO = VAR OMJTV")
    assert sample.references == ("NTNIK", "GSZXV", "IBBDQ", "OMJTV", "IZDEO")
    assert sample.chained and "5 variables are assigned the value 79834" in sample.question
    assert rt.string_match_all("ntnik, GSZXV, IBBDQ", sample.references) == 0.6


@pytest.mark.parametrize(("block_tokens", "repeats"), [(4096, (30, 3)), (1024, (6, 1))])
def test_common_words_list(block_tokens: int, repeats: tuple[int, int]) -> None:
    words = [f"word{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]
    sample = rt.generate("cwe", 0, 8192, 0, rt.Draws(), words, block_tokens)
    header, listed = sample.block(50).split("\n")  # type: ignore[misc]
    assert header == rt.CWE_HEADER
    numbers = re.findall(r"(\d+)\. ", listed)
    entries = re.findall(r"\d+\. (\S+)", listed)
    assert numbers == [str(i + 1) for i in range(len(entries))]
    counts = Counter(entries)
    assert len(entries) == 10 * repeats[0] + 50 * repeats[1]
    assert {counts[w] for w in sample.references} == {repeats[0]}
    assert set(counts) - set(sample.references) and all(
        c == repeats[1] for w, c in counts.items() if w not in sample.references)
    assert "10 most common words" in sample.question
    answer = " ".join(f"{i + 1}. {w}" for i, w in enumerate(sample.references[:7]))
    assert rt.string_match_all(answer, sample.references) == 0.7


def test_frequent_words_zipf() -> None:
    assert rt.zipf_counts(100, 5) == [60, 15, 6, 3, 2]  # 100 k^-2 / (pi^2 / 6), floored
    sample = rt.generate("fwe", 0, 4096, 0, rt.Draws(), [], 0)
    assert sample.references == ("klsjbo", "wpebbq", "yeifoi")
    smallest = sample.block_sizes[0]
    assert smallest == 30 and rt.zipf_counts(30, 5) == [18, 4, 2, 1, 0]
    for size in (smallest, 400):
        text = sample.block(size).split("\n")[1]  # type: ignore[misc]
        ranked = [w for w, _ in Counter(text.split()).most_common(4)]
        assert ranked == ["....", *sample.references]
    assert rt.string_match_all("yeifoi, klsjbo", sample.references) == 2 / 3


def test_word_list_from_text() -> None:
    assert rt.word_list(["The cat, the DOG; a cat!", "mouse-trap xy"]) == [
        "cat", "dog", "mouse", "the", "trap"]


# ----------------------------------------------------------------------------- prompts


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from pi_lora.testing import make_tokenizer

    return make_tokenizer()


def _samples(length: int, tasks: tuple[str, ...] = rt.TASK_NAMES) -> list[rt.Sample]:
    words = [f"w{chr(97 + i)}{chr(97 + j)}" for i in range(26) for j in range(26)]
    draws = rt.Draws()
    return [rt.generate(t, 0, length, 0, draws, words, length // 4) for t in tasks]


def test_shared_prompt_fits_the_length_and_holds_every_needle(tokenizer: Any) -> None:
    length = 4096
    samples = _samples(length)
    prompt = hay.build_prompt(samples, hay.noise_haystack(), tokenizer, length, 0,
                              random.Random(0))
    longest = max(len(q.ids) + q.max_new_tokens for q in prompt.questions)
    unit = len(tokenizer(hay.noise_haystack().pieces[0] + "\n")["input_ids"])
    assert length - unit - 2 <= len(prompt.context_ids) + longest <= length
    text = tokenizer.decode(prompt.context_ids)
    for sample in samples:
        assert all(needle in text for needle in sample.needles)
    chain = [text.index(line) for line in samples[4].needles]
    assert chain == sorted(chain)  # the variable chain reads in order
    assert rt.CWE_HEADER in text and rt.FWE_HEADER in text
    assert [q.task for q in prompt.questions] == list(rt.TASK_NAMES)
    assert text.count(rt.NIAH_INSTRUCTION) == 1  # four NIAH tasks, one instruction


def test_per_task_block_is_the_whole_context_and_text_haystacks(tokenizer: Any) -> None:
    (cwe,) = _samples(1024, ("cwe",))
    alone = hay.build_prompt([cwe], hay.noise_haystack(), tokenizer, 1024, 0, random.Random(0))
    text = tokenizer.decode(alone.context_ids)
    assert text.startswith(rt.CWE_HEADER) and "grass" not in text and alone.filler_pieces == 0
    assert len(alone.context_ids) + len(alone.questions[0].ids) + \
        alone.questions[0].max_new_tokens >= hay.SHORTFALL * 1024
    from pi_lora.eval.texts import Document

    story = hay.text_haystack([Document("d", "One.  Two!\nThree? Four.", "here")])
    assert story.pieces == ("One.", "Two!", "Three?", "Four.") and story.filler(6)[4] == "One."
    (single,) = _samples(512, ("niah_single",))
    prompt = hay.build_prompt([single], story, tokenizer, 512, 0, random.Random(0))
    assert single.needles[0] in tokenizer.decode(prompt.context_ids)
    with pytest.raises(PiLoraError, match="--lengths"):
        hay.build_prompt(_samples(512), hay.noise_haystack(), tokenizer, 512, 0, random.Random(0))


def test_layouts_ask_the_same_samples(tokenizer: Any) -> None:
    from pi_lora.eval.certify_run import build_prompts, make_haystack

    shared_settings = CertifySettings(trials=2, tasks=["fwe", "niah_single"])
    shared = build_prompts(shared_settings, [2048], tokenizer, make_haystack(shared_settings))[2048]
    per_task = build_prompts(shared_settings.model_copy(update={"layout": "per-task"}), [2048],
                             tokenizer, hay.noise_haystack())[2048]
    assert [len(p.questions) for p in shared] == [2, 2]  # one prefill per trial
    assert [len(p.questions) for p in per_task] == [1, 1, 1, 1]
    assert [q.task for p in shared for q in p.questions] == ["niah_single", "fwe"] * 2
    niah = [q.references for p in per_task for q in p.questions if q.task == "niah_single"]
    assert niah == [q.references for p in shared for q in p.questions if q.task == "niah_single"]
    shipped = make_haystack(CertifySettings(haystack=["shipped"]))
    assert shipped.kind == "text" and "Shakespeare" in shipped.source


def test_answer_questions_equals_generate(tiny_models: Any) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pi_lora.eval.decoding import answer_questions, end_token_ids

    path = tiny_models("llama", max_positions=512)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    context = tok("the king sees the river and the queen holds a stone. " * 12)["input_ids"]
    questions = [tok(text, add_special_tokens=False)["input_ids"]
                 for text in (" the old horse runs", " a bird", " fire and light")]
    budgets = [9, 3, 6]  # rows leave the batch at different steps
    got = answer_questions(model, context, questions, budgets, end_token_ids(model, tok))
    for question, budget, answer in zip(questions, budgets, got, strict=True):
        ids = torch.tensor([context + question])
        want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=budget, do_sample=False, pad_token_id=0)
        assert answer == want[0, ids.shape[1]:].tolist()
    stopped = answer_questions(model, context, questions, budgets, set(),
                               finished=lambda row, ids: len(ids) >= 2)
    assert [len(a) for a in stopped] == [2, 2, 2]


# ----------------------------------------------------------------------------- rules


def test_default_lengths_and_plan() -> None:
    assert default_lengths(8192, 16384) == [2048, 4096, 8192, 16384]
    assert default_lengths(4096, 32768) == [2048, 4096, 8192, 16384, 32768]
    assert default_lengths(1024, 4096) == [1024, 2048, 4096]  # the original window always
    plan = plan_lengths(CertifySettings(lengths=[2048, 16384]), 8192, 16384)
    assert plan.base_lengths == [2048, 8192]  # the original window is always the reference
    assert plan.short_lengths == [2048]


def test_threshold_rule() -> None:
    assert suite_threshold(0.6, CertifySettings())[0] == pytest.approx(0.51)
    value, rule = suite_threshold(0.0, CertifySettings())
    assert value == 0.1 and "floor" in rule  # a base that cannot do the suite
    assert suite_threshold(0.6, CertifySettings(threshold=0.3))[0] == 0.3
    assert suite_threshold(0.6, CertifySettings(threshold_ratio=0.5))[0] == pytest.approx(0.3)


def test_effective_length_rule() -> None:
    means = {2048: 0.9, 4096: 0.8, 8192: 0.6, 16384: 0.7}
    assert effective_length(means, 0.5) == 16384
    assert effective_length(means, 0.65) == 4096  # a pass after a failure does not count
    assert effective_length(means, 0.95) == 0
    assert effective_length({2048: 0.9, 4096: None, 8192: 0.9}, 0.5) == 2048  # no score fails


def _kept(ppl_ratio: float, suite: float) -> Retention:
    return Retention(ppl_ratio, {2048: suite}, suite)


def test_verdict() -> None:
    means = {2048: 0.9, 8192: 0.8, 16384: 0.7}
    passed = decide(means, (0.6, "rule"), _kept(1.01, 0.98), 16384, 0.97)
    assert passed.passed and passed.reasons == [] and passed.effective_length == 16384
    short = decide(means, (0.75, "rule"), _kept(1.0, 1.0), 16384, 0.97)
    assert not short.passed and short.effective_length == 8192
    assert short.reasons == ["effective length 8192 is below the required 16384 (suite mean "
                             "under 0.750)"]
    worse = decide(means, (0.6, "rule"), _kept(1.05, 0.95), 16384, 0.97)
    assert worse.reasons == ["perplexity retention 0.952 is below 0.97",
                             "suite retention 0.950 is below 0.97"]
    assert decide(means, (0.6, "r"), _kept(1.05, 0.95), 8192, 0.9).passed  # both configurable
    kept = retention(10.5, 10.0, {2048: 0.45, 8192: 0.4}, {2048: 0.5, 8192: 0.5}, [2048, 8192])
    assert kept.ppl_ratio == pytest.approx(1.05) and kept.ppl_retention == pytest.approx(1 / 1.05)
    assert kept.suite_ratio == pytest.approx(0.85) and kept.suite_ratio_by_length[2048] == 0.9
    nothing = retention(10.0, 10.0, {2048: 0.0}, {2048: 0.0}, [2048])
    assert nothing.suite_retention is None
    assert "cannot be measured" in decide({2048: 0.5}, (0.1, "r"), nothing, 2048, 0.97).reasons[0]
    # SmolLM2-135M: the base's own 0.064 under the floor 0.1: said first, as the real cause
    weak = decide({2048: 0.0, 8192: 0.03}, (0.1, "floor"), _kept(1.1, 1.0), 16384, 0.97,
                  base_mean=0.064)
    assert not weak.passed and weak.reasons[0].startswith("the base itself scores 0.064")
    assert "cannot certify" in weak.reasons[0]
    assert not any("base itself" in r for r in worse.reasons)


def test_card_section_replaced_not_duplicated() -> None:
    card = "# model\n\nintro\n\n## Serving at 8k\n\nserve it\n"
    once = with_certificate_section(card, "## Certificate\n\nFAIL\n")
    assert once.index("## Certificate") < once.index("## Serving")
    edited = once.replace("intro", "intro, edited by hand")
    twice = with_certificate_section(edited, "## Certificate\n\nPASS\n")
    assert twice.count("## Certificate") == 1 and "PASS" in twice and "FAIL" not in twice
    assert "edited by hand" in twice and twice.count("## Serving") == 1


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(release, base): a tiny random llama, 4096 -> 8192 linear PI, trained 2 steps."""
    from pi_lora.testing import make_tiny_model, write_corpus

    root = tmp_path_factory.mktemp("certify")
    base = make_tiny_model(root / "base", max_positions=4096)
    corpus = write_corpus(root / "corpus.txt", n_docs=40)
    recipe = {"model": {"name": str(base), "dtype": "fp32"},
              "rope": {"method": "linear", "target_context": 8192},
              "lora": {"r": 4, "alpha": 8, "trainable_extras": ["norms"]},
              "data": {"files": [str(corpus)], "seq_len": 256, "cache_dir": str(root / "cache")},
              "training": {"max_steps": 2, "per_device_batch_size": 2, "precision": "fp32",
                           "save_steps": 2, "report_to": "none"},
              "output_dir": str(root / "run")}
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", str(root / "recipe.yaml")]) == 0
    assert main(["merge", str(root / "run"), "--output", str(root / "rel")]) == 0
    return root / "rel", base


def test_random_release_fails_with_exit_1(release: tuple[Path, Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    rel, base = release
    code = main(["certify", str(rel), "--base", str(base), "--lengths", "4k,8k", "--trials", "1",
                 "--dtype", "fp32"])
    assert code == 1
    assert "FAIL" in capsys.readouterr().out
    data = json.loads((rel / cert.CERTIFICATE_FILE).read_text())
    verdict = data["verdict"]
    assert not verdict["passed"] and verdict["effective_length"] == 0
    assert verdict["threshold"] == 0.1  # the floor: the random base scores nothing
    assert data["lengths"] == {"release": [4096, 8192], "base": [4096], "short": [4096]}
    answers = data["scores"]["release"]["answers"]
    assert len(answers) == 2 * 7 and {a["task"] for a in answers} == set(rt.TASK_NAMES)
    assert all(a["context_tokens"] + a["question_tokens"] + a["max_new_tokens"] <= a["length"]
               for a in answers)
    assert data["protocol"]["settings"]["trials"] == 1 and data["command"][:2] == [
        "pi-lora", "certify"]
    ppl = data["scores"]["release"]["perplexity"]
    assert ppl["length"] == 4096 and ppl["windows"] == 2
    card = (rel / "README.md").read_text()
    assert card.count("## Certificate") == 1 and "**FAIL**" in card


def test_passing_verdict_exits_0_and_replaces_the_card(
        release: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    rel, base = release
    (rel / "README.md").write_text((rel / "README.md").read_text() + "\nMy own note.\n")

    def passing(inputs: Any, settings: Any, base_scores: Any, release_scores: Any) -> Any:
        return decide({8192: 1.0}, (0.5, "forced for the test"), _kept(1.0, 1.0), 8192, 0.97)

    monkeypatch.setattr(cert, "judge", passing)
    out = rel.parent / "elsewhere" / "cert.json"
    out.parent.mkdir()
    code = main(["certify", str(rel), "--base", str(base), "--lengths", "4k,8k", "--trials", "2",
                 "--tasks", "niah_single,vt", "--dtype", "fp32", "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert data["verdict"]["passed"] and data["protocol"]["settings"]["tasks"] == ["niah_single",
                                                                                   "vt"]
    assert len(data["scores"]["base"]["answers"]) == 2 * 2
    card = (rel / "README.md").read_text()
    assert card.count("## Certificate") == 1 and "**PASS**" in card and "My own note." in card


def test_bad_input_exits_2(release: tuple[Path, Path], tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    from pi_lora.testing import make_tiny_model

    rel, base = release
    before = (rel / cert.CERTIFICATE_FILE).read_bytes() if (rel / cert.CERTIFICATE_FILE).exists() \
        else None
    assert main(["certify", str(tmp_path / "nope"), "--base", str(base)]) == 2
    assert "not a release" in capsys.readouterr().err
    other = make_tiny_model(tmp_path / "other", max_positions=4096, seed=1)
    assert main(["certify", str(rel), "--base", str(other), "--lengths", "4k,8k"]) == 2
    err = capsys.readouterr().err
    assert "--base" in err and "is not the base" in err and str(base) in err
    assert main(["certify", str(rel), "--base", str(base), "--lengths", "4k,16k"]) == 2
    assert "past the release's 8192-token window" in capsys.readouterr().err
    assert main(["certify", str(rel), "--base", str(base), "--lengths", "4k"]) == 2
    assert "required length" in capsys.readouterr().err
    assert main(["certify", str(rel), "--base", str(base), "--trials", "0"]) == 2
    assert "--trials" in capsys.readouterr().err
    assert main(["certify", str(rel), "--base", str(tmp_path / "missing")]) == 2
    assert "--base" in capsys.readouterr().err
    # a copy of the right base elsewhere is the same base (compared by content)
    import shutil

    copy = shutil.copytree(base, tmp_path / "copy")
    from pi_lora.eval.certify_run import prepare

    assert prepare(str(rel), str(copy), CertifySettings(lengths=[4096, 8192])).plan.target == 8192
    after = (rel / cert.CERTIFICATE_FILE).read_bytes() if (rel / cert.CERTIFICATE_FILE).exists() \
        else None
    assert after == before  # bad input writes nothing
