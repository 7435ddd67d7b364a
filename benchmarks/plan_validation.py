"""The plan's memory model against the peak memory of real pi-lora training steps.

    python -m benchmarks.plan_validation                 # the CI matrix, markdown table
    python -m benchmarks.plan_validation --slow          # + bf16 rows and SmolLM2 (256-4096)
    python -m benchmarks.plan_validation --worker R.yaml # one measurement, one JSON line

(benchmarks/measure_memory.py is the same command.) Each case is a recipe. A fresh worker
process (benchmarks.harness) builds the model the way `pi-lora train` does
(pi_lora.train.assembly.build_training_model, non-reentrant gradient checkpointing, the CPU allocator
setting), then runs forward (pi_lora.train.loss.causal_lm_loss when `training.chunked_loss`, else
`model(..., labels=...)`), backward and an AdamW step, twice: the second step runs with the
optimizer states in place. The high-water mark is reset after loading, so the load peak and
the step peak are measured apart. tests/test_plan.py fails when a prediction drifts more than
TOLERANCE from its measurement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import harness

STEPS = 2  # the second step has AdamW states allocated; the peak is over both
TOLERANCE = 0.15  # docs/plan.md: every prediction within 15% of the measured peak


@dataclass
class Measurement:
    """Bytes resident: after imports, once the model is built, peak while loading, peak over
    the training steps (on CUDA: allocated bytes instead of resident ones)."""

    runtime_bytes: int
    built_bytes: int
    load_peak_bytes: int
    step_peak_bytes: int
    loss: float
    device: str

    @property
    def peak_bytes(self) -> int:
        return max(self.load_peak_bytes, self.step_peak_bytes)


# ----------------------------------------------------------------------------- worker


def build_training_model(recipe: Any, device: str) -> Any:
    """pi_lora.train.assembly's model, with the non-reentrant checkpointing Trainer switches on."""
    from pi_lora.model.loading import load_config
    from pi_lora.model.rope import plan_rope
    from pi_lora.train.assembly import build_training_model as build

    plan = plan_rope(recipe.rope, load_config(recipe.model))
    model = build(recipe, plan, device_map=device if device == "cuda" else None)
    if recipe.training.gradient_checkpointing:
        # what Trainer does with training_arguments(): non-reentrant checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def training_step(model: Any, optimizer: Any, input_ids: Any, recipe: Any) -> float:
    """Forward + loss, backward, AdamW step; every token is a label.

    Mirrors pi-lora's Trainer: with bf16/fp16 precision both losses run under autocast
    (accelerate wraps the model's forward, PiLoraTrainer the chunked loss, which calls the
    decoder directly); fp32 runs without it.
    """
    import torch

    from pi_lora.recipe.dtypes import torch_dtype

    t = recipe.training
    half = torch_dtype(t.precision) if t.precision != "fp32" else None
    with torch.autocast(input_ids.device.type, dtype=half, enabled=half is not None):
        if t.chunked_loss:
            from pi_lora.train.loss import causal_lm_loss

            loss = causal_lm_loss(model, input_ids, input_ids, chunk_tokens=t.loss_chunk_tokens)
        else:
            loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


def _import_runtime() -> None:
    """Import what a training step uses, so the runtime baseline is measured complete."""
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401



def measure_in_process(recipe_path: str, overrides: list[str]) -> Measurement:
    """What a fresh worker measures; call it only in a process of its own."""
    import torch

    from pi_lora.recipe.loading import load_recipe

    device = harness.default_device()
    if device == "cpu":  # as pi_lora.train.assembly does
        from pi_lora.core.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    recipe = load_recipe(recipe_path, overrides)
    _import_runtime()
    runtime = harness.current_bytes(device)
    model = build_training_model(recipe, device)
    load_peak, built = harness.peak_bytes(device), harness.current_bytes(device)
    separate = harness.reset_peak(device)
    t = recipe.training
    generator = torch.Generator().manual_seed(0)
    shape = (t.per_device_batch_size, recipe.seq_len)
    input_ids = torch.randint(0, model.config.vocab_size, shape, generator=generator).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(t.adam_beta1, t.adam_beta2))
    loss = float("nan")
    for _ in range(STEPS):
        loss = training_step(model, optimizer, input_ids, recipe)
    step_peak = harness.peak_bytes(device)
    if not separate:
        load_peak = step_peak
    return Measurement(runtime, built, load_peak, step_peak, loss, device)


