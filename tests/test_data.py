"""Data: PI-paper packing, the short/long mix, chat and instruction masking, padding-free
packing with per-conversation positions, truncation counts, caching by content."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.data import packing, tokenizing
from pi_lora.data.build import IGNORE_INDEX, PackedCollator, build_train_dataset, load_raw
from pi_lora.recipe.loading import DataSection
from pi_lora.testing import make_tokenizer, synthetic_text


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture()
def documents(tmp_path: Path) -> Path:
    """200 documents of varied length in one jsonl file (one map batch for the packer)."""
    rng = random.Random(0)
    docs = [" ".join(synthetic_text(rng.randint(1, 4), words_per_doc=rng.randint(5, 60), seed=i))
            for i in range(200)]
    docs[7] = ""  # an empty document adds nothing, not even EOS
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": d}) for d in docs))
    return path


def _stream(section: DataSection, tokenizer) -> list[int]:
    """The PI paper's definition: every document's tokens then EOS, one stream."""
    tokens: list[int] = []
    for record in load_raw(section):
        if record["body"]:
            tokens += tokenizer(record["body"])["input_ids"] + [tokenizer.eos_token_id]
    return tokens


def _legacy_short_mix(blocks: list[list[int]], short_len: int, fraction: float,
                      seed: int) -> list[list[int]]:
    """pi-lora's earlier list-based short mix (the behaviour the Arrow version keeps)."""
    pieces, n = len(blocks[0]) // short_len, len(blocks)
    k = round(fraction * n / (pieces - fraction * pieces + fraction))
    rng = random.Random(seed)
    chosen = set(rng.sample(range(n), min(k, n)))
    out: list[list[int]] = []
    for i, block in enumerate(blocks):
        out += [block[j * short_len:(j + 1) * short_len] for j in range(pieces)] \
            if i in chosen else [block]
    rng.shuffle(out)
    return out


def test_pretrain_blocks_are_the_document_stream_cut_every_seq_len(tokenizer, documents: Path,
                                                                   tmp_path: Path) -> None:
    section = DataSection(files=[str(documents)], text_field="body")
    built = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    stream = _stream(section, tokenizer)
    expected = [stream[i:i + 64] for i in range(0, len(stream) - 63, 64)]
    assert built.train["input_ids"] == expected
    assert built.tokens == 64 * len(expected) and "labels" not in built.train.column_names

    capped = DataSection(files=[str(documents)], text_field="body", max_tokens=64 * 5 + 10)
    assert build_train_dataset(capped, tokenizer, 64, seed=0,
                               cache_dir=tmp_path / "c").train["input_ids"] == expected[:5]


