"""`pi-lora plan`: runs offline for every shipped recipe, its terms match what autograd saves,
and its CPU memory prediction stays within 15% of the peak RSS of real pi-lora steps."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import plan_validation as validation
from benchmarks.plan_validation import TOLERANCE, Case, Row
from pi_lora.cli import main
from pi_lora.plan import get_device, plan_recipe
from pi_lora.plan.memory import layer_activation_bytes_per_token
from pi_lora.plan.setup import setup_from_recipe
from pi_lora.plan.shape import model_shape
from pi_lora.recipe.loading import load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def _plan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("\n{") + 1:] if not out.startswith("{") else out)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_shipped_recipe_plans_offline(recipe: Path, tiny_models, capsys) -> None:
    overrides = ["--set", f"model.name={tiny_models()}"] if recipe.stem == "tiny" else []
    plan = _plan_json(capsys, str(recipe), *overrides, "--gpu", "h100-80gb", "--gpus", "8")
    memory, time = plan["memory"], plan["time"]
    assert (memory["verdict"] == "does not fit") == (memory["peak_bytes"] > memory["device_bytes"])
    assert memory["peak_bytes"] == pytest.approx(sum(t["bytes"] for t in memory["terms"]), rel=1e-6)
    assert time["step_seconds"] > 0 and time["device_hours"] > 0
    assert time["flops_per_step"] == pytest.approx(
        time["flops_per_token"] * plan["setup"]["seq_len"] * plan["setup"]["grad_accum"]
        * plan["setup"]["batch"] * 8 // plan["setup"]["sequence_parallel"])


def test_table_names_every_part_of_the_issue(capsys) -> None:
    assert main(["plan", str(REPO / "recipes/llama2-7b-16k.yaml"), "--gpu", "a100-40gb"]) == 0
    table = capsys.readouterr().out
    for needle in ("weights (bf16)", "optimizer states", "checkpointed layer inputs",
                   "recompute working set", "logits / loss", "attention workspace", "total",
                   "FLOPs", "tokens/s", "a100-40gb-hours", "recommendations"):
        assert needle in table


def test_unknown_device_is_a_user_error(capsys) -> None:
    assert main(["plan", str(REPO / "recipes/llama2-7b-8k.yaml"), "--gpu", "tpu-v9"]) == 2
    assert "h100-80gb" in capsys.readouterr().err


def test_reference_anchors_for_llama3_8b() -> None:
    """reference.md: checkpointed inputs 2*D*L bytes/token; fp32 logits 16.8 GB at 32k."""
    recipe = load_recipe(REPO / "recipes/llama3-8b-32k.yaml",
                         ["training.chunked_loss=false", "training.deepspeed=null"])
    plan = plan_recipe(recipe, get_device("h100-80gb"), advise=False)
    terms = {t.name: t.bytes for t in plan.memory.terms}
    assert terms["checkpointed layer inputs"] == 2 * 4096 * 32 * 32768
    assert terms["logits / loss (backward)"] > 32768 * 128256 * 4 * 3  # >= 3 fp32 [T,V] buffers
    chunked = plan_recipe(load_recipe(REPO / "recipes/llama3-8b-32k.yaml"),
                          get_device("h100-80gb"), advise=False)
    assert chunked.memory.peak_bytes < plan.memory.peak_bytes - 40e9


def test_flops_formula_and_s2_attention() -> None:
    recipe = load_recipe(REPO / "recipes/llama2-7b-32k.yaml", ["training.s2_attn=false"])
    plan = plan_recipe(recipe, get_device("h100-80gb"), advise=False)
    shape, time = plan.shape, plan.time
    attention = 4 * 2 * 32 * 4096 * 32768  # (3 + recompute) x 2*L*H*d*T
    linear = 4 * shape.matmul_params + 2 * shape.trainable_params
    recompute = 2 * (shape.matmul_params - 32000 * 4096)
    assert time.flops_per_token == linear + recompute + attention
    s2 = plan_recipe(load_recipe(REPO / "recipes/llama2-7b-32k.yaml"), get_device("h100-80gb"),
                     advise=False)
    assert s2.time.flops_per_token == pytest.approx(linear + recompute + attention / 4, rel=1e-3)


def test_70b_on_one_consumer_gpu_gets_advice() -> None:
    recipe = load_recipe(REPO / "recipes/llama2-70b-32k.yaml", ["training.deepspeed=null"])
    plan = plan_recipe(recipe, get_device("rtx4090"))
    assert plan.verdict == "does not fit"
    names = {r.name for r in plan.recommendations}
    assert "QLoRA (nf4 base)" in names and "ZeRO-3 + CPU offload" in names


def test_activation_terms_match_what_autograd_saves(tiny_models) -> None:
    """The per-layer formula against saved_tensors_hooks on a real peft-wrapped layer (fp32)."""
    from pi_lora.model.loading import load_config, load_model, wrap_lora

    recipe = load_recipe(_write_tiny_recipe(tiny_models("llama")))
    config = load_config(recipe.model)
    model = wrap_lora(load_model(recipe.model, None), recipe.lora, gradient_checkpointing=False)
    model.train()
    measured = _saved_bytes_per_token(model, tokens=96)
    setup = setup_from_recipe(recipe, gpus=1, nodes=1, device_kind="cpu")
    predicted = layer_activation_bytes_per_token(model_shape(recipe, config), setup)
    assert predicted == pytest.approx(measured, rel=0.02)


def _write_tiny_recipe(model_dir: Path) -> Path:
    path = model_dir.parent / "plan-recipe.yaml"
    path.write_text(f"model: {{name: {model_dir}, dtype: fp32}}\n"
                    "rope: {method: linear, target_context: 256}\n"
                    "lora: {r: 4, trainable_extras: [norms]}\n"
                    "data: {files: [unused.txt]}\noutput_dir: unused\n")
    return path


def _saved_bytes_per_token(model, tokens: int) -> float:
    """Bytes of distinct non-parameter storages autograd saves in decoder layer 0."""
    decoder = model.get_base_model().model
    layer = decoder.layers[0]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    hidden = torch.randn(1, tokens, model.config.hidden_size, requires_grad=True)
    positions = torch.arange(tokens)[None]
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(hidden, attention_mask=None, position_ids=positions,
              position_embeddings=decoder.rotary_emb(hidden, positions))
    return sum(saved.values()) / tokens


# ----------------------------------------------------------------------------- validation


def _assert_no_drift(rows: list[Row]) -> None:
    """The tolerance check of every validation test: each predicted peak within TOLERANCE."""
    assert rows, "no validation case could run"
    off = validation.drifted(rows)
    assert not off, (f"{', '.join(row.case for row in off)} drifted beyond {TOLERANCE:.0%}:\n"
                     f"{validation.markdown(rows)}")


def _check(cases: tuple[Case, ...], work_dir: Path) -> None:
    for case in cases:  # build the random models once, before workers share them
        validation.case_recipe(case, work_dir)
    with ThreadPoolExecutor(max_workers=2) as pool:  # each case is its own process
        rows = list(pool.map(lambda case: validation.validate((case,), work_dir), cases))
    _assert_no_drift([row for found in rows for row in found])


def test_plan_predicts_cpu_peak_rss_of_real_steps(tmp_path: Path) -> None:
    """fp32 random Llamas at 256-2048 tokens: chunked and plain loss, with and without extras."""
    _check(validation.FAST_CASES, tmp_path)


@pytest.mark.slow
def test_plan_predicts_cpu_peak_rss_fp32_slow(tmp_path: Path) -> None:
    _check(tuple(c for c in validation.SLOW_CASES if c.dtype == "fp32"), tmp_path)


@pytest.mark.slow
def test_plan_predicts_cpu_peak_rss_bf16(tmp_path: Path) -> None:
    """bf16 without checkpointing or extras, and SmolLM2 loaded from its GGUF (load peak)."""
    _check(tuple(c for c in validation.SLOW_CASES if c.dtype == "bf16"), tmp_path)


def test_drift_would_fail() -> None:
    """The check the validation tests run fails on a prediction 20% off either way, names the
    row, passes one within the tolerance, and fails when no case could run at all."""
    def row(name: str, predicted: int) -> Row:
        return Row(name, predicted_bytes=predicted, measured_bytes=1000,
                   predicted_step_bytes=predicted, measured_step_bytes=1000)

    good, over, under = row("good", 1100), row("over", 1200), row("under", 800)
    _assert_no_drift([good])
    with pytest.raises(AssertionError, match=r"^over drifted beyond 15%"):
        _assert_no_drift([good, over])
    with pytest.raises(AssertionError, match=r"^under drifted"):
        _assert_no_drift([under, good])
    with pytest.raises(AssertionError, match="no validation case could run"):
        _assert_no_drift([])


def test_worker_peak_is_its_own_not_the_parents(tmp_path: Path) -> None:
    """A worker started by a parent with a large resident set reports its own peak, and
    reset_peak forgets what the worker itself freed (ru_maxrss would report the parent's)."""
    worker = ("import sys; from benchmarks import harness\n"
              "first = harness.peak_bytes('cpu')\n"
              "block = b'x' * (300 << 20); del block\n"
              "grown = harness.peak_bytes('cpu')\n"
              "reset = harness.reset_peak('cpu')\n"
              "harness.print_result({'first': first, 'grown': grown, 'reset': reset,\n"
              "                      'after': harness.peak_bytes('cpu')})\n")
    parent = ("import json, resource, sys; from benchmarks import harness\n"
              "ballast = b'x' * (800 << 20)\n"
              f"done = harness.run_worker(['-c', {worker!r}], harness.worker_env(), 300)\n"
              "own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
              "print(json.dumps({**done.result, 'parent': own}))\n")
    done = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True,
                          timeout=300, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    peaks = json.loads(done.stdout.splitlines()[-1])
    assert peaks["parent"] > 800 << 20
    assert peaks["first"] < peaks["parent"] - (500 << 20), peaks  # not the parent's peak
    assert peaks["grown"] > peaks["first"] + (250 << 20), peaks  # the worker's own growth
    assert peaks["reset"] and peaks["after"] < peaks["grown"] - (250 << 20), peaks


def test_offloaded_checkpoints_leave_one_layer_on_the_device() -> None:
    recipe = load_recipe(REPO / "recipes/llama2-7b-16k.yaml")
    plain = plan_recipe(recipe, get_device("h100-80gb"), gpus=8, nodes=1)
    moved = plan_recipe(load_recipe(REPO / "recipes/llama2-7b-16k.yaml",
                                    ["training.offload_checkpoints=true"]),
                        get_device("h100-80gb"), gpus=8, nodes=1)
    s, shape = plain.setup, plain.shape
    layer_input = s.batch * s.seq_len * shape.hidden * s.dtype_bytes
    saved = (shape.layers - 1) * layer_input
    assert plain.memory.step_peak_bytes - moved.memory.step_peak_bytes == pytest.approx(
        saved * 1.08, rel=0.01)  # + the fragmentation share of those bytes
    assert moved.memory.host_bytes_per_node - plain.memory.host_bytes_per_node == \
        shape.layers * layer_input * 8
    assert moved.time.offload_seconds > plain.time.offload_seconds


def test_plan_and_recipe_agree_on_the_attention_path(tmp_path: Path) -> None:
    """S2-Attn runs on sdpa: no FlashAttention-2 credit or advice beside it; a recipe asking
    for both, or S2-Attn on packed conversations, is refused instead of silently changed."""
    from pi_lora.core.errors import RecipeErrors

    s2 = load_recipe(REPO / "recipes/llama2-7b-32k.yaml")
    plan = plan_recipe(s2, get_device("h100-80gb"), gpus=8)
    assert "FlashAttention-2" not in {r.name for r in plan.recommendations}
    assert any("sdpa attention" in note for note in plan.time.notes)
    fa2 = load_recipe(REPO / "recipes/llama2-7b-8k.yaml",
                      ["model.attn_implementation=flash_attention_2"])
    advice = {r.name: r for r in plan_recipe(fa2, get_device("h100-80gb"), gpus=8).recommendations}
    if "S2-Attn" in advice:
        assert "model.attn_implementation=sdpa" in advice["S2-Attn"].overrides
    for override in ("model.attn_implementation=flash_attention_2", "data.format=chat"):
        with pytest.raises(RecipeErrors) as info:
            load_recipe(REPO / "recipes/llama2-7b-32k.yaml", [override])
        assert [e.field for e in info.value.errors] == ["training.s2_attn"]


def test_70b_merge_is_planned_with_its_ram(capsys) -> None:
    """The 70B release is made in host RAM far below the model's size (the merge streams)."""
    from pi_lora.cli import main

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "llama2-70b-32k.yaml"
    assert main(["plan", str(recipe), "--gpu", "h100-80gb", "--gpus", "8", "--json"]) == 0
    merge = json.loads(capsys.readouterr().out)["merge"]
    gib = 2**30
    assert 5 * gib < merge["peak_bytes"] < 16 * gib  # one 5 GB shard + embeddings + runtime
    assert merge["full_check_bytes"] > 700 * gib  # why the 70B check runs layer by layer
    assert merge["probe_tokens"] == 4096 + 128


def test_sequence_parallel_divides_activations_and_adds_all_to_all() -> None:
    """qwen2.5-7b-128k on 8 H100s: 2-way sequence parallelism fits where S2-Attn alone did
    not; per-device token terms are halved, and each layer's 4 exchanges of q, k, v and the
    output (x3 with backward, +1 recomputed) are in the step time."""
    from pi_lora.plan.compute import all_to_all_bytes

    path = REPO / "recipes/qwen2.5-7b-128k.yaml"
    h100 = get_device("h100-80gb")
    split = plan_recipe(load_recipe(path), h100, gpus=8)
    whole = plan_recipe(load_recipe(path, ["training.sequence_parallel=1",
                                           "training.s2_attn=true"]), h100, gpus=8)
    assert split.memory.fits and not whole.memory.fits
    s, shape = split.setup, split.shape
    assert (s.groups, s.grad_accum, s.global_batch) == (4, 16, 64)
    terms = {t.name: t.bytes for t in split.memory.terms}
    assert terms["checkpointed layer inputs"] == shape.layers * 131072 // 2 * shape.hidden * 2
    width = 2 * shape.hidden + 2 * shape.kv_dim  # 4 kv heads: no repetition for 2 ranks
    assert all_to_all_bytes(shape, s) == shape.layers * 65536 * width * 2 * 0.5 * 4
    assert split.time.all_to_all_seconds > 0 and whole.time.all_to_all_seconds == 0
    advice = {r.name: r for r in whole.recommendations}
    assert advice["sequence parallel x2"].fits  # the smallest size that fits, alone
    assert "training.s2_attn=false" in advice["sequence parallel x2"].overrides
    assert not any(name.startswith("sequence parallel x4") for name in advice)


def test_sequence_parallel_sizes_follow_the_heads() -> None:
    from pi_lora.core.errors import PiLoraError

    path = REPO / "recipes/qwen2.5-7b-128k.yaml"  # 28 heads, 4 KV heads
    with pytest.raises(PiLoraError, match="28 attention heads, not divisible by 8") as info:
        plan_recipe(load_recipe(path, ["training.sequence_parallel=8"]), get_device("h100-80gb"),
                    gpus=8)
    assert info.value.field == "training.sequence_parallel"
    assert "[1, 2, 4, 28]" in info.value.fix  # 7 and 14 would split the 4 KV heads unevenly


def test_tiled_mlp_saves_the_mlp_intermediates_and_recomputes_them() -> None:
    path = REPO / "recipes/qwen2.5-7b-128k.yaml"
    h100 = get_device("h100-80gb")
    plain = plan_recipe(load_recipe(path), h100, gpus=8, advise=False)
    tiled = plan_recipe(load_recipe(path, ["training.tiled_mlp=true"]), h100, gpus=8,
                        advise=False)
    shape, tokens = plain.shape, plain.setup.local_tokens
    def working_set(plan: Any) -> float:
        terms = plan.memory.moments["backward of the last layer"]
        return next(t.bytes for t in terms if t.name == "recompute working set (1 layer)")

    saved = working_set(plain) - working_set(tiled)
    assert saved > tokens * 2 * 3 * shape.intermediate  # at least the [T, 3F] bf16 it saved
    assert tiled.time.flops_per_token - plain.time.flops_per_token == \
        2 * 3 * shape.hidden * shape.intermediate * shape.layers
