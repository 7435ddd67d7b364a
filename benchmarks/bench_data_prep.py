"""Data preparation at corpus scale, by document length: memory bounded by tokens, not rows.

    python -m benchmarks.bench_data_prep                        # the grid: 1K/40K/400K x 10M/100M/300M
    python -m benchmarks.bench_data_prep --doc-tokens 40K --tokens 10M,100M --streaming
    python -m benchmarks.bench_data_prep --tokens 10M --doc-tokens 1K --legacy-max 10M
    python -m benchmarks.bench_data_prep --ranks                # 2 ranks: one builds, one waits
    python -m benchmarks.bench_data_prep --train-mb 20,80       # 1-step `pi-lora train` on play rows

The corpus is the shipped Shakespeare plays cut into scenes, shuffled and joined into
documents of the asked length (1K tokens: a scene; 40K: about a play; 400K: a long book),
repeated until it holds the asked number of tokens (demo tokenizer: byte-level BPE, 2048
entries, ~2.7 bytes per token). Each build runs in a fresh worker process with a fresh
cache; reported: tokens/s and peak memory of the worker and of every process it started
(the tokenizer workers): their PSS, sampled every 20 ms and summed (shared pages counted
once), and of it the anonymous part (Pss_Anon: heap, not pages of memory-mapped files the
kernel can drop). `--streaming` also reads each corpus as `data.streaming` (every block
drawn once, in this process); `--num-proc` sets the tokenizer processes (default: pi-lora's
own choice, which the table states). `--legacy-max` adds pi-lora's earlier list path
(benchmarks/data_prep_legacy.py) up to that size, for a ratio within the run.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import print_result, run_worker, worker_env

REPO = Path(__file__).resolve().parents[1]
PLAYS = REPO / "pi_lora" / "demo" / "data" / "plays.jsonl.gz"
TOKENIZER = REPO / "pi_lora" / "demo" / "base"
BYTES_PER_TOKEN = 2.74  # measured for the demo tokenizer on the plays
SEQ_LEN = 4096


def parse_count(text: str) -> int:
    units = {"k": 10**3, "m": 10**6, "b": 10**9}
    text = text.strip().lower()
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


# ----------------------------------------------------------------------------- corpus


def scenes() -> list[str]:
    """Documents of a few thousand tokens: each play cut at blank-line runs into ~40 parts."""
    docs = []
    with gzip.open(PLAYS, "rt") as f:
        for line in f:
            text = json.loads(line)["text"]
            parts = text.split("\n\n")
            step = max(1, len(parts) // 40)
            docs += ["\n\n".join(parts[i:i + step]) for i in range(0, len(parts), step)]
    return docs


def write_corpus(path: Path, tokens: int, doc_tokens: int = 1000, seed: int = 0) -> Path:
    """jsonl of {"text": ...} holding ~`tokens` tokens in documents of ~`doc_tokens` tokens
    (scenes joined in shuffled order); reused when already written."""
    if path.is_file():
        return path
    parts, rng, written = scenes(), random.Random(seed), 0
    target, doc_chars = tokens * BYTES_PER_TOKEN, doc_tokens * BYTES_PER_TOKEN
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        doc: list[str] = []
        size = 0
        while written < target:
            rng.shuffle(parts)
            for part in parts:
                doc.append(part)
                size += len(part)
                if size >= doc_chars:
                    f.write(json.dumps({"text": "\n\n".join(doc)}) + "\n")
                    written += size
                    doc, size = [], 0
                    if written >= target:
                        break
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- worker


class TreePeak:
    """Peak memory of this process + its descendants (the tokenizer workers), sampled in a
    thread: the sum of their PSS (proportional set size), so pages the forked workers share
    with their parent count once, not once per process as summed RSS would."""

    def __init__(self, interval_s: float = 0.02, pid: int | None = None) -> None:
        import psutil

        self.process, self.interval = psutil.Process(pid), interval_s
        self.peak, self.peak_anon = 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = anon = 0
            for proc in [self.process, *self.process.children(recursive=True)]:
                with contextlib.suppress(psutil.Error, OSError):  # a worker that just exited
                    fields = _smaps_rollup(proc.pid)
                    total, anon = total + fields["Pss"], anon + fields["Pss_Anon"]
            self.peak, self.peak_anon = max(self.peak, total), max(self.peak_anon, anon)
            time.sleep(self.interval)

    def stop(self) -> tuple[int, int]:
        self._stop.set()
        self._thread.join()
        return self.peak, self.peak_anon


def _smaps_rollup(pid: int) -> dict[str, int]:
    """Bytes of the PSS fields of /proc/PID/smaps_rollup (Pss, Pss_Anon, Pss_File, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) * 1024
    return fields


