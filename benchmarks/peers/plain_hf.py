"""The plain way: transformers Trainer + peft LoRA, as their docs show it (full logits).

    python benchmarks/peers/plain_hf.py SETTINGS.json      # written by bench_peers.py
"""

from __future__ import annotations

import json
import sys

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)


def main(path: str) -> None:
    with open(path) as f:
        s = json.load(f)
    config = AutoConfig.from_pretrained(s["model"])
    config.rope_scaling = s["rope_scaling"]
    config.max_position_embeddings = s["max_position_embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(s["model"])
    model = AutoModelForCausalLM.from_pretrained(s["model"], config=config, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=s["lora_targets"],
                                             modules_to_save=s["extras"], task_type="CAUSAL_LM"))
    rows = load_dataset("json", data_files=s["data"], split="train")
    rows = rows.map(lambda r: tokenizer(r["text"], truncation=True, max_length=s["length"]),
                    remove_columns=rows.column_names)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    args = TrainingArguments(output_dir=s["out"], per_device_train_batch_size=1,
                             max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="constant",
                             logging_steps=1, save_strategy="no", report_to="none",
                             gradient_checkpointing=True, use_cpu=s["device"] == "cpu",
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=rows,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()


if __name__ == "__main__":
    main(sys.argv[1])
