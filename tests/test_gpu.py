"""The CUDA path of `pi-lora train / merge / eval` on tiny models: `pytest -m gpu`.

Every test is marked `gpu` (deselected by the default run) and skipped without a CUDA GPU or
without the package it exercises, saying which. `PI_LORA_GPU_REHEARSAL=1` runs the tests that
have a CPU meaning on the CPU instead of skipping them: a rehearsal of this file, so the one
GPU window is not spent on a typo. Each tolerance is stated beside the test that uses it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from pi_lora.cli import main
from pi_lora.recipe.loading import deep_merge, load_recipe
from pi_lora.train.assembly import train

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parent.parent
REHEARSAL = os.environ.get("PI_LORA_GPU_REHEARSAL") == "1"

# bf16 against fp32, same steps: bf16 rounds weights and activations by up to 2^-9 relative.
# Measured on the CPU rehearsal: 4e-5 at most over the six losses (CPU runs the head matmuls in
# fp32); CUDA adds bf16 head matmuls. 5e-3 leaves two orders of magnitude for that and is still
# far below what a broken bf16 path does to the loss (an fp32 extra cast away, a lost autocast).
BF16_RTOL = 5e-3
# The first logged loss is the forward before any update (LoRA B starts at zero, so dropout
# cannot touch it): fp32 on CUDA equals the CPU pin up to summation order.
FIRST_LOSS_RTOL = 1e-5


@pytest.fixture()
def device() -> torch.device:
    """CUDA, or the CPU under PI_LORA_GPU_REHEARSAL=1; else the test is skipped."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return torch.device("cuda")
    if REHEARSAL:
        return torch.device("cpu")
    pytest.skip("no CUDA GPU (PI_LORA_GPU_REHEARSAL=1 runs this test on the CPU)")


@pytest.fixture()
def cuda() -> torch.device:
    """For what only means something on CUDA: pinned memory, NCCL, CUDA kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (no CPU rehearsal)")
    return torch.device("cuda")


def _losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def _train(write_recipe: Any, tmp_path: Path, model_dir: Path, name: str, **sections: Any) -> Path:
    """Train write_recipe's tiny recipe (with `sections` merged in) into tmp_path/name."""
    path = write_recipe(model_dir, f"{name}.yaml", output_dir=str(tmp_path / name), **sections)
    return train(load_recipe(path))


BF16 = {"model": {"dtype": "bf16"}, "training": {"precision": "bf16"}}
NO_DROPOUT = {"lora": {"dropout": 0.0}}  # dropout masks come from the device's RNG


# ----------------------------------------------------------------------------- training


def test_bf16_training_on_cuda_tracks_the_fp32_reference(device, tiny_models, write_recipe,
                                                         tmp_path: Path) -> None:
    from test_train_merge import PINNED_TINY_LOSSES

    model = tiny_models("llama")
    reference = _losses(_train(write_recipe, tmp_path, model, "fp32", **NO_DROPOUT))
    half = _losses(_train(write_recipe, tmp_path, model, "bf16", **deep_merge(BF16, NO_DROPOUT)))
    drift = max(abs(h / r - 1) for h, r in zip(half, reference, strict=True))
    print(f"bf16 vs fp32 on {device.type}: largest relative loss difference {drift:.2e}")
    assert reference[0] == pytest.approx(PINNED_TINY_LOSSES[0], rel=FIRST_LOSS_RTOL)
    assert half == pytest.approx(reference, rel=BF16_RTOL), (half, reference)
    assert half[-1] < half[0]
    if device.type == "cuda":
        assert torch.cuda.max_memory_allocated() > 0, "training did not run on the GPU"


def test_offload_checkpoints_trains_like_without(cuda, tiny_models, write_recipe,
                                                 tmp_path: Path) -> None:
    """save_on_cpu moves the checkpointed layer inputs to pinned host memory and back: exact
    copies, so the losses agree to CUDA's run-to-run noise (atomics in attention backward)."""
    model = tiny_models("llama")
    settings = deep_merge(BF16, {**NO_DROPOUT, "training": {"max_steps": 3}})
    plain = _losses(_train(write_recipe, tmp_path, model, "plain", **settings))
    offload = deep_merge(settings, {"training": {"offload_checkpoints": True}})
    assert _losses(_train(write_recipe, tmp_path, model, "offload", **offload)) == \
        pytest.approx(plain, rel=1e-4)