def test_short_mix_equals_the_list_algorithm(tokenizer, documents: Path, tmp_path: Path) -> None:
    plain = DataSection(files=[str(documents)], text_field="body")
    blocks = build_train_dataset(plain, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    mixed_section = DataSection(files=[str(documents)], text_field="body",
                                short_mix={"seq_len": 16, "fraction": 0.5})
    mixed = build_train_dataset(mixed_section, tokenizer, 64, seed=3, cache_dir=tmp_path / "c")
    expected = _legacy_short_mix(blocks.train["input_ids"], 16, 0.5, seed=3)
    assert mixed.train["input_ids"] == expected
    short = sum(len(row) == 16 for row in expected)
    assert abs(short / len(expected) - 0.5) < 0.05
    assert mixed.tokens == blocks.tokens  # no token lost
    assert mixed.tokens_per_sequence < 64  # what tokens/s counts: real tokens per row


def test_chat_mask_covers_only_assistant_turns(tokenizer) -> None:
    messages = [{"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "the king walks"},
                {"role": "user", "content": "and then"},
                {"role": "assistant", "content": "the queen runs"}]
    ids, mask = tokenizing.conversation_tokens(messages, tokenizer)
    assert len(ids) == len(mask)
    kept = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "the king walks" in kept and "the queen runs" in kept
    assert "hello" not in kept and "and then" not in kept


def _conversations(tmp_path: Path, rows: list[dict]) -> Path:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def test_chat_packs_keep_conversations_whole_and_apart(tokenizer, tmp_path: Path) -> None:
    """Each conversation lies contiguous in a pack with positions 0..len-1, and the model sees
    it exactly as it would alone (transformers reads the restarting position ids)."""
    from transformers import AutoModelForCausalLM

    from pi_lora.testing import tiny_config

    rows = [_chat(f"question {i} " * (i % 5 + 1), f"answer {i} " * (i % 3 + 1)) for i in range(30)]
    section = DataSection(files=[str(_conversations(tmp_path, rows))], format="chat")
    built = build_train_dataset(section, tokenizer, 96, seed=0, cache_dir=tmp_path / "c")
    alone = {tuple(tokenizing.conversation_tokens(r["messages"], tokenizer)[0]) for r in rows}
    batch = PackedCollator(tokenizer.pad_token_id)([built.train[i] for i in range(len(built.train))])
    seen = set()
    for row, lengths in zip(batch["input_ids"], built.train[packing.LENGTHS], strict=True):
        start = 0
        for length in lengths:
            seen.add(tuple(row[start:start + length].tolist()))
            start += length
    assert seen == alone  # every conversation whole, none split across packs

    first = built.train[0]
    one = PackedCollator(tokenizer.pad_token_id)([first])
    starts = [0, *torch.tensor(first[packing.LENGTHS]).cumsum(0).tolist()[:-1]]
    assert all(one["position_ids"][0, s] == 0 for s in starts)
    assert all(one["labels"][0, s] == IGNORE_INDEX for s in starts)  # not predicted across
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    s, length = starts[1], first[packing.LENGTHS][1]
    with torch.no_grad():
        packed = model(input_ids=one["input_ids"], position_ids=one["position_ids"],
                       use_cache=False).logits
        single = model(input_ids=one["input_ids"][:, s:s + length]).logits
    torch.testing.assert_close(packed[0, s:s + length], single[0], atol=1e-5, rtol=1e-5)


def test_long_conversations_are_counted_never_cut_silently(tokenizer, tmp_path: Path) -> None:
    rows = [_chat("short question", "short answer"),
            _chat("long question " * 40, "answer past the window"),  # answer beyond seq_len
            _chat("q", "a long answer " * 40)]  # answer starts inside, is cut
    section = DataSection(files=[str(_conversations(tmp_path, rows))], format="chat")
    built = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    counts = built.conversations
    assert (counts.conversations, counts.truncated, counts.dropped) == (3, 1, 1)
    assert all(sum(mask) > 0 for mask in built.train[packing.MASK])


def test_instruction_rows_train_on_the_output(tokenizer, tmp_path: Path) -> None:
    rows = [{"instruction": f"summarise {i}", "input": "the king walks" if i % 2 else "",
             "output": f"done {i}"} for i in range(6)]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    section = DataSection(files=[str(path)], format="instruction")
    built = build_train_dataset(section, tokenizer, 128, seed=0, cache_dir=tmp_path / "c")
    batch = PackedCollator(tokenizer.pad_token_id)([built.train[0]])
    trained = tokenizer.decode([t for t in batch["labels"][0].tolist() if t != IGNORE_INDEX])
    assert "done" in trained and "summarise" not in trained and "king" not in trained


def test_collator_right_pads_and_derives_labels() -> None:
    batch = PackedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    packed = PackedCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7, 8, 9], "assistant_masks": [0, 1, 1, 1, 1], "seq_lengths": [3, 2]},
        {"input_ids": [1, 2], "assistant_masks": [1, 1], "seq_lengths": [2]}])
    assert packed["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9],
                                         [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]


def test_cache_is_reused_and_keyed_by_content(tokenizer, tmp_path: Path, documents: Path) -> None:
    section = DataSection(files=[str(documents)], text_field="body", validation_sequences=2)
    first = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    assert first.validation is not None and len(first.validation) == 2
    again = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    assert again.cache_path == first.cache_path and len(again.train) == len(first.train)
    assert build_train_dataset(section, tokenizer, 32, seed=0,
                               cache_dir=tmp_path / "c").cache_path != first.cache_path
    text = documents.read_text()
    documents.write_text(text.replace("a", "b", 1) if "a" in text else text.upper())  # same size
    changed = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    assert changed.cache_path != first.cache_path
    assert not list((tmp_path / "c").glob("*.tmp*"))  # no half-written entries


def test_data_errors_name_the_field(tokenizer, tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(PiLoraError) as info:
        build_train_dataset(DataSection(files=[str(tmp_path / "none*.txt")]), tokenizer, 64, seed=0)
    assert info.value.field == "data.files[0]"
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PiLoraError) as info:
        build_train_dataset(DataSection(files=[str(path)]), tokenizer, 64, seed=0,
                            cache_dir=tmp_path)
    assert info.value.field == "data.text_field" and "body" in info.value.fix
    with pytest.raises(PiLoraError, match="too few"):
        build_train_dataset(DataSection(files=[str(corpus)]), tokenizer, 10**6, seed=0,
                            cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.tmp*"))


def test_two_ranks_tokenize_once(tmp_path: Path) -> None:
    """Under torchrun (2 processes, gloo) one rank builds the cache while the other waits at
    the barrier, then memory-maps the same entry."""
    import os
    import subprocess
    import sys

    from pi_lora.train.distributed import free_port

    repo = Path(__file__).resolve().parent.parent
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in synthetic_text(400, seed=5)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "PI_LORA_CACHE": str(tmp_path / "cache"), "HF_DATASETS_OFFLINE": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
         str(free_port()), "-m", "benchmarks.bench_data_prep", "--rank-worker",
         str(corpus), "--cache", str(tmp_path)],
        env=env, cwd=repo, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines()
               if line.startswith("RESULT ")]
    assert sorted(r["built"] for r in results) == [False, True]
    assert len({r["cache"] for r in results}) == 1 and len({r["tokens"] for r in results}) == 1


