"""Run directory -> release checkpoint that loads in plain transformers, verified.

Released long-context models that lost their rope scaling produced garbage (LongLoRA #181,
LLaMA-Factory #3370). So the release config carries the scaling, and before the directory
is published its logits are compared with base + adapter on a probe longer than the original
window, where lost scaling would show.

The merge streams (pi_lora.release.fold): base shards in, release shards out, so a 70B release is
made on a machine with far less RAM than the model; the check runs layer by layer for models
too big to hold twice (pi_lora.release.verification).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError

from pi_lora.core.signals import signals_raise
from pi_lora.core.errors import PiLoraError
from pi_lora.core.run_lock import RunLock
from pi_lora.model.base_weights import empty_model, open_base_weights
from pi_lora.model.loading import apply_sliding_window, load_config, load_tokenizer, resolve_source
from pi_lora.model.rope import RopePlan, apply_rope, with_legacy_rope_scaling
from pi_lora.model.serving import pin_vllm_window
from pi_lora.recipe.dtypes import TORCH_DTYPES
from pi_lora.recipe.loading import DType, Recipe
from pi_lora.release.files import (
    MERGE_REPORT_FILE,
    PROVENANCE_FILE,
    RELEASE_RECIPE_FILE,
    make_tokenizer_portable,
    release_provenance,
)
from pi_lora.release.fold import (
    BaseTensors,
    fold_release,
    plan_shards,
    release_tensor_names,
    requantizer,
)
from pi_lora.release.merge_checks import (
    VerifyMode,
    check_output,
    check_probe,
    clean_stale,
    parse_size,
    protected_paths,
    resolve_device,
    verify_mode,
)
from pi_lora.release.model_card import model_card
from pi_lora.release.verification import Comparison, compare_logits, verify_layers
from pi_lora.run.base_integrity import check_base_identity
from pi_lora.run.directory import RunFacts
from pi_lora.run.finished import Adapter, Run
from pi_lora.run.outcome import is_disk_full
from pi_lora.run.trained import load_trained

# max |logit difference| relative to max |logit|, by release dtype (rounding of merged weights)
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
DEFAULT_MAX_SHARD = "5GB"


@dataclass
class MergeReport:
    release_dir: str
    dtype: str
    probe_tokens: int
    max_abs_diff: float
    max_abs_logit: float
    relative_diff: float
    tolerance: float
    top1_agreement: float
    seconds: float
    verify: str = "full"
    layer_max_abs_diff: list[float] = field(default_factory=list)
    shards: int = 0
    largest_shard_bytes: int = 0
    lora_folded: int = 0
    extras_applied: int = 0
    device: str = "cpu"
    quantized_base: bool = False
    # release vs the quantized model as trained (QLoRA runs, full verification only)
    quantized_max_abs_diff: float | None = None
    quantized_top1_agreement: float | None = None


def merge_run(run_path: str | Path, output_dir: str | Path | None = None, *,
              dtype: DType | None = None, probe_tokens: int | None = None,
              overwrite: bool = False, verify: VerifyMode = "auto", device: str = "cpu",
              max_shard_size: str | int = DEFAULT_MAX_SHARD,
              allow_base_mismatch: bool = False, checkpoint: int | None = None) -> MergeReport:
    """Fold adapter + extras into the base shard by shard, verify, publish atomically;
    `checkpoint=N`: the adapter saved at step N.

    On CPU the caller should keep freed tensors from lingering in the heap (the CLI calls
    pi_lora.core.allocator.tune_cpu_allocator) so the peak stays one shard's."""
    started = time.time()
    run = Run.open(run_path, checkpoint)
    recipe, facts = run.recipe, run.facts
    name = run.path.resolve().name + (f"-step{checkpoint}" if checkpoint is not None else "")
    out = Path(output_dir) if output_dir else Path("release") / name
    release_dtype: DType = dtype or recipe.model.dtype
    check_output(out, overwrite, run.path, recipe)  # before any work; again under the lock
    check_base_identity(run, allow_mismatch=allow_base_mismatch)
    on_device = resolve_device(device)
    mode = verify_mode(verify, facts)
    check_probe(probe_tokens, run.plan)
    max_shard_bytes = parse_size(max_shard_size)
    with _output_lock(out):
        check_output(out, overwrite, run.path, recipe)  # again: the lock is ours now
        clean_stale(out)
        return _build_and_publish(run, out, release_dtype, on_device, max_shard_bytes, mode,
                                  probe_tokens, device, overwrite, started)


@contextlib.contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """One merge per --output at a time: a second one is refused up front, not after the work."""
    try:
        lock = RunLock.acquire(out)
    except PiLoraError as err:
        raise PiLoraError(f"{out} is being written by another pi-lora merge ({err.message})",
                          field="--output", fix="wait for it, or choose another --output"
                          ) from None
    try:
        yield
    finally:
        lock.release()


