"""Peak memory of real pi-lora training steps, next to what `pi-lora plan` predicts.

    python benchmarks/measure_memory.py                 # the CI matrix, markdown table
    python benchmarks/measure_memory.py --slow          # + bf16 rows and SmolLM2 (256-4096)
    python benchmarks/measure_memory.py --worker R.yaml # one measurement, one JSON line

Each case is a recipe. A worker process (fresh, so no earlier peak leaks in) builds the model
the way `pi-lora train` does (pi_lora.model.load_model + wrap_lora, gradient checkpointing
without re-entrance, S2-Attn when asked), then runs forward (pi_lora.loss.causal_lm_loss when
`training.chunked_loss`, else `model(..., labels=...)`), backward and an AdamW step, twice:
the second step runs with the optimizer states in place. Peak memory is ru_maxrss on CPU
(max_memory_allocated on CUDA), read from VmHWM, the counter behind it (see _maxrss_bytes).
On Linux the high-water mark is reset through /proc/self/clear_refs after loading, so the
load peak and the step peak are measured apart.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RESULT_PREFIX = "MEASURED "
STEPS = 2  # the second step has AdamW states allocated; the peak is over both

# Random Llama shapes for validation: big vocabularies so logits matter at short lengths.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384},
    "mini": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000},
    "small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
              "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000},
}


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


# ----------------------------------------------------------------------------- models


def smollm2_dir() -> Path | None:
    """Directory of the SmolLM2 GGUF wheel, found without importing the package."""
    from pi_lora.testing import smollm2_gguf

    gguf = smollm2_gguf()
    return None if gguf is None else gguf.parent


def build_random_model(shape: str, out_dir: Path, dtype: str = "fp32", tie: bool = False) -> Path:
    """A random Llama of a SHAPES entry saved as a normal model directory (no tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pi_lora.dtypes import TORCH_DTYPES

    if (out_dir / "config.json").is_file():
        return out_dir
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=128, tie_word_embeddings=tie,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=TORCH_DTYPES[dtype])
    model.save_pretrained(str(out_dir))
    return out_dir


# ----------------------------------------------------------------------------- worker


def _maxrss_bytes() -> int:
    """Peak resident set of this process.

    On Linux this reads VmHWM, the counter behind ru_maxrss: getrusage(RUSAGE_SELF) also
    reports the peak of the process image replaced by exec, i.e. of the (v)forked parent,
    so a worker started from a large parent (pytest after loading models) would report the
    parent's peak. Elsewhere ru_maxrss is used as is.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak(device: str) -> bool:
    """Start a new high-water mark; False where the platform cannot (the peak then spans all)."""
    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _current(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _import_runtime() -> None:
    """Import what a training step uses, so the runtime baseline is measured complete."""
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import pi_lora.loss
    import pi_lora.model  # noqa: F401


def _peak(device: str) -> int:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated()
    return _maxrss_bytes()


def build_training_model(recipe: Any, device: str) -> Any:
    """pi_lora.train's model, with the non-reentrant checkpointing Trainer switches on."""
    from pi_lora.model import load_config
    from pi_lora.rope import plan_rope
    from pi_lora.train import build_training_model as build

    plan = plan_rope(recipe.rope, load_config(recipe.model))
    model = build(recipe, plan, device_map=device if device == "cuda" else None)
    if recipe.training.gradient_checkpointing:
        # what Trainer does with training_arguments(): non-reentrant checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def training_step(model: Any, optimizer: Any, input_ids: Any, recipe: Any) -> float:
    """Forward + loss, backward, AdamW step; every token is a label.

    Mirrors Trainer: accelerate wraps the (peft) model's forward in autocast for bf16/fp16,
    while pi-lora's chunked loss calls the decoder directly and so runs without autocast.
    """
    import torch

    if recipe.training.chunked_loss:
        from pi_lora.loss import causal_lm_loss

        loss = causal_lm_loss(model, input_ids, input_ids,
                              chunk_tokens=recipe.training.loss_chunk_tokens)
    else:
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.training.precision)
        with torch.autocast(input_ids.device.type, dtype=half, enabled=half is not None):
            loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.item())


def measure_in_process(recipe_path: str, overrides: list[str]) -> Measurement:
    """What a fresh worker measures; call it only in a process of its own."""
    import torch

    from pi_lora.recipe import load_recipe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # as pi_lora.train does
        from pi_lora.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    recipe = load_recipe(recipe_path, overrides)
    _import_runtime()
    runtime = _current(device)
    model = build_training_model(recipe, device)
    load_peak, built = _peak(device), _current(device)
    separate = _reset_peak(device)
    t = recipe.training
    generator = torch.Generator().manual_seed(0)
    shape = (t.per_device_batch_size, recipe.seq_len)
    input_ids = torch.randint(0, model.config.vocab_size, shape, generator=generator).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(t.adam_beta1, t.adam_beta2))
    loss = float("nan")
    for _ in range(STEPS):
        loss = training_step(model, optimizer, input_ids, recipe)
    step_peak = _peak(device)
    if not separate:
        load_peak = step_peak
    return Measurement(runtime, built, load_peak, step_peak, loss, device)


def measure(recipe_path: str | Path, overrides: list[str] | tuple[str, ...] = (),
            env: dict[str, str] | None = None, timeout_s: float = 1200) -> Measurement:
    """Run one measurement in a fresh subprocess (1 torch thread) and parse its result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(recipe_path)]
    for item in overrides:
        command += ["--set", item]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1", **(env or {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                          env=full_env, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return Measurement(**json.loads(line[len(RESULT_PREFIX):]))
    raise RuntimeError(f"worker failed (rc {done.returncode}):\n{done.stderr[-4000:]}")


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One validation setting: a model, a length and the memory options."""

    model: str  # a SHAPES key or "smollm2"
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


def case_recipe(case: Case, work_dir: Path) -> Path | None:
    """Write the recipe YAML of a case; None when its model is not available here."""
    import yaml

    if case.model == "smollm2":
        from pi_lora.testing import SMOLLM2_GGUF_FILE

        folder = smollm2_dir()
        if folder is None:
            return None
        model = {"name": str(folder), "gguf_file": SMOLLM2_GGUF_FILE, "dtype": case.dtype}
    else:
        folder = build_random_model(case.model, work_dir / f"{case.model}-{case.dtype}", case.dtype)
        model = {"name": str(folder), "dtype": case.dtype}
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
    from pi_lora.recipe import load_recipe

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


def markdown(rows: list[Row]) -> str:
    gib = 2**30
    lines = ["| setting | predicted peak (GiB) | measured peak RSS (GiB) | error | "
             "predicted step (GiB) | measured step (GiB) |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.case} | {row.predicted_bytes / gib:.3f} | "
                     f"{row.measured_bytes / gib:.3f} | {row.error:+.1%} | "
                     f"{row.predicted_step_bytes / gib:.3f} | {row.measured_step_bytes / gib:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="RECIPE", help="measure one recipe, print JSON")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--slow", action="store_true", help="also bf16 rows and SmolLM2")
    parser.add_argument("--json-out", type=Path, help="also write the rows as JSON")
    parser.add_argument("--only", help="run only the cases whose label contains this text")
    args = parser.parse_args(argv)
    if args.worker:
        result = measure_in_process(args.worker, args.overrides)
        print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
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
    if args.json_out:
        args.json_out.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
