"""The evaluation section `pi-lora eval` writes into a release's model card: placed before the
serving notes, replaced (never stacked) by a later eval, the rest of the card untouched, and a
read-only release reported instead of failing the eval."""

from __future__ import annotations

from pathlib import Path

import pytest

from pi_lora.eval.card_results import eval_section, update_release_cards
from pi_lora.release.files import RELEASE_RECIPE_FILE
from pi_lora.release.model_card import EVAL_BEGIN, EVAL_END, with_eval_section

CARD = "---\nlicense: mit\n---\n# model\n\nintro\n\n## Serving at 16,384 tokens\n\n- vLLM\n"


def _report(release: Path, ppl: dict[str, float], accuracy: dict[str, float] | None,
            k_max: int = 0) -> dict:
    target = {
        "label": "rel [release]", "describe": {"kind": "release", "model": str(release)},
        "facts": {"dtype": "bfloat16", "device": "cuda:0"},
        "perplexity": {"by_length": {n: {"ppl": v} for n, v in ppl.items()}, "failures": {}},
        "passkey": None if accuracy is None else {
            "accuracy_by_length": accuracy, "failures": {}, "k_max": k_max},
    }
    protocol = {"perplexity": {"scoring": "sliding window", "max_windows": 8,
                               "documents": [{"name": "pg19-1"}]}}
    if accuracy is not None:
        protocol["passkey"] = {"depths": [0, 0.5, 1], "trials_per_cell": 2, "seed": 0,
                               "k_max_threshold": 0.9}
    base = {"label": "base", "describe": {"kind": "base", "model": "x"}, "facts": {},
            "perplexity": None, "passkey": None}
    return {"created": "2026-11-28T00:00:00", "protocol": protocol, "targets": [base, target],
            "versions": {"torch": "2.13.0", "transformers": "5.24.0"}}


@pytest.fixture()
def release(tmp_path: Path) -> Path:
    path = tmp_path / "rel"
    path.mkdir()
    (path / RELEASE_RECIPE_FILE).write_text("{}\n")
    (path / "README.md").write_text(CARD)
    return path


def test_section_goes_before_serving_and_is_replaced(release: Path) -> None:
    report = _report(release, {"8192": 7.123, "16384": 7.456}, {"8192": 1.0, "16384": 0.95},
                     k_max=16384)
    assert update_release_cards(report, ["pi-lora", "eval", str(release)]) == [
        f"{release / 'README.md'}: evaluation section written"]
    card = (release / "README.md").read_text()
    assert card.index(EVAL_BEGIN) < card.index("## Evaluation") < card.index(EVAL_END) \
        < card.index("## Serving")
    assert "| tokens | 8k | 16k |" in card and "| perplexity | 7.12 | 7.46 |" in card
    assert "| passkey accuracy | 100% | 95% |" in card and "**k_max 16k**" in card
    assert f"Command: `pi-lora eval {release}`" in card
    assert "3 depths x 2 trials" in card and "on pg19-1" in card and "bfloat16 on cuda:0" in card
    assert card.startswith(CARD[:CARD.index("## Serving")])  # the rest kept as it was

    later = _report(release, {"4096": 6.5}, None)
    update_release_cards(later, ["pi-lora", "eval"])
    card = (release / "README.md").read_text()
    assert card.count(EVAL_BEGIN) == card.count("## Evaluation") == 1
    assert "| perplexity | 6.50 |" in card and "passkey" not in card and "7.12" not in card
    assert card.endswith("## Serving at 16,384 tokens\n\n- vLLM\n")


def test_section_without_serving_notes_goes_last() -> None:
    card = with_eval_section("# a card\n", "## Evaluation\n\nx\n")
    assert card == f"# a card\n\n{EVAL_BEGIN}\n## Evaluation\n\nx\n{EVAL_END}\n"
    assert with_eval_section(card, "## Evaluation\n\ny") == card.replace("\nx\n", "\ny\n")


def test_lengths_measured_by_one_side_only_leave_blank_cells(release: Path) -> None:
    report = _report(release, {"4096": 9.0}, {"8192": 0.5})
    text = eval_section(report, report["targets"][1], ["pi-lora", "eval"])
    assert "| perplexity | 9.00 |  |" in text and "| passkey accuracy |  | 50% |" in text
    assert "**k_max 0**" in text


def test_a_card_that_cannot_be_written_is_reported_not_fatal(
        release: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pi_lora.eval import card_results

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(card_results.os, "replace", refuse)
    notes = update_release_cards(_report(release, {"4096": 9.0}, None), ["pi-lora"])
    assert "not updated (Permission denied)" in notes[0]
    assert (release / "README.md").read_text() == CARD
    assert sorted(p.name for p in release.iterdir()) == ["README.md", RELEASE_RECIPE_FILE]
