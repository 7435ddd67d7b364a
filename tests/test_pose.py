"""PoSE: position ids that skip ahead inside short rows (pi_lora/data/pose.py), in the collator,
the recipe checks, training and the planner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pi_lora.core.errors import RecipeErrors
from pi_lora.data.build import PackedCollator
from pi_lora.data.pose import PoseSkips, skip_positions
from pi_lora.recipe.loading import load_recipe


def _draws(n: int, target: int, chunks: int, rows: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [skip_positions(n, target, chunks, rng) for _ in range(rows)]


@pytest.mark.parametrize("chunks", [1, 2, 3, 5])
def test_positions_increase_start_at_zero_and_stay_below_the_target(chunks: int) -> None:
    for pos in _draws(64, 512, chunks, 500):
        assert pos[0] == 0 and len(pos) == 64
        assert (np.diff(pos) >= 1).all()
        assert pos[-1] <= 511
        # `chunks` pieces at most: a jump > 1 only where a new piece starts
        assert (np.diff(pos) > 1).sum() <= chunks - 1


def test_relative_distances_cover_the_target_window() -> None:
    """Coverage: over 2000 rows of 64 tokens with 2 pieces, every relative distance 1..511
    between a query and an earlier key occurs, and the longest distance seen in a row is
    spread over the whole range (no quarter of [63, 511] gets under 10% of the rows)."""
    n, target = 64, 512
    seen = np.zeros(target, dtype=bool)
    spans = []
    for pos in _draws(n, target, 2, 2000):
        seen[np.unique((pos[:, None] - pos[None, :])[np.tril_indices(n, -1)])] = True
        spans.append(pos[-1] - pos[0])
    assert seen[1:].all(), np.flatnonzero(~seen[1:]) + 1
    counts, _ = np.histogram(spans, bins=4, range=(n - 1, target - 1))
    assert counts.min() >= 0.1 * len(spans), counts


def test_no_room_to_skip_is_plain_positions() -> None:
    for chunks in (1, 2, 4):
        for pos in _draws(32, 32, chunks, 20):
            assert np.array_equal(pos, np.arange(32))


def test_bad_shapes_are_refused() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="chunks"):
        skip_positions(4, 16, 5, rng)
    with pytest.raises(ValueError, match="does not fit"):
        skip_positions(32, 16, 2, rng)


def test_collator_draws_by_row_content_and_adds_a_mask() -> None:
    pose = PoseSkips(target_context=256, chunks=2, seed=7, seq_len=16)
    rows = [{"input_ids": list(range(10, 26))}, {"input_ids": list(range(40, 56))},
            {"input_ids": list(range(3, 11))}]  # a short_mix row: plain positions
    batch = PackedCollator(0, pose)(rows)
    assert batch["attention_mask"].tolist() == [[1] * 16, [1] * 16, [1] * 8 + [0] * 8]
    assert batch["position_ids"][2, :8].tolist() == list(range(8))
    assert torch.equal(batch["labels"][0], batch["input_ids"][0])
    again = PackedCollator(0, pose)(rows[::-1])  # same rows, other order, fresh collator
    assert torch.equal(again["position_ids"][2], batch["position_ids"][0])
    assert torch.equal(again["position_ids"][1], batch["position_ids"][1])
    other_seed = PackedCollator(0, PoseSkips(256, 2, 8, 16))(rows)
    assert not torch.equal(other_seed["position_ids"][:2], batch["position_ids"][:2])
    assert "position_ids" not in PackedCollator(0)(rows)  # off: unchanged collator


def test_skipped_positions_are_not_read_as_packed_documents(tiny_models) -> None:
    """transformers starts a new document wherever position ids do not step by one. The mask
    the collator adds turns that off: the last token's logits depend on the first piece.
    (Training runs without a KV cache, which is when transformers looks for documents.)"""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32)
    ids = torch.randint(5, 300, (1, 16))
    pos = torch.cat([torch.arange(8), torch.arange(8) + 50]).unsqueeze(0)
    changed = ids.clone()
    changed[0, 0] = ids[0, 0] + 1
    with torch.no_grad():
        def last(x: torch.Tensor, **kw: torch.Tensor) -> torch.Tensor:
            return model(x, position_ids=pos, use_cache=False, **kw).logits[0, -1]
        ones = torch.ones_like(ids)
        assert not torch.allclose(last(ids, attention_mask=ones), last(changed, attention_mask=ones))
        # without the mask the two pieces could not see each other (why the collator adds it)
        assert torch.allclose(last(ids), last(changed))


def test_zero_skips_train_exactly_like_plain_training(tiny_models, write_recipe) -> None:
    """Rows as long as the target leave nothing to skip: the loss curve is plain training's.
    (A recipe refuses that setting, so the collator is driven directly.)"""
    from pi_lora.train.loss import causal_lm_loss

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models("llama"), dtype=torch.float32)
    rows = [{"input_ids": torch.randint(5, 300, (64,)).tolist()} for _ in range(2)]
    plain = PackedCollator(0)(rows)
    posed = PackedCollator(0, PoseSkips(target_context=64, chunks=2, seed=0, seq_len=64))(rows)
    assert torch.equal(posed["position_ids"], torch.arange(64).expand(2, 64))
    with torch.no_grad():
        a = causal_lm_loss(model, plain["input_ids"], plain["labels"])
        b = causal_lm_loss(model, posed["input_ids"], posed["labels"],
                           attention_mask=posed["attention_mask"],
                           position_ids=posed["position_ids"])
    assert torch.allclose(a, b, atol=1e-6)


def test_recipe_checks_name_the_field(write_recipe, tiny_models) -> None:
    model = tiny_models("llama")
    for data, needle in (({"pose": {"chunks": 2}}, "below the target"),
                         ({"pose": {}, "seq_len": 64, "format": "chat"}, "conversations"),
                         ({"pose": {"chunks": 65}, "seq_len": 64}, "chunks")):
        with pytest.raises(RecipeErrors) as caught:
            load_recipe(write_recipe(model, data=data))
        assert "data.pose" in str(caught.value) and needle in str(caught.value), caught.value
    ok = load_recipe(write_recipe(model, data={"pose": {"chunks": 3}, "seq_len": 64}))
    assert ok.data.pose.chunks == 3 and ok.seq_len == 64


def test_pose_training_runs_sees_long_positions_and_plans_at_seq_len(
        tiny_models, write_recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PoSE run trains at 64-token rows with positions reaching past the base's 128
    window, lowers the loss, and the planner sizes activations at 64 tokens, not 256."""
    from pi_lora.plan.setup import setup_from_recipe
    from pi_lora.train import loss as loss_module
    from pi_lora.train.assembly import train

    seen: list[int] = []
    real = loss_module.causal_lm_loss

    def spy(model, input_ids, labels, **kw):
        if kw.get("position_ids") is not None:
            seen.append(int(kw["position_ids"].max()))
            assert kw.get("attention_mask") is not None
        return real(model, input_ids, labels, **kw)

    monkeypatch.setattr(loss_module, "causal_lm_loss", spy)
    path = write_recipe(tiny_models("llama"), data={"pose": {"chunks": 2}, "seq_len": 64},
                        training={"max_steps": 8})
    recipe = load_recipe(path)
    assert setup_from_recipe(recipe, gpus=1, nodes=1, device_kind="gpu").seq_len == 64
    run = train(recipe)
    assert len(seen) == 8 and max(seen) > 127 and max(seen) <= 255, seen
    import json
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) < sum(losses[:3]), losses


def test_the_smollm2_evidence_rows_are_valid_pose_recipes() -> None:
    """`make evidence-smollm2`'s three fine-tunes: one recipe, rope method overridden."""
    from benchmarks import evidence_smollm2 as smollm2

    for _, _, extra in smollm2.FINE_TUNES:
        overrides = [extra[i + 1] for i in range(0, len(extra), 2)]
        recipe = load_recipe(smollm2.RECIPE, overrides)
        assert recipe.seq_len == 2048 and recipe.data.pose.chunks == 2
        assert recipe.rope.target_context == smollm2.TARGET == 16384
        assert recipe.training.global_batch(1) == 1
    assert {load_recipe(smollm2.RECIPE, [e[1]] if e else []).rope.method
            for _, _, e in smollm2.FINE_TUNES} == {"linear", "yarn", "none"}