def worker(path: str, mode: str, num_proc: int | None, cache: str) -> None:
    from transformers import AutoTokenizer

    from benchmarks.harness import peak_bytes
    from pi_lora.data import tokenizing
    from pi_lora.data.build import build_train_dataset, load_raw
    from pi_lora.recipe.loading import DataSection

    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    section = DataSection(files=[path], num_proc=num_proc, cache_dir=cache,
                          streaming=mode == "stream")
    processes = None if mode == "stream" else tokenizing.auto_num_proc(load_raw(section), ["text"],
                                                                       num_proc)
    sampler = TreePeak()
    started, cpu = time.time(), cpu_seconds()
    if mode == "legacy":
        from benchmarks import data_prep_legacy

        tokens = data_prep_legacy.build(section, tokenizer, SEQ_LEN, Path(cache))
    elif mode == "stream":  # every block drawn once, as an epoch of training would
        built = build_train_dataset(section, tokenizer, SEQ_LEN, seed=0)
        tokens = sum(len(row["input_ids"]) for row in built.train)
    else:
        tokens = build_train_dataset(section, tokenizer, SEQ_LEN, seed=0).tokens
    seconds = time.time() - started
    pss, anon = sampler.stop()
    print_result({"mode": mode, "tokens": tokens, "seconds": seconds, "processes": processes or 1,
                  "tree_peak_bytes": pss, "tree_anon_peak_bytes": anon,
                  "self_peak_bytes": peak_bytes("cpu"),
                  "cpu_seconds": cpu_seconds() - cpu})


def cpu_seconds() -> float:
    """User CPU time of this process and its finished children (the tokenizer workers)."""
    times = os.times()
    return times.user + times.children_user


def rank_worker(path: str, cache: str) -> None:
    """Under torchrun: build through pi-lora's barrier; say whether this rank built."""
    from transformers import AutoTokenizer, TrainingArguments

    import pi_lora.data.build as data
    from pi_lora.recipe.loading import DataSection
    from pi_lora.train.assembly import build_data_once

    builds: list[int] = []
    build = data._build

    def counted(*args: Any, **kwargs: Any) -> None:
        builds.append(1)
        build(*args, **kwargs)

    data._build = counted
    tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
    args = TrainingArguments(output_dir=str(Path(cache) / "out"), use_cpu=True, report_to=[])
    started, cpu = time.time(), cpu_seconds()
    built = build_data_once(DataSection(files=[path]), tokenizer, SEQ_LEN, 0, args)
    print_result({"rank": int(os.environ["RANK"]), "built": bool(builds), "tokens": built.tokens,
                  "seconds": time.time() - started, "cache": str(built.cache_path),
                  "cpu_seconds": cpu_seconds() - cpu})


def ranks(corpus: Path) -> list[dict[str, Any]]:
    """Two ranks under torchrun (gloo), fresh cache: one tokenizes, the other waits."""
    import subprocess

    from benchmarks.harness import RESULT_PREFIX
    from pi_lora.train.distributed import free_port

    cache = Path(tempfile.mkdtemp(prefix="bench-data-ranks-"))
    env = worker_env(threads=1, extra={"HF_DATASETS_CACHE": str(cache / "hf"),
                                       "PI_LORA_CACHE": str(cache), "HF_DATASETS_OFFLINE": "1"})
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()), "-m", "benchmarks.bench_data_prep",
               "--rank-worker", str(corpus), "--cache", str(cache)]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600,
                              check=False)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
               if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or len(results) != 2:
        raise RuntimeError(f"ranks run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return sorted(results, key=lambda r: r["rank"])


def measure(corpus: Path, mode: str, num_proc: int | None) -> dict[str, Any]:
    cache = Path(tempfile.mkdtemp(prefix=f"bench-data-{mode}-"))
    # the datasets cache of the raw json must not carry over between builds
    env = worker_env(threads=1, extra={"HF_DATASETS_CACHE": str(cache / "hf"),
                                       "HF_DATASETS_OFFLINE": "1"})
    args = [__file__, "--worker", str(corpus), "--mode", mode, "--cache", str(cache)]
    if num_proc:
        args += ["--num-proc", str(num_proc)]
    try:
        out = run_worker(args, env, timeout_s=3600)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if out.result is None:
        raise out.failure(f"{mode} on {corpus.name}")
    return out.result


def train_peak(corpus: Path) -> dict[str, Any]:
    """A 1-step `pi-lora train recipes/tiny.yaml` on `corpus` with a fresh cache: peak PSS and
    anonymous PSS of the whole process tree, sampled as the builds are."""
    import subprocess

    out = Path(tempfile.mkdtemp(prefix="bench-train-"))
    env = worker_env(threads=1, extra={"HF_DATASETS_CACHE": str(out / "hf"),
                                       "PI_LORA_CACHE": str(out / "cache"),
                                       "HF_DATASETS_OFFLINE": "1"})
    command = [sys.executable, "-m", "pi_lora.cli", "train", str(REPO / "recipes" / "tiny.yaml"),
               "--set", f"data.files=[{corpus}]", "--set", "training.max_steps=1",
               "--set", f"model.name={REPO / 'build' / 'tiny' / 'model'}",
               "--set", f"output_dir={out / 'run'}"]
    started = time.time()
    try:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        sampler = TreePeak(pid=proc.pid)
        log, _ = proc.communicate(timeout=3600)
        pss, anon = sampler.stop()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"train on {corpus.name} failed (rc {proc.returncode}):\n{log[-3000:]}")
    return {"corpus_bytes": corpus.stat().st_size, "seconds": time.time() - started,
            "tree_peak_bytes": pss, "tree_anon_peak_bytes": anon}


