"""pi-lora's merge before it streamed (commit 63d8ec0), kept only as the benchmark's baseline.

Whole base in RAM (fp32 while 8 bytes/param fit in half the RAM), peft's merge_and_unload,
save_pretrained, then the whole release reloaded in fp32 for the logits check.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pi_lora.recipe.dtypes import TORCH_DTYPES
from pi_lora.run.directory import RunDir
from pi_lora.run.finished import Run
from pi_lora.run.trained import load_trained


def legacy_merge(run_path: Path, out: Path, dtype: str, max_shard_size: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    run = RunDir(run_path)
    facts = run.read_facts()
    plan = facts.rope_plan
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    work = "fp32" if facts.total_parameters * 8 < ram / 2 else dtype
    model = load_trained(Run.open(run_path), work, dequantize=True)
    length = min(plan.target_context, plan.original_context + 128)
    probe = torch.randint(0, model.config.vocab_size, (1, length),
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(probe).logits.float()
    merged = model.merge_and_unload(safe_merge=True).to(TORCH_DTYPES[dtype])
    merged.config.max_position_embeddings = plan.max_position_embeddings
    merged.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    del merged, model
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        logits = reloaded(probe).logits.float()
    return {"max_abs_diff": (logits - reference).abs().max().item(), "work_dtype": work}
