"""Each tool's own config for the same job (bench_peers.py's docstring says which job).

Every tool gets its documented options for this job, its memory options on, and nothing of
pi-lora's: LLaMA-Factory's `additional_target` and axolotl's `lora_modules_to_save` are how
their users train embeddings and norms next to LoRA; axolotl's `chunked_cross_entropy` is its
answer to the [T, V] logits.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ORIGINAL, TARGET = 8192, 16384
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXTRAS = ["embed_tokens", "input_layernorm", "post_attention_layernorm", "norm"]
LEARNING_RATE = 2e-4


def command(tool: str, length: int, steps: int, model_dir: Path, data_file: Path, run_dir: Path,
            python: Path | None, device: str) -> list[str]:
    """Write the tool's config into run_dir; return the command that trains with it."""
    writer = {"pi-lora": _pi_lora, "llamafactory": _llamafactory, "axolotl": _axolotl,
              "plain": _plain}[tool]
    return writer(length, steps, model_dir, data_file, run_dir, python, device)


def _linear(model_dir: Path) -> dict:
    """Linear x2 as transformers 5 reads it (rope_theta inside the rope parameters)."""
    config = json.loads((model_dir / "config.json").read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta")
    return {"rope_type": "linear", "factor": TARGET / ORIGINAL, "rope_theta": theta}


def _dump(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _pi_lora(length, steps, model_dir, data_file, run_dir, python, device):
    recipe = _dump(run_dir / "recipe.yaml", {
        "model": {"name": str(model_dir), "dtype": "fp32", "attn_implementation": "sdpa"},
        "rope": {"method": "linear", "original_context": ORIGINAL, "target_context": TARGET},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": LORA_TARGETS,
                 "trainable_extras": ["embeddings", "norms"]},
        "data": {"files": [str(data_file)], "format": "pretrain", "seq_len": length},
        "training": {"max_steps": steps, "learning_rate": LEARNING_RATE, "warmup_steps": 0,
                     "lr_scheduler": "constant_with_warmup", "per_device_batch_size": 1,
                     "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
                     "precision": "fp32", "save_steps": 100000, "logging_steps": 1,
                     "deepspeed": None, "report_to": "none"},
        "output_dir": str(run_dir / "out"),
    })
    return [sys.executable, "-m", "pi_lora.cli", "train", str(recipe), "--overwrite"]


def _llamafactory(length, steps, model_dir, data_file, run_dir, python, device):
    config = _dump(run_dir / "llamafactory.yaml", {
        "model_name_or_path": str(model_dir), "stage": "pt", "do_train": True,
        "finetuning_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target": ",".join(LORA_TARGETS), "additional_target": ",".join(EXTRAS),
        "dataset": "peers", "dataset_dir": str(data_file.parent), "cutoff_len": length,
        "packing": False, "rope_scaling": "linear",  # LF drops it: cutoff_len <= native window
        "flash_attn": "sdpa", "output_dir": str(run_dir / "out"), "overwrite_output_dir": True,
        "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1,
        "learning_rate": LEARNING_RATE, "max_steps": steps, "lr_scheduler_type": "constant",
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "bf16": False,
        "fp16": False, "preprocessing_num_workers": 1, "dataloader_num_workers": 0,
        "overwrite_cache": True, "use_cpu": device == "cpu",
    })
    return [str(python), "-m", "llamafactory.cli", "train", str(config)]


def _axolotl(length, steps, model_dir, data_file, run_dir, python, device):
    config = _dump(run_dir / "axolotl.yaml", {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data_file), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(run_dir / "prepared"), "val_set_size": 0,
        "sequence_len": length, "sample_packing": False, "pad_to_sequence_len": False,
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "lora_target_modules": LORA_TARGETS, "lora_modules_to_save": EXTRAS,
        "overrides_of_model_config": {"rope_scaling": _linear(model_dir),
                                      "max_position_embeddings": TARGET},
        "gradient_checkpointing": True, "sdp_attention": True, "chunked_cross_entropy": True,
        "micro_batch_size": 1, "gradient_accumulation_steps": 1, "max_steps": steps,
        "num_epochs": 1, "learning_rate": LEARNING_RATE, "lr_scheduler": "constant",
        "optimizer": "adamw_torch", "logging_steps": 1, "save_strategy": "no",
        "output_dir": str(run_dir / "out"), "bf16": False, "fp16": False, "tf32": False,
        "dataloader_num_workers": 0, "dataset_processes": 1,
    })
    return [str(python), "-m", "axolotl.cli.train", str(config)]


def _plain(length, steps, model_dir, data_file, run_dir, python, device):
    settings = run_dir / "plain.json"
    settings.write_text(json.dumps({
        "model": str(model_dir), "data": str(data_file), "length": length, "steps": steps,
        "lora_targets": LORA_TARGETS, "extras": EXTRAS, "lr": LEARNING_RATE,
        "rope_scaling": _linear(model_dir), "max_position_embeddings": TARGET,
        "out": str(run_dir / "out"), "device": device}))
    return [sys.executable, str(HERE / "plain_hf.py"), str(settings)]
