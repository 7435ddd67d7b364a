"""A finished run, read once: recipe.yaml, run.json (its rope plan typed), the LoRA adapter and
the trained extras, each opened one time and checked (complete, finite, foldable).

Merge, eval, the base-integrity check and loading a trained run all take this one object, so
none of them re-reads the run directory: one `pi-lora merge` opens run.json and recipe.yaml
once, and the adapter weights once to fold plus once to verify by reloading through peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.rope import RopePlan
from pi_lora.recipe.loading import Recipe
from pi_lora.run.directory import RunDir, RunFacts

if TYPE_CHECKING:
    from peft import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_RESAVE = "resume the run with `pi-lora train RECIPE --resume` so it saves its adapter again"


@dataclass(frozen=True)
class Adapter:
    """LoRA pairs keyed by the base weight they change: name -> (A [r, in], B [out, r], scale),
    fp32, as peft's adapter_config (parsed by peft's own LoraConfig) defines them."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    config: LoraConfig

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.fan_in_fan_out)

    def delta(self, name: str, device: torch.device) -> torch.Tensor | None:
        """peft's delta weight: (B @ A) * scale, in fp32 on `device`."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        a, b, scale = pair
        delta = (b.to(device) @ a.to(device)) * scale
        return delta.T if self.fan_in_fan_out else delta

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.pairs.values())


@dataclass(frozen=True)
class Run:
    """What `pi-lora train` left, read and checked once. Build it with `Run.open(path)`."""

    directory: RunDir
    recipe: Recipe
    facts: RunFacts
    plan: RopePlan
    adapter: Adapter
    extras: dict[str, torch.Tensor]  # trained embeddings / norms under their base names
    adapter_dir: Path  # adapter/ of the finished run, or checkpoints/checkpoint-N

    @property
    def path(self) -> Path:
        return self.directory.path

    @classmethod
    def open(cls, path: str | Path, checkpoint: int | None = None) -> Run:
        """Read the run; a run that did not finish well is one user error naming the fix:
        still training, killed, failed, a missing or pickled adapter, non-finite weights.
        `checkpoint=N` reads the adapter and extras saved at step N instead (a budget curve,
        or the good step of a run that later diverged): the run need not have finished."""
        directory = RunDir(path)
        recipe = directory.load_recipe()
        facts = directory.read_facts()
        if checkpoint is None:
            directory.check_finished(facts)
            weights_dir, extras_path = directory.adapter_dir, directory.extras_path
        else:
            weights_dir = _complete_checkpoint(directory, checkpoint)
            extras_path = weights_dir / directory.extras_path.name
            facts = facts.model_copy(update={"status": "complete", "steps": checkpoint,
                                             "final_loss": _loss_at(weights_dir, checkpoint)})
        extras = _read_safetensors(extras_path) if facts.extras else {}
        adapter = read_adapter(weights_dir)
        _check_finite(directory, extras, adapter)
        return cls(directory, recipe, facts, facts.rope_plan, adapter, extras, weights_dir)


def _complete_checkpoint(directory: RunDir, step: int) -> Path:
    """checkpoints/checkpoint-STEP, written to the end (its trainer_state.json is there)."""
    found = {int(p.name.rsplit("-", 1)[1]): p for p in directory.checkpoints()}
    if step not in found:
        have = ", ".join(map(str, found)) or "none"
        raise PiLoraError(f"{directory.path} has no complete checkpoint at step {step} "
                          f"(complete checkpoints: {have})", field="--checkpoint",
                          fix="pick one of those steps, or leave --checkpoint out for the "
                              "run's final adapter")
    return found[step]


def _loss_at(checkpoint_dir: Path, step: int) -> float | None:
    """The training loss logged at the checkpoint's step (trainer_state.json's history)."""
    import json

    try:
        history = json.loads((checkpoint_dir / "trainer_state.json").read_text())["log_history"]
    except (OSError, ValueError, KeyError):
        return None
    losses = [h["loss"] for h in history if "loss" in h and h.get("step", 0) <= step]
    return float(losses[-1]) if losses else None


def read_adapter(adapter_dir: Path) -> Adapter:
    """The run's saved peft adapter (safetensors only), checked for what the fold supports."""
    from peft import LoraConfig

    try:
        config = LoraConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as exc:
        raise PiLoraError(f"{adapter_dir / ADAPTER_CONFIG} is unreadable: {str(exc)[:200]}",
                          field="RUN_DIR", fix=_RESAVE) from None
    _check_adapter_config(config, adapter_dir)
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    tensors = _read_safetensors(weights_path)
    r, alpha = int(config.r), float(config.lora_alpha)
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix(_PEFT_PREFIX)
        b = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            found = "no lora_B partner" if b is None else f"A {tuple(a.shape)}, B {tuple(b.shape)}"
            raise PiLoraError(f"{weights_path}: {key} is not a LoRA pair ({found})",
                              field="RUN_DIR", fix=_RESAVE)
        pairs[f"{module}.weight"] = (a.float(), b.float(), scale)
    if not pairs:
        raise PiLoraError(f"{weights_path} holds no LoRA weights", field="RUN_DIR",
                          fix="point at a run directory written by `pi-lora train`")
    return Adapter(pairs, config)


def _check_adapter_config(config: LoraConfig, adapter_dir: Path) -> None:
    named = {"use_dora": config.use_dora, "rank_pattern": config.rank_pattern,
             "alpha_pattern": config.alpha_pattern, "modules_to_save": config.modules_to_save}
    unsupported = [key for key, value in named.items() if value]
    if config.bias != "none":
        unsupported.append(f"bias={config.bias}")
    if str(config.peft_type.value if config.peft_type else "LORA") != "LORA":
        unsupported.append(f"peft_type={config.peft_type}")
    if unsupported:
        raise PiLoraError(f"{adapter_dir / ADAPTER_CONFIG} uses {unsupported}, which "
                          "pi-lora's merge does not fold", field="RUN_DIR",
                          fix="merge this adapter with peft's merge_and_unload instead")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A whole safetensors file; a truncated or garbled one is a user error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, ValueError, SafetensorError) as exc:
        raise PiLoraError(f"{path} is unreadable ({type(exc).__name__}: {str(exc)[:160]})",
                          field="RUN_DIR", fix=_RESAVE) from None


def _check_finite(directory: RunDir, extras: dict[str, torch.Tensor], adapter: Adapter) -> None:
    named = [*((f"{directory.extras_path}", n, t) for n, t in extras.items()),
             *((f"{directory.adapter_dir / ADAPTER_WEIGHTS}", n, t)
               for n, (a, b, _) in adapter.pairs.items() for t in (a, b))]
    bad: dict[str, list[str]] = {}
    for file, name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad.setdefault(file, []).append(name)
    if bad:
        file, names = next(iter(bad.items()))
        raise PiLoraError(f"{file} holds NaN/inf values ({', '.join(names[:3])})",
                          field="RUN_DIR", fix="retrain with a lower training.learning_rate"
                          f"{directory.latest_checkpoint_hint()}")