def measure(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (),
            env: dict[str, str] | None = None, timeout_s: float = 1200) -> Measurement:
    """Run one measurement in a fresh worker (1 torch thread) and parse its result."""
    args = ["-m", "benchmarks.plan_validation", "--worker", str(recipe_path)]
    for item in overrides:
        args += ["--set", item]
    done = harness.run_worker(args, harness.worker_env(threads=1, extra=env), timeout_s)
    if done.result is None:
        raise done.failure(str(recipe_path))
    return Measurement(**done.result)


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One validation setting: a model, a length and the memory options."""

    model: str  # a harness.SHAPES key or "smollm2"
    seq_len: int
    chunked_loss: bool = True
    checkpointing: bool = True
    dtype: str = "fp32"
    extras: tuple[str, ...] = ("embeddings", "norms")
    batch: int = 1

    @property
    def label(self) -> str:
        options = [self.dtype, "chunked" if self.chunked_loss else "plain loss",
                   "ckpt" if self.checkpointing else "no ckpt"]
        if self.batch > 1:
            options.append(f"batch {self.batch}")
        if not self.extras:
            options.append("no extras")
        return f"{self.model} {self.seq_len} ({', '.join(options)})"


# The CI matrix: fp32 random Llamas, checkpointing, chunked and plain loss, with and without
# LoRA+ extras (with them the optimizer step is the peak, without them a layer's backward).
FAST_CASES: tuple[Case, ...] = (
    Case("tiny", 256),
    Case("mini", 512, chunked_loss=False),
    Case("mini", 1024),
    Case("small", 512),
    Case("small", 2048, extras=()),
)
# Slower: a bigger plain-loss step, bf16 without checkpointing, and the real SmolLM2 (GGUF).
# SmolLM2 runs fp32 past 512 tokens: this CPU (AVX2) computes bf16 ~8x slower than fp32, so a
# bf16 step at 2k+ takes many minutes; the bf16 rows cover what differs in bf16 (fp32 upcasts).
SLOW_CASES: tuple[Case, ...] = (
    Case("small", 1024, chunked_loss=False),
    Case("small", 1024, checkpointing=False, dtype="bf16", extras=()),
    Case("small", 2048, dtype="bf16", extras=()),
    Case("smollm2", 256, dtype="bf16", extras=()),
    Case("smollm2", 512, dtype="bf16", extras=()),
    Case("smollm2", 1024, chunked_loss=False),
    Case("smollm2", 2048),
    Case("smollm2", 4096),
)


def build_random_model(shape: str, out_dir: Path, dtype: str = "fp32", tie: bool = False) -> Path:
    """A random Llama of a harness.SHAPES entry saved as a model directory (no tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pi_lora.recipe.dtypes import torch_dtype

    if (out_dir / "config.json").is_file():
        return out_dir
    config = harness.llama_config(shape, max_position_embeddings=128, tie_word_embeddings=tie,
                                  bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    model.save_pretrained(str(out_dir))
    return out_dir


def _model_section(case: Case, work_dir: Path) -> dict[str, Any] | None:
    """The recipe's model section of a case; None when its model is not available here."""
    if case.model != "smollm2":
        folder = build_random_model(case.model, work_dir / f"{case.model}-{case.dtype}", case.dtype)
        return {"name": str(folder), "dtype": case.dtype}
    from pi_lora.model.packaged import SMOLLM2_GGUF_FILE, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        return None
    return {"name": str(gguf.parent), "gguf_file": SMOLLM2_GGUF_FILE, "dtype": case.dtype}


def case_recipe(case: Case, work_dir: Path) -> Path | None:
    """Write the recipe YAML of a case; None when its model is not available here."""
    import yaml

    model = _model_section(case, work_dir)
    if model is None:
        return None
    recipe = {
        "model": model,
        "rope": {"method": "linear", "target_context": max(case.seq_len, 16384)},
        "lora": {"r": 8, "alpha": 16, "trainable_extras": list(case.extras)},
        "data": {"files": ["unused.txt"], "seq_len": case.seq_len},
        "training": {"per_device_batch_size": case.batch,
                     "gradient_checkpointing": case.checkpointing,
                     "chunked_loss": case.chunked_loss, "loss_chunk_tokens": 256,
                     "precision": case.dtype, "deepspeed": None},
        "output_dir": str(work_dir / "run"),
    }
    path = work_dir / f"{case.label.replace(' ', '_').replace(',', '')}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


# ----------------------------------------------------------------------------- rows


@dataclass
class Row:
    case: str
    predicted_bytes: int
    measured_bytes: int
    predicted_step_bytes: int
    measured_step_bytes: int

    @property
    def error(self) -> float:
        return self.predicted_bytes / self.measured_bytes - 1.0


def validate(cases: tuple[Case, ...], work_dir: Path) -> list[Row]:
    """Plan and measure every case whose model is available; one row each."""
    from pi_lora.plan import cpu_device, plan_recipe
    from pi_lora.recipe.loading import load_recipe

    rows = []
    for case in cases:
        path = case_recipe(case, work_dir)
        if path is None:
            continue
        plan = plan_recipe(load_recipe(path), cpu_device(), gpus=1, nodes=1)
        measured = measure(path)
        rows.append(Row(case.label, plan.memory.peak_bytes, measured.peak_bytes,
                        plan.memory.step_peak_bytes, measured.step_peak_bytes))
    return rows


def drifted(rows: list[Row], tolerance: float = TOLERANCE) -> list[Row]:
    """The rows whose predicted peak is off the measured one by more than `tolerance`."""
    return [row for row in rows if abs(row.error) > tolerance]


def markdown(rows: list[Row]) -> str:
    gib = 2**30
    lines = ["| setting | predicted peak (GiB) | measured peak RSS (GiB) | error | "
             "predicted step (GiB) | measured step (GiB) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.case} | {row.predicted_bytes / gib:.3f} | "
                     f"{row.measured_bytes / gib:.3f} | {row.error:+.1%} | "
                     f"{row.predicted_step_bytes / gib:.3f} | {row.measured_step_bytes / gib:.3f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="RECIPE", help="measure one recipe, print JSON")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--slow", action="store_true", help="also bf16 rows and SmolLM2")
    parser.add_argument("--json-out", type=Path, help="also write the rows as JSON")
    parser.add_argument("--only", help="run only the cases whose label contains this text")
    args = parser.parse_args(argv)
    if args.worker:
        harness.print_result(asdict(measure_in_process(args.worker, args.overrides)))
        return 0
    cases = FAST_CASES + (SLOW_CASES if args.slow else ())
    cases = tuple(c for c in cases if args.only is None or args.only in c.label)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:  # one row at a time, so a slow or failing case loses nothing
            try:
                rows += validate((case,), Path(tmp))
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                print(f"{case.label}: not measured ({type(exc).__name__})", file=sys.stderr)
                continue
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print(markdown(rows))
    for row in drifted(rows):
        print(f"{row.case}: {row.error:+.1%} is beyond the {TOLERANCE:.0%} tolerance",
              file=sys.stderr)
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