def table(rows: list[dict[str, Any]]) -> str:
    gib = 1 << 30
    lines = ["| documents | corpus | path | processes | tokens | seconds | M tok/s "
             "| peak PSS, all processes | of it anonymous |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['doc']} | {r['corpus']} | {r['mode']} | {r['processes']} | "
            f"{r['tokens'] / 1e6:.1f}M | {r['seconds']:.1f} | "
            f"{r['tokens'] / r['seconds'] / 1e6:.2f} | {r['tree_peak_bytes'] / gib:.2f} GiB | "
            f"{r['tree_anon_peak_bytes'] / gib:.2f} GiB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="10M,100M,300M", help="corpus sizes, e.g. 10M,100M")
    parser.add_argument("--doc-tokens", default="1K,40K,400K", help="document lengths")
    parser.add_argument("--legacy-max", default="0", help="largest size the old path runs at")
    parser.add_argument("--num-proc", type=int, default=None, help="tokenizer processes")
    parser.add_argument("--streaming", action="store_true", help="also read each corpus streamed")
    parser.add_argument("--corpus-dir", type=Path, default=REPO / "build" / "bench-data")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    parser.add_argument("--ranks", action="store_true",
                        help="2 ranks under torchrun on the smallest corpus: who builds, who waits")
    parser.add_argument("--train-mb", help="instead: 1-step train runs on corpora of whole "
                                           "plays (40K-token rows) of these sizes, e.g. 20,80")
    parser.add_argument("--worker")
    parser.add_argument("--rank-worker")
    parser.add_argument("--mode", choices=["legacy", "new", "stream"])
    parser.add_argument("--cache")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.mode, args.num_proc, args.cache)
        return
    if args.rank_worker:
        rank_worker(args.rank_worker, args.cache)
        return
    args.corpus_dir.mkdir(parents=True, exist_ok=True)
    if args.ranks:
        text = args.tokens.split(",")[0]
        corpus = write_corpus(args.corpus_dir / f"corpus-{text}.jsonl", parse_count(text))
        for r in ranks(corpus):
            print(f"rank {r['rank']}: {'built' if r['built'] else 'waited, then memory-mapped'} "
                  f"{r['tokens'] / 1e6:.1f}M tokens; wall {r['seconds']:.1f} s, CPU "
                  f"{r['cpu_seconds']:.1f} s")
        return
    if args.train_mb:
        results = []
        for mb in args.train_mb.split(","):
            tokens = int(float(mb) * 1e6 / BYTES_PER_TOKEN)
            corpus = write_corpus(args.corpus_dir / f"corpus-40K-{mb}MB.jsonl", tokens, 40_000)
            results.append({"mb": mb} | train_peak(corpus))
            r = results[-1]
            print(f"{r['corpus_bytes'] / 1e6:.0f} MB of 40K-token rows: 1-step train peak PSS "
                  f"{r['tree_peak_bytes'] / (1 << 30):.2f} GiB, anonymous "
                  f"{r['tree_anon_peak_bytes'] / (1 << 30):.2f} GiB, {r['seconds']:.0f} s", flush=True)
        if args.json:
            args.json.write_text(json.dumps({"train": results}, indent=1) + "\n")
        return
    rows = []
    for doc in args.doc_tokens.split(","):
        for text in args.tokens.split(","):
            count = parse_count(text)
            corpus = write_corpus(args.corpus_dir / f"corpus-{doc}-{text}.jsonl", count,
                                  parse_count(doc))
            modes = (["legacy"] if count <= parse_count(args.legacy_max) else []) + ["new"] + \
                (["stream"] if args.streaming else [])
            for mode in modes:
                rows.append({"doc": doc, "corpus": text} | measure(corpus, mode, args.num_proc))
                print(table(rows[-1:]), flush=True)
                if args.json:
                    args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("\n" + table(rows))


if __name__ == "__main__":
    main()
