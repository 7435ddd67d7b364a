"""`pi-lora merge` at growing model sizes: the streaming merge vs the whole-model one, one run.

    python benchmarks/bench_merge.py                  # ~150M, ~600M, ~1.2B params
    python benchmarks/bench_merge.py --sizes 150M     # one size

Each size is a random Llama (vocab 32000, untied head) saved in bf16 at a small shard size
(200MB, so there are many shards), with a run directory made for it: a LoRA adapter (r=16 on
q/k/v/o, random non-zero B) and trained extras (embeddings, norms), as `pi-lora train` writes
them. Each merge runs in a fresh worker process; reported: wall time and the worker's peak
resident memory (VmHWM, which counts memory-mapped checkpoint pages too). Ratios are new vs
old from the same run. Modes: `old` = the merge before streaming (benchmarks/merge_legacy.py);
`new` = the streaming merge with its layer-by-layer check; `new-full` = streaming merge with
the whole-model check (what `--verify auto` picks for models that fit twice in half the RAM).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import peak_bytes, print_result, reset_peak, run_worker, worker_env

REPO = Path(__file__).resolve().parents[1]

SHAPES = {  # name -> (hidden, intermediate, layers, heads)
    "20M": (256, 768, 4, 4),  # the smoke test's size
    "150M": (768, 2048, 14, 12),
    "600M": (1536, 4096, 18, 12),
    "1.2B": (2048, 5632, 20, 16),
}
VOCAB, ORIGINAL, TARGET, SHARD, RANK = 32000, 512, 1024, "200MB", 16


def build(size: str, root: Path) -> Path:
    """Random base (bf16 shards) + a run directory for it; returns the run directory."""
    import torch
    import yaml
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from pi_lora.model.rope import plan_rope
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.run.directory import RunDir, RunFacts, save_extras
    from pi_lora.testing import make_tokenizer, write_corpus

    hidden, inter, layers, heads = SHAPES[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, max_position_embeddings=ORIGINAL,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    base = root / "base"
    model.save_pretrained(str(base), max_shard_size=SHARD)
    total = sum(p.numel() for p in model.parameters())
    del model
    make_tokenizer().save_pretrained(str(base))
    corpus = write_corpus(root / "corpus.txt", n_docs=4)
    recipe_path = root / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": {"name": str(base), "dtype": "bf16"},
        "rope": {"method": "linear", "target_context": TARGET},
        "lora": {"r": RANK, "alpha": 2 * RANK, "trainable_extras": ["embeddings", "norms"]},
        "data": {"files": [str(corpus)]},
        "training": {"precision": "fp32"},
        "output_dir": str(root / "run"),
    }))
    recipe = load_recipe(recipe_path)
    run = RunDir(root / "run")
    run.prepare(recipe, resume=False, overwrite=False, is_main=True)
    plan = plan_rope(recipe.rope, config)
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "k_proj", "v_proj",
                                                                   "o_proj"], task_type="CAUSAL_LM")
    lora.save_pretrained(str(run.adapter_dir))
    adapter: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(RANK, hidden) / hidden ** 0.5
            adapter[f"{key}.lora_B.weight"] = torch.randn(hidden, RANK) * 1e-3
    save_file(adapter, str(run.adapter_dir / "adapter_model.safetensors"))
    extras: dict[str, torch.Tensor] = {}
    index_path = base / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())["weight_map"]
    else:
        with safe_open(str(base / "model.safetensors"), "pt") as f:
            index = dict.fromkeys(f.keys(), "model.safetensors")
    for name, file in index.items():
        if name == "model.embed_tokens.weight" or name.endswith("norm.weight"):
            with safe_open(str(base / file), "pt") as f:
                tensor = f.get_tensor(name).float()
            extras[name] = tensor + 1e-3 * torch.randn_like(tensor)
    save_extras(extras, run.extras_path)
    lora_params = sum(t.numel() for t in adapter.values())
    run.write_facts(RunFacts(
        status="complete", rope=plan.to_dict(), extras=["embeddings", "norms"],
        trainable_parameters=lora_params + sum(t.numel() for t in extras.values()),
        total_parameters=total, train_sequences=0, train_tokens=0, seq_len=TARGET,
        world_size=1, data_cache=None, epochs_for_max_steps=None, final_loss=0.0, steps=0))
    return run.path


def worker(mode: str, run: Path, out: Path) -> None:
    reset_peak("cpu")
    started = time.perf_counter()
    if mode == "old":
        from benchmarks.merge_legacy import legacy_merge

        extra: dict[str, Any] = legacy_merge(run, out, "bf16", SHARD)
    else:
        from pi_lora.release.merge import merge_run

        report = merge_run(run, out, dtype="bf16", max_shard_size=SHARD,
                           verify="layers" if mode == "new" else "full")
        extra = {"max_abs_diff": report.max_abs_diff, "shards": report.shards,
                 "largest_shard_bytes": report.largest_shard_bytes}
    print_result({"mode": mode, "seconds": time.perf_counter() - started,
                  "peak_bytes": peak_bytes("cpu"), **extra})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="150M,600M,1.2B")
    parser.add_argument("--modes", default="old,new,new-full")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", nargs=3, metavar=("MODE", "RUN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--build", nargs=2, metavar=("SIZE", "ROOT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return
    if args.build:
        print_result({"run": str(build(args.build[0], Path(args.build[1])))})
        return
    env = worker_env(args.threads, {"PYTHONPATH": str(REPO)})
    rows = []
    for size in args.sizes.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"bench-merge-{size}-"))
        try:
            made = run_worker([__file__, "--build", size, str(root)], env, timeout_s=3600)
            if made.result is None:
                raise made.failure(f"build {size}")
            run = Path(made.result["run"])
            sizes = [p.stat().st_size for p in (root / "base").glob("*.safetensors")]
            extras = (run / "extras.safetensors").stat().st_size
            adapter = (run / "adapter" / "adapter_model.safetensors").stat().st_size
            results = {}
            for mode in args.modes.split(","):
                out = root / f"release-{mode}"
                done = run_worker([__file__, "--worker", mode, str(run), str(out)], env,
                                  timeout_s=3600)
                if done.result is None:
                    raise done.failure(f"{mode} {size}")
                results[mode] = done.result
                shutil.rmtree(out, ignore_errors=True)
            rows.append((size, sum(sizes), max(sizes), adapter, extras, results))
            _print_row(rows[-1])
        finally:
            shutil.rmtree(root, ignore_errors=True)
    _print_table(rows)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def _print_row(row: tuple) -> None:
    size, total, largest, adapter, extras, results = row
    print(f"{size}: base {_gib(total)} GiB bf16 (largest shard {_gib(largest)} GiB), adapter "
          f"{_gib(adapter)} GiB, extras {_gib(extras)} GiB", flush=True)
    for mode, r in results.items():
        print(f"  {mode:8s} peak {_gib(r['peak_bytes'])} GiB  {r['seconds']:.1f} s  "
              f"max|logit diff| {r['max_abs_diff']:.3g}", flush=True)


def _print_table(rows: list[tuple]) -> None:
    print("\n| size | base (bf16) | largest shard + adapter + extras | old peak RSS | new peak RSS "
          "| new / old | old time | new time | new / old | new-full peak | new-full time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size, total, largest, adapter, extras, results in rows:
        old, new, full = results.get("old"), results.get("new"), results.get("new-full")
        cells = [size, f"{_gib(total)} GiB", f"{_gib(largest + adapter + extras)} GiB"]
        if old and new:
            cells += [f"{_gib(old['peak_bytes'])} GiB", f"{_gib(new['peak_bytes'])} GiB",
                      f"{new['peak_bytes'] / old['peak_bytes']:.2f}",
                      f"{old['seconds']:.0f} s", f"{new['seconds']:.0f} s",
                      f"{new['seconds'] / old['seconds']:.2f}"]
        else:
            cells += ["-"] * 6
        cells += [f"{_gib(full['peak_bytes'])} GiB", f"{full['seconds']:.0f} s"] if full else ["-"] * 2
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