def test_a_stream_gives_the_cached_blocks(tokenizer, documents: Path, tmp_path: Path) -> None:
    """data.streaming: the same blocks, packed as the files are read (shuffled in a buffer),
    max_tokens cuts the stream, validation rows are held out in memory."""
    cached = build_train_dataset(DataSection(files=[str(documents)], text_field="body"),
                                 tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    section = DataSection(files=[str(documents)], text_field="body", streaming=True,
                          validation_sequences=2)
    stream = build_train_dataset(section, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    assert stream.cache_path is None and stream.sequences is None and stream.tokens is None
    held_out = list(stream.validation["input_ids"])
    streamed = [row["input_ids"] for row in stream.train]
    blocks = list(cached.train["input_ids"])
    assert held_out == blocks[:2]
    assert sorted(held_out + streamed) == sorted(blocks)
    assert stream.tokens_per_sequence == 64
    capped = DataSection(files=[str(documents)], text_field="body", streaming=True,
                         max_tokens=64 * 5)
    rows = [r["input_ids"] for r in build_train_dataset(capped, tokenizer, 64, seed=0).train]
    assert sorted(rows) == sorted(blocks[:5])
    assert not list((tmp_path / "c").glob("*.tmp*"))


def test_a_chat_stream_packs_and_drops_answerless(tokenizer, tmp_path: Path) -> None:
    rows = [_chat("short question", "short answer"),
            _chat("long question " * 40, "answer past the window"),
            _chat("q", "a long answer " * 40)]
    section = DataSection(files=[str(_conversations(tmp_path, rows))], format="chat",
                          streaming=True)
    packs = list(build_train_dataset(section, tokenizer, 64, seed=0).train)
    assert sum(len(p[packing.LENGTHS]) for p in packs) == 2  # the answerless one is dropped
    assert all(len(p["input_ids"]) <= 64 and sum(p[packing.MASK]) > 0 for p in packs)


def test_max_tokens_reads_only_the_shards_it_needs(tokenizer, documents: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokenizing, "SHARD_DOCUMENTS", 20)
    seen: list[int] = []
    tokenize = tokenizing.tokenize_documents

    def counted(raw, *args, **kwargs):
        seen.append(len(raw))
        return tokenize(raw, *args, **kwargs)

    monkeypatch.setattr(tokenizing, "tokenize_documents", counted)
    full = build_train_dataset(DataSection(files=[str(documents)], text_field="body"),
                               tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    capped = DataSection(files=[str(documents)], text_field="body", max_tokens=64 * 3)
    seen.clear()
    built = build_train_dataset(capped, tokenizer, 64, seed=0, cache_dir=tmp_path / "c")
    assert list(built.train["input_ids"]) == list(full.train["input_ids"])[:3]
    assert sum(seen) < 200 and all(n == 20 for n in seen)  # not the whole corpus
