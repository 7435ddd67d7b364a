"""Book-length documents: pieces cut only where the tokens come out as for the whole text."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from pi_lora.data import tokenizing
from pi_lora.testing import make_tokenizer, synthetic_text

PLAYS = Path(__file__).resolve().parents[1] / "pi_lora" / "demo" / "data" / "plays.jsonl.gz"


def _whole(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return [*ids, tokenizer.eos_token_id]


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_a_long_document_in_pieces_has_the_whole_texts_tokens(which: str) -> None:
    if which == "demo":
        tokenizer = AutoTokenizer.from_pretrained(str(PLAYS.parents[1] / "base"))
        with gzip.open(PLAYS, "rt") as f:
            text = "\n".join(json.loads(line)["text"] for _, line in zip(range(4), f, strict=False))
    else:
        tokenizer = make_tokenizer()
        text = "\n".join(synthetic_text(3000, seed=3))
    assert len(text) > 3 * tokenizing.PIECE_CHARS
    cuts = tokenizing.exact_cuts(text, tokenizer.backend_tokenizer)
    assert len(cuts) >= 3  # it was cut
    ids = tokenizing.DocumentEncoder(tokenizer).encode([text, "", "short text"])
    assert ids[0].dtype == np.int32 and ids[0].tolist() == _whole(tokenizer, text)
    assert ids[1].tolist() == [] and ids[2].tolist() == _whole(tokenizer, "short text")


def test_a_tokenizer_that_prefixes_every_text_gets_no_cut() -> None:
    """A normalizer that prepends to each text would change the tokens at every cut: the
    window check refuses them all and the document is encoded whole."""
    from tokenizers import normalizers

    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.normalizer = normalizers.Prepend("zq")
    text = "\n".join(synthetic_text(2000, seed=4))
    assert tokenizing.exact_cuts(text, tokenizer.backend_tokenizer) == []
    assert tokenizing.DocumentEncoder(tokenizer).encode([text])[0].tolist() == _whole(tokenizer, text)


def test_batches_are_sized_by_the_longest_rows_bytes() -> None:
    import datasets

    rows = ["x" * 10] * 50 + ["y" * (tokenizing.TEXT_BUDGET_BYTES // 4)]
    data = datasets.Dataset.from_dict({"text": rows})
    assert tokenizing.batch_rows(data, ["text"]) == 4
    chat = datasets.Dataset.from_dict({"m": [[{"role": "user", "content": "abc"},
                                              {"role": "assistant", "content": "de"}]]})
    assert tokenizing.text_bytes(chat.data.table, ["m"]).tolist() == [len("userabcassistantde")]


def _digest(rows) -> tuple[int, str]:
    import hashlib

    h, n = hashlib.sha256(), 0
    for row in rows:
        h.update(json.dumps(list(map(int, row))).encode())
        n += 1
    return n, h.hexdigest()[:16]


def test_the_demo_corpus_packs_to_the_blocks_it_packed_before(tmp_path: Path) -> None:
    """Digests recorded with the row-batched tokenizer (commit cc89715): the demo's table
    rests on these blocks, so the token-budgeted path must give them exactly."""
    from pi_lora.data.build import build_train_dataset
    from pi_lora.demo.run import write_data
    from pi_lora.recipe.loading import DataSection

    train_file, _ = write_data(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(PLAYS.parents[1] / "base"))
    built = build_train_dataset(DataSection(files=[str(train_file)], cache_dir=str(tmp_path / "c")),
                                tokenizer, 256, seed=0)
    rows = list(built.train["input_ids"]) + list(built.validation["input_ids"] if built.validation else [])
    assert (built.tokens, *_digest(rows)) == (1724928, 6738, "24833639db97023b")