def test_s2_attn_trains_on_cuda(device, tiny_models, write_recipe, tmp_path: Path) -> None:
    settings = deep_merge(BF16, {"training": {"max_steps": 3, "s2_attn": True}})
    losses = _losses(_train(write_recipe, tmp_path, tiny_models("llama"), "s2", **settings))
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


def _chat_file(path: Path, rows: int = 80) -> Path:
    from pi_lora.testing import synthetic_text

    docs = synthetic_text(2 * rows, words_per_doc=20)
    lines = [json.dumps({"messages": [{"role": "user", "content": docs[2 * i]},
                                      {"role": "assistant", "content": docs[2 * i + 1]}]})
             for i in range(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("data_format", ["pretrain", "chat"])
def test_flash_attention_2_trains_like_sdpa(cuda, data_format: str, tiny_models, write_recipe,
                                            tmp_path: Path) -> None:
    """FA2 against sdpa, bf16; with chat data the rows are packs of conversations whose
    position ids restart, which FA2 must read as separate sequences (varlen) as sdpa does."""
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    settings = deep_merge(BF16, {**NO_DROPOUT, "training": {"max_steps": 3}})
    if data_format == "chat":
        chat = _chat_file(tmp_path / "chat.jsonl")
        settings = deep_merge(settings, {"data": {"files": [str(chat)], "format": "chat"}})
    model = tiny_models("llama")
    sdpa = _losses(_train(write_recipe, tmp_path, model, "sdpa", **settings))
    flash = deep_merge(settings, {"model": {"attn_implementation": "flash_attention_2"}})
    assert _losses(_train(write_recipe, tmp_path, model, "fa2", **flash)) == \
        pytest.approx(sdpa, rel=BF16_RTOL)


# ----------------------------------------------------------------------------- loss kernels

# fp32: the same arithmetic in another order; bf16: the head matmuls run in bf16 on CUDA in
# both paths, the chunked one accumulates the head gradient in fp32 (tests/test_loss.py's values)
LOSS_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _lora_model(dtype: torch.dtype, device: torch.device) -> Any:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from pi_lora.testing import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=4096, max_positions=512)
    config._attn_implementation = "sdpa"
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(LlamaForCausalLM(config).to(device=device, dtype=dtype), lora)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def _tokens(device: torch.device, length: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of random ids; labels with a masked prompt and a masked tail."""
    ids = torch.randint(0, 4096, (2, length), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :17] = -100
    labels[1, -40:] = -100
    return ids.to(device), labels.to(device)


def _loss_and_grads(model: Any, loss_fn: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach().float().cpu(), **grads}


def _assert_close_to_max(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                         rtol: float) -> None:
    """Every tensor within rtol x its largest magnitude (tests/test_loss.py's measure)."""
    assert ours.keys() == theirs.keys()
    for name, want in theirs.items():
        scale = want.abs().max().clamp_min(1e-12)
        assert (ours[name] - want).abs().max() <= rtol * scale, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_on_cuda_matches_full_logits(device, dtype: torch.dtype,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from pi_lora.train.loss import causal_lm_loss

    monkeypatch.setattr("pi_lora.train.loss._liger_available", lambda: False)  # the chunked path
    model = _lora_model(dtype, device)
    ids, labels = _tokens(device)
    chunked = _loss_and_grads(model, lambda: causal_lm_loss(model, ids, labels, chunk_tokens=97))
    plain = _loss_and_grads(model, lambda: model(input_ids=ids, labels=labels).loss)
    _assert_close_to_max(chunked, plain, LOSS_TOLERANCE[dtype])


def test_liger_fused_loss_matches_the_chunked_loss(cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    import pi_lora.train.loss as loss_module

    assert loss_module._liger_available()
    model = _lora_model(torch.bfloat16, cuda)
    ids, labels = _tokens(cuda)
    fused = _loss_and_grads(model, lambda: loss_module.causal_lm_loss(model, ids, labels))
    monkeypatch.setattr(loss_module, "_liger_available", lambda: False)
    chunked = _loss_and_grads(model, lambda: loss_module.causal_lm_loss(model, ids, labels))
    _assert_close_to_max(fused, chunked, LOSS_TOLERANCE[torch.bfloat16])


# S2-Attn on the device's sdpa kernels against the explicit-mask reference (fp64, CPU): fp32
# kernels agree to rounding, bf16 inputs are rounded by 2^-9 before the softmax
S2_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_s2_attention_on_cuda_matches_the_mask_reference(device, dtype: torch.dtype) -> None:
    from test_attention import FakeAttention, qkv, reference_s2

    from pi_lora.model.s2_attention import s2_attention_forward

    query, key, value = qkv(length=512, heads=8, kv_heads=2, dim=64)
    expected = reference_s2(query, key, value, 128)  # group = 512 x the default 0.25
    inputs = (t.to(device=device, dtype=dtype) for t in (query, key, value))
    output, _ = s2_attention_forward(FakeAttention(4).train(), *inputs, None)
    scale = expected.abs().max()
    assert (output.double().cpu() - expected).abs().max() <= S2_TOLERANCE[dtype] * scale


# ----------------------------------------------------------------------------- merge, eval


def _release_tensors(release: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(release.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def test_bf16_merge_on_cuda_equals_the_cpu_merge(device, tiny_models, write_recipe,
                                                 tmp_path: Path) -> None:
    """The fold runs in fp32 on either device, then one cast to bf16: the releases differ at
    most by one bf16 rounding step (2^-7 relative) where fp32 sums landed on a tie."""
    run = _train(write_recipe, tmp_path, tiny_models("llama"), "bf16",
                 **deep_merge(BF16, {"training": {"max_steps": 2}}))
    for name, where in (("reference", "cpu"), ("device", device.type)):
        assert main(["merge", str(run), "--output", str(tmp_path / name), "--device", where]) == 0
    ours, theirs = _release_tensors(tmp_path / "device"), _release_tensors(tmp_path / "reference")
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=2**-7, atol=1e-6, msg=name)


def test_eval_on_cuda_scores_like_the_cpu(device, tiny_models, write_recipe, corpus: Path,
                                          tmp_path: Path) -> None:
    """Same release, fp32, both devices: perplexity equal to rounding (1e-4 relative)."""
    run = _train(write_recipe, tmp_path, tiny_models("llama"), "run",
                 training={"max_steps": 2})
    assert main(["merge", str(run), "--output", str(tmp_path / "rel")]) == 0
    targets = {}
    for name, where in (("reference", "cpu"), ("device", device.type)):
        out = tmp_path / f"report-{name}"
        assert main(["eval", str(tmp_path / "rel"), "--device", where, "--dtype", "fp32",
                     "--passkey-lengths", "256", "--depths", "0,1", "--trials", "1",
                     "--ppl-lengths", "128,256", "--stride", "64", "--docs", str(corpus),
                     "--max-windows", "2", "--out", str(out)]) == 0
        targets[name] = json.loads((out / "report.json").read_text())["targets"][0]
    assert targets["device"]["facts"]["device"].startswith(device.type)
    ppl = {name: {k: v["ppl"] for k, v in t["perplexity"]["by_length"].items()}
           for name, t in targets.items()}
    assert ppl["device"] == pytest.approx(ppl["reference"], rel=1e-4)


# ----------------------------------------------------------------------------- packages


def test_qlora_trains_and_merges_on_cuda(cuda, tiny_models, write_recipe, tmp_path: Path) -> None:
    """bitsandbytes' CUDA nf4 kernels in training, then the merge into the dequantized weights
    checked against the quantized model as trained (the merge's own tolerance)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    settings = {"model": {"quantization": {"bits": 4}}, "training": {"max_steps": 2}}
    run = _train(write_recipe, tmp_path, tiny_models("llama"), "qlora", **settings)
    assert all(math.isfinite(loss) for loss in _losses(run))
    from pi_lora.release.merge import merge_run

    report = merge_run(run, tmp_path / "release", dtype="fp32", verify="full")
    assert report.quantized_base and report.relative_diff <= report.tolerance
    assert report.quantized_top1_agreement == 1.0


def _launch_env() -> dict[str, str]:
    """This environment minus any launcher's variables: a one-process group of its own."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "PI_LORA_LAUNCHED", "ACCELERATE_USE_DEEPSPEED")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    path = os.pathsep.join(filter(None, (str(REPO), env.get("PYTHONPATH"))))
    return {**env, "PYTHONPATH": path, "DS_ACCELERATOR": "cuda"}  # never DeepSpeed's CPU guess


@pytest.mark.parametrize("config", ["zero3", pytest.param("zero3_offload", marks=pytest.mark.slow)])
def test_zero3_on_nccl_saves_full_adapters(cuda, config: str, tiny_models, write_recipe,
                                           tmp_path: Path) -> None:
    """One GPU, NCCL, fp32: ZeRO-3 saves what a plain run saves, at full shape (1e-4: the
    same AdamW steps, gradients reduced by NCCL instead of summed locally)."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed")
    if config == "zero3_offload" and shutil.which("c++") is None:
        pytest.skip("zero3_offload JIT-builds DeepSpeed's CPU Adam: no C++ compiler here")
    model = tiny_models("llama")
    plain = _train(write_recipe, tmp_path, model, "plain", **NO_DROPOUT)
    path = write_recipe(model, "zero.yaml", output_dir=str(tmp_path / "zero"),
                        training={"deepspeed": config}, **NO_DROPOUT)
    done = subprocess.run([sys.executable, "-m", "pi_lora.cli", "train", str(path)], cwd=REPO,
                          env=_launch_env(), capture_output=True, text=True, timeout=600,
                          check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    saved = {}
    for run in (plain, tmp_path / "zero"):
        saved[run.name] = {**load_file(str(run / "adapter" / "adapter_model.safetensors")),
                           **load_file(str(run / "extras.safetensors"))}
    assert saved["zero"].keys() == saved["plain"].keys()
    for name, tensor in saved["plain"].items():
        torch.testing.assert_close(saved["zero"][name].float(), tensor.float(), rtol=0,
                                   atol=1e-4, msg=name)


def test_default_nproc_is_one_process_per_gpu(cuda, monkeypatch: pytest.MonkeyPatch) -> None:
    from pi_lora.train.launch import LAUNCHED_VARIABLE, LaunchPlan, needs_launch

    for name in (LAUNCHED_VARIABLE, "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    gpus = torch.cuda.device_count()
    assert LaunchPlan().processes_per_node() == gpus
    assert needs_launch(LaunchPlan()) == (gpus > 1)


# ----------------------------------------------------------------------------- plan


def _plan_cases(device: torch.device) -> tuple[Any, ...]:
    """A medium random Llama (512 wide, 8 layers, 32k vocab, bf16) with the chunked loss
    and with full logits on CUDA; the CI's tiny case on the CPU rehearsal."""
    from benchmarks.plan_validation import Case

    if device.type == "cpu":
        return (Case("tiny", 256),)
    return (Case("small", 8192, dtype="bf16", extras=()),
            Case("small", 4096, chunked_loss=False, dtype="bf16", extras=()))


def planning_device(device: torch.device) -> Any:
    """The plan's device for this machine: this GPU with its memory, or the CPU."""
    from pi_lora.plan import cpu_device, gpu_like

    if device.type == "cpu":
        return cpu_device()
    return gpu_like(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory)


def test_plan_predicts_the_measured_peak(device, tmp_path: Path,
                                         record_property: Callable[[str, Any], None]) -> None:
    """`pi-lora plan` against a fresh worker's measured step peak (max_memory_allocated on
    CUDA), within the 15% the CPU validation holds the plan to (docs/plan.md)."""
    from benchmarks.plan_validation import TOLERANCE, case_recipe, measure
    from pi_lora.plan import plan_recipe

    for case in _plan_cases(device):
        path = case_recipe(case, tmp_path)
        assert path is not None
        plan = plan_recipe(load_recipe(path), planning_device(device))
        predicted = plan.memory.allocated_bytes(plan.memory.step_peak_bytes)
        measured = measure(path).step_peak_bytes
        record_property(case.label, {"predicted": int(predicted), "measured": measured})
        print(f"{case.label}: plan {predicted / 2**30:.3f} GiB, measured {measured / 2**30:.3f}")
        assert abs(predicted / measured - 1) <= TOLERANCE, (case.label, predicted, measured)

