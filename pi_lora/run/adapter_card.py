"""The run's adapter directory, made safe for peft users: its README and the base config.

A LoRA adapter from a context-extension run is only half the model: without the run's rope
scaling and its trained embeddings and norms, `PeftModel.from_pretrained(base, adapter)` loads
without a warning and disagrees with the release (SmolLM2: 31.5% top-1 agreement). So the
adapter directory carries the base's config with the scaling applied (`base_config/`) and a
README whose code, run as written, reproduces the release's logits (tested); it also says why
the merged release is the artifact to ship.
"""

from __future__ import annotations

import json
from pathlib import Path

from pi_lora.model.loading import apply_sliding_window, load_config, resolve_source
from pi_lora.model.rope import RopePlan, apply_rope, with_legacy_rope_scaling
from pi_lora.recipe.loading import Recipe

BASE_CONFIG_DIR = "base_config"


def write_adapter_card(adapter_dir: Path, extras_path: Path | None, recipe: Recipe,
                       plan: RopePlan) -> None:
    """Replace peft's empty README template; save the scaled base config beside the adapter."""
    config = load_config(recipe.model)
    apply_rope(config, plan)
    apply_sliding_window(config, recipe.model)
    config.save_pretrained(str(adapter_dir / BASE_CONFIG_DIR))
    # transformers 4.x reads only the legacy keys: without them the README's code runs the
    # adapter unscaled there (the client matrix measured it: 11.6 off in log-probabilities)
    path = adapter_dir / BASE_CONFIG_DIR / "config.json"
    legacy = with_legacy_rope_scaling(json.loads(path.read_text()), plan)
    path.write_text(json.dumps(legacy, indent=2, sort_keys=True) + "\n")
    (adapter_dir / "README.md").write_text(adapter_readme(adapter_dir, extras_path, recipe, plan))


def peft_loading_code(adapter_dir: Path, extras_path: Path | None, recipe: Recipe) -> str:
    """Plain transformers + peft code that loads the run as it trained (no pi-lora needed)."""
    source = resolve_source(recipe.model)
    adapter = adapter_dir.resolve()
    options, gguf_lines = "", []
    if source.gguf_file:
        options = f", gguf_file={source.gguf_file!r}, **unpacked"
        # GgufConfig exists only in transformers 5 (which keeps GGUF blocks packed unless told);
        # 4.x always dequantizes: the same code then runs in both
        gguf_lines = [
            "# transformers 5 keeps GGUF blocks packed unless asked; 4.x always dequantizes",
            "unpacked = ({'quantization_config': transformers.GgufConfig(dequantize=True)}",
            "            if hasattr(transformers, 'GgufConfig') else {})",
        ]
    if recipe.model.revision:
        options += f", revision={recipe.model.revision!r}"
    lines = [
        "import torch",
        *(["import transformers"] if gguf_lines else []),
        "from peft import PeftModel",
        "from safetensors.torch import load_file",
        "from transformers import AutoConfig, AutoModelForCausalLM",
        "",
        *gguf_lines,
        "# the base's config with the run's rope scaling: without it the adapter runs unscaled",
        f"config = AutoConfig.from_pretrained({str(adapter / BASE_CONFIG_DIR)!r})",
        f"base = AutoModelForCausalLM.from_pretrained(\n    {source.path!r}, config=config, "
        f"dtype=torch.float32{options})",
    ]
    if extras_path is not None:
        lines += [
            "# the trained embeddings / norms (LongLoRA's LoRA+): part of the model, not of the "
            "adapter",
            f"extras = load_file({str(extras_path.resolve())!r})",
            "assert not base.load_state_dict(extras, strict=False).unexpected_keys",
        ]
    lines.append(f"model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()")
    return "\n".join(lines)


def adapter_readme(adapter_dir: Path, extras_path: Path | None, recipe: Recipe,
                   plan: RopePlan) -> str:
    extras = ", ".join(recipe.lora.trainable_extras) or "none"
    return f"""# LoRA adapter of a pi-lora run: not the whole model

This adapter was trained against `{recipe.model.name}` with **{plan.method}** rope scaling
(factor {plan.factor:g}, {plan.original_context} -> {plan.target_context} tokens) and with
trained extras ({extras}) saved beside it, in the run directory. Loaded on the plain base
(`PeftModel.from_pretrained(base, this_dir)` or `AutoPeftModelForCausalLM`), it runs without
the scaling and with the untrained embeddings and norms: it loads without a warning and
computes something else. Its `merge_and_unload()` + `save_pretrained` would ship a config
without the scaling (the failure LongLoRA #181 reports).

**To ship or serve: `pi-lora merge RUN_DIR`.** The release folds the adapter and the extras
into the weights, writes the scaling into config.json and checks the result against this
adapter before it is published.

To use the adapter with peft, load it exactly like this (it reproduces the release's logits):

```python
{peft_loading_code(adapter_dir, extras_path, recipe)}
```
"""
