"""Keys other fine-tuning tools' YAML uses (axolotl, LLaMA-Factory), mapped to pi-lora's
fields: a recipe ported from one gets "pi-lora's is model.name" for `base_model`, where a
spelling match would point at an unrelated key of the same section."""

from __future__ import annotations

from pydantic import BaseModel

AXOLOTL = "axolotl"
LLAMA_FACTORY = "LLaMA-Factory"
BOTH = "axolotl's and LLaMA-Factory"

# key -> (whose name it is, pi-lora's field or what to do instead)
FOREIGN_KEYS: dict[str, tuple[str, str]] = {
    "base_model": (AXOLOTL, "model.name"),
    "base_model_config": (AXOLOTL, "model.name (the config is read from the model)"),
    "tokenizer_config": (AXOLOTL, "model.tokenizer"),
    "lora_r": (AXOLOTL, "lora.r"),
    "lora_alpha": (BOTH, "lora.alpha"),
    "lora_dropout": (BOTH, "lora.dropout"),
    "lora_target_modules": (AXOLOTL, "lora.target_modules"),
    "datasets": (AXOLOTL, "data.files (local files) or data.dataset.name (a hub dataset)"),
    "sequence_len": (AXOLOTL, "data.seq_len (defaults to rope.target_context)"),
    "num_epochs": (AXOLOTL, "training.max_steps (pi-lora counts optimizer steps)"),
    "micro_batch_size": (AXOLOTL, "training.per_device_batch_size"),
    "load_in_4bit": (AXOLOTL, "model.quantization.bits: 4"),
    "load_in_8bit": (AXOLOTL, "model.quantization.bits: 8"),
    "flash_attention": (AXOLOTL, "model.attn_implementation: flash_attention_2"),
    "adapter": (AXOLOTL, "the lora section (pi-lora always trains a LoRA adapter)"),
    "model_name_or_path": (LLAMA_FACTORY, "model.name"),
    "cutoff_len": (LLAMA_FACTORY, "data.seq_len (defaults to rope.target_context)"),
    "lora_rank": (LLAMA_FACTORY, "lora.r"),
    "lora_target": (LLAMA_FACTORY, "lora.target_modules"),
    "dataset": (LLAMA_FACTORY, "data.files (local files) or data.dataset.name (a hub dataset)"),
    "template": (LLAMA_FACTORY, "data.format: chat (the tokenizer's own chat template is used)"),
    "finetuning_type": (LLAMA_FACTORY, "the lora section (pi-lora always trains a LoRA adapter)"),
    "num_train_epochs": (LLAMA_FACTORY, "training.max_steps (pi-lora counts optimizer steps)"),
    "per_device_train_batch_size": (LLAMA_FACTORY, "training.per_device_batch_size"),
    "lr_scheduler_type": (LLAMA_FACTORY, "training.lr_scheduler"),
    "warmup_ratio": (LLAMA_FACTORY, "training.warmup_steps"),
    "quantization_bit": (LLAMA_FACTORY, "model.quantization.bits"),
    "rope_scaling": (BOTH, "rope.method and rope.target_context"),
    "bf16": (BOTH, "training.precision: bf16 (and model.dtype: bf16)"),
    "fp16": (BOTH, "training.precision: fp16 (and model.dtype: fp16)"),
}


def foreign_key_fix(key: str, sections: dict[str, type[BaseModel]],
                    here: str) -> tuple[str, str] | None:
    """(what the key is, where pi-lora keeps it) for a key another tool spells this way, or
    for one of pi-lora's own fields written in the wrong section (`learning_rate` at the top
    level is training.learning_rate); None when neither."""
    if key in FOREIGN_KEYS:
        tool, ours = FOREIGN_KEYS[key]
        return f"{tool}'s name", f"pi-lora's is {ours}"
    homes = [name for name, cls in sections.items() if key in cls.model_fields and name != here]
    if homes:
        return (f"a {' or '.join(homes)} setting",
                f"pi-lora's is {' or '.join(f'{name}.{key}' for name in homes)}")
    return None