def _build_and_publish(run: Run, out: Path, release_dtype: DType, on_device: torch.device,
                       max_shard_bytes: int, mode: Literal["full", "layers"],
                       probe_tokens: int | None, device: str, overwrite: bool,
                       started: float) -> MergeReport:
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with signals_raise():
            tmp.mkdir(parents=True)
            inputs = open_inputs(run)
            stats = _fold(tmp, inputs, run, release_dtype, on_device, max_shard_bytes)
            report = verify_release(run, tmp, verify=mode, probe_tokens=probe_tokens,
                                    dtype=release_dtype, device=device, inputs=inputs)
            report.release_dir = str(out)
            report.seconds = time.time() - started
            report.shards, report.largest_shard_bytes = stats.shards, stats.largest_shard_bytes
            report.lora_folded, report.extras_applied = stats.lora_folded, stats.extras_applied
            (tmp / MERGE_REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
            _publish(tmp, out, run, overwrite)
    except (OSError, SafetensorError) as exc:  # safetensors' write errors are not OSErrors
        if not is_disk_full(exc):
            raise
        raise PiLoraError(f"the disk filled while writing the release: {str(exc)[:200]}",
                          field="--output", fix="free space or choose another --output; "
                          "nothing was published") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _publish(tmp: Path, out: Path, run: Run, overwrite: bool) -> None:
    """Replace `out` by the verified `tmp`, ownership and --overwrite checked again at the
    moment of the rename (under the output lock): a directory that appeared meanwhile is
    never replaced without --overwrite, and only a release pi-lora wrote is ever removed."""
    from pi_lora.core.safe_paths import follow_umask, remove_owned_dir
    from pi_lora.release.files import is_release

    check_output(out, overwrite, run.path, run.recipe)
    remove_owned_dir(out, owned=is_release, what="release",
                     protect=protected_paths(run.path, run.recipe), field="--output")
    follow_umask(tmp)  # model*.safetensors come out 0600; a release is read by others
    if out.is_dir():  # an empty directory left in place: os.replace needs it gone
        out.rmdir()
    os.replace(tmp, out)


# --------------------------------------------------------------------------- the fold


def reference_config(recipe: Recipe, plan: RopePlan) -> Any:
    """The base config as the run trained it: the rope plan and the attention window applied."""
    config = load_config(recipe.model)
    apply_rope(config, plan)
    apply_sliding_window(config, recipe.model)
    return config


@dataclass
class MergeInputs:
    """What the fold and the layer check both read, opened once: the base config as trained,
    its meta-device skeleton, the base weights (with the extras) and the adapter."""

    config: Any
    skeleton: Any
    base: BaseTensors
    adapter: Adapter


def open_inputs(run: Run) -> MergeInputs:
    recipe = run.recipe
    config = reference_config(recipe, run.plan)
    skeleton = empty_model(config)
    base = BaseTensors(open_base_weights(recipe.model, skeleton), run.extras)
    if recipe.model.quantization is not None:
        base.requantize, base.quantized = requantizer(recipe.model, skeleton)
    return MergeInputs(config, skeleton, base, run.adapter)


def _fold(tmp: Path, inputs: MergeInputs, run: Run, release_dtype: DType, device: torch.device,
          max_shard_bytes: int) -> Any:
    out_dtype = TORCH_DTYPES[release_dtype]
    shards = plan_shards(inputs.base.weights.groups(), release_tensor_names(inputs.skeleton),
                         out_dtype, max_shard_bytes)
    stats = fold_release(tmp, inputs.base, inputs.adapter, shards, out_dtype, device)
    _write_release_files(tmp, inputs.config, type(inputs.skeleton).__name__, run.recipe,
                         run.plan, run.facts, release_dtype)
    return stats


def _write_release_files(out: Path, config: Any, architecture: str, recipe: Recipe,
                         plan: RopePlan, facts: RunFacts, dtype: DType) -> None:
    config = copy.deepcopy(config)
    config.max_position_embeddings = plan.max_position_embeddings
    config.architectures = [architecture]
    config.dtype = TORCH_DTYPES[dtype]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    _generation_config(recipe, config).save_pretrained(str(out))
    load_tokenizer(recipe.model).save_pretrained(str(out))
    make_tokenizer_portable(out, plan.target_context, _base_tokenizer_class(recipe))
    _mirror_legacy_rope_scaling(out / "config.json", plan)
    (out / RELEASE_RECIPE_FILE).write_text(recipe.to_yaml())  # the run's recipe, as read
    provenance = release_provenance(facts, dtype)
    (out / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card(recipe, plan, facts, dtype, provenance))


def _base_tokenizer_class(recipe: Recipe) -> str | None:
    """The concrete class the base's own tokenizer_config.json names, if it has one."""
    path = Path(recipe.model.tokenizer or recipe.model.name).expanduser() / "tokenizer_config.json"
    try:
        name = json.loads(path.read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and name != "TokenizersBackend" else None


def _generation_config(recipe: Recipe, config: Any) -> Any:
    """The base's generation_config.json when it has one, else the one its config implies."""
    from transformers import GenerationConfig

    source = resolve_source(recipe.model)
    if not source.gguf_file:
        kwargs = {"revision": recipe.model.revision} if recipe.model.revision else {}
        try:
            return GenerationConfig.from_pretrained(source.path, **kwargs)
        except (OSError, ValueError):
            pass
    return GenerationConfig.from_model_config(config)


def _mirror_legacy_rope_scaling(config_path: Path, plan: RopePlan) -> None:
    """transformers < 5 reads `rope_scaling` + `rope_theta`; 5.x reads `rope_parameters`;
    vLLM's default window is pinned to the target (serving.py)."""
    config = pin_vllm_window(with_legacy_rope_scaling(json.loads(config_path.read_text()), plan), plan)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- verification


def verify_release(run_path: str | Path | Run, release_dir: str | Path, *,
                   verify: Literal["full", "layers"] = "layers", probe_tokens: int | None = None,
                   dtype: DType | None = None, device: str = "cpu",
                   inputs: MergeInputs | None = None) -> MergeReport:
    """Compare a release with the run's base + adapter; raise when they disagree.

    `inputs`: the base and adapter the merge already opened (opened here when not given)."""
    started = time.time()
    run = run_path if isinstance(run_path, Run) else Run.open(run_path)
    recipe, plan = run.recipe, run.plan
    release_dtype: DType = dtype or recipe.model.dtype
    release = Path(release_dir)
    config = inputs.config if inputs is not None else reference_config(recipe, plan)
    probe = _probe_ids(config.vocab_size, plan, probe_tokens)
    quantized: Comparison | None = None
    if verify == "layers":
        inputs = inputs or open_inputs(run)
        comparison = verify_layers(config, release, inputs.base, inputs.adapter, probe,
                                   resolve_device(device))
    else:
        comparison, quantized = _verify_full(run, release, probe, recipe.model.quantization
                                             is not None)
    report = MergeReport(
        str(release), release_dtype, probe.shape[1], comparison.max_abs_diff,
        comparison.max_abs_logit, comparison.relative_diff, RELATIVE_TOLERANCE[release_dtype],
        comparison.top1_agreement, time.time() - started, verify=verify,
        layer_max_abs_diff=comparison.layer_max_abs_diff, device=device,
        quantized_base=recipe.model.quantization is not None)
    if quantized is not None:  # stated, not enforced: the release is deliberately unquantized
        report.quantized_max_abs_diff = quantized.max_abs_diff
        report.quantized_top1_agreement = quantized.top1_agreement
    if not report.relative_diff <= report.tolerance:
        worst = ""
        if comparison.layer_max_abs_diff:
            layer = max(range(len(comparison.layer_max_abs_diff)),
                        key=lambda i: comparison.layer_max_abs_diff[i])
            worst = f"; largest hidden-state difference at layer {layer}"
        raise PiLoraError(
            f"merged release disagrees with base + adapter: max |diff| "
            f"{report.max_abs_diff:.4g} ({report.relative_diff:.2%} of max |logit|, tolerance "
            f"{report.tolerance:.2%}){worst}",
            field="RUN_DIR", fix="nothing was published; report this with the run directory")
    return report


def _probe_ids(vocab_size: int, plan: RopePlan, probe_tokens: int | None) -> torch.Tensor:
    """Random tokens reaching past the original window, where rope scaling matters."""
    length = probe_tokens or min(plan.target_context, plan.original_context + 128)
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (1, length), generator=generator)


def _verify_full(run: Run, release: Path, probe: torch.Tensor,
                 quantized_run: bool) -> tuple[Comparison, Comparison | None]:
    """Whole models, one at a time: base + adapter (peft), then the release from disk."""
    from transformers import AutoModelForCausalLM

    reference = _logits(load_trained(run, "fp32", dequantize=True), probe)
    as_trained = _logits(load_trained(run, "fp32"), probe) if quantized_run else None
    reloaded = AutoModelForCausalLM.from_pretrained(str(release), dtype=torch.float32)
    logits = _logits(reloaded, probe)
    comparison = compare_logits(logits, reference)
    return comparison, (compare_logits(logits, as_trained) if as_trained is not None else None)


def _logits(model: Any, probe: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        logits = model(probe).logits.float()
    del model
    return logits
