"""Assemble a transformers Trainer from what the other modules built; no YAML, no loops.

The Trainer owns the loop, checkpointing, resume, gradient accumulation and DeepSpeed. We add
the chunked loss, saving the LongLoRA extras beside the adapter (checkpoints included, so a
resume restores them), and a progress line with tokens/s and ETA mirrored to metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.allocator import missing_tcmalloc_note, tune_cpu_allocator
from pi_lora.core.errors import PiLoraError
from pi_lora.core.run_lock import hold
from pi_lora.core.safe_paths import follow_umask
from pi_lora.data.build import BuiltData, PackedCollator, build_train_dataset
from pi_lora.data.pose import pose_skips
from pi_lora.model.loading import (
    base_parameter_name,
    load_config,
    load_model,
    load_tokenizer,
    wrap_lora,
)
from pi_lora.model.rope import RopePlan, plan_rope
from pi_lora.recipe.loading import DataSection, Recipe
from pi_lora.run.adapter_card import write_adapter_card
from pi_lora.run.directory import EXTRAS_FILE, RunDir, RunFacts, RunProvenance
from pi_lora.run.outcome import (
    describe_failure,
    disk_full_error,
    is_disk_full,
    record_failure,
    resume_failed,
    say_what_is_kept,
)
from pi_lora.run.provenance import IdentityJob, software
from pi_lora.train.arguments import progress_callback, tensorboard_callback, training_arguments
from pi_lora.train.distributed import (
    prepare_processes,
    process_info,
    world_size,
)
from pi_lora.train.sequence_parallel import (
    ShardedRows,
    check_launch,
    data_parallel_size,
    enable_tiled_mlp,
)
from pi_lora.train.trainer import loss_route, trainer_class


def check_training_device(recipe: Recipe) -> None:
    """GPU-only training options fail before anything is loaded or written."""
    if recipe.training.offload_checkpoints and not torch.cuda.is_available():
        raise PiLoraError("offload_checkpoints needs a CUDA GPU", field="training.offload_checkpoints",
                          fix="set it to false: on CPU the checkpoints already live in host memory")


def _rope_words(plan: RopePlan) -> str:
    """"linear x2 (8192 -> 16384)"; the direct control interpolates nothing, so it says so."""
    if plan.method == "none":
        return (f"plain RoPE, no interpolation (trained {plan.original_context} -> "
                f"{plan.target_context})")
    return f"{plan.method} x{plan.factor:g} ({plan.original_context} -> {plan.target_context})"


def _groups(recipe: Recipe) -> int:
    """Data-parallel groups: processes, or groups of sequence_parallel processes."""
    return data_parallel_size(recipe.training, world_size())


def _is_main() -> bool:
    return process_info().is_main


def build_training_model(recipe: Recipe, plan: RopePlan, device_map: Any = None) -> Any:
    """Base with the rope plan + LoRA (+ S2-Attn): the model every training step runs.

    Shared with benchmarks.plan_validation so the plan is validated on this very model.
    """
    model = load_model(recipe.model, plan, device_map=device_map)
    # a KV cache in training would also disable transformers' packed-sequence masking
    model.config.use_cache = False
    model = wrap_lora(model, recipe.lora, gradient_checkpointing=recipe.training.gradient_checkpointing)
    if recipe.training.s2_attn:
        from pi_lora.model.s2_attention import enable_s2_attention

        enable_s2_attention(model, recipe.training.s2_group_fraction)
    if recipe.training.tiled_mlp:
        enable_tiled_mlp(model, recipe.training)
    return model


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
          protect: Sequence[str | Path] = ()) -> Path:
    """Run the recipe; returns the run directory. Safe to start under torchrun/deepspeed.

    The main process holds the run's lock throughout (pi_lora.core.run_lock); everything that can
    fail on bad input (config, rope, tokenizer, data, weights) runs before the run directory
    is created, and a run that fails or diverges says so in run.json and exits non-zero.
    `protect`: paths --overwrite must never delete besides the recipe's inputs (the CLI
    passes the recipe file).
    """
    check_training_device(recipe)
    run = RunDir(recipe.output_dir)
    try:
        with hold(run.path, enabled=_is_main()):
            return _train(recipe, run, resume=resume, overwrite=overwrite, protect=protect)
    except Exception as exc:
        if not is_disk_full(exc) or isinstance(exc, PiLoraError):
            raise
        raise disk_full_error(exc) from exc


def _train(recipe: Recipe, run: RunDir, *, resume: bool, overwrite: bool,
           protect: Sequence[str | Path]) -> Path:
    from transformers import set_seed

    is_main = _is_main()
    allocator = tune_cpu_allocator() if not torch.cuda.is_available() else None
    note = missing_tcmalloc_note() if allocator and is_main else None
    if note:
        print(f"pi-lora: note: {note}", file=sys.stderr)
    config = load_config(recipe.model)
    check_launch(recipe, config, world_size())
    plan = plan_rope(recipe.rope, config)
    prepares = _prepares_run_dir(recipe)  # other ranks would race its mkdir
    replace = prepares and run.check_start(recipe, resume=resume, overwrite=overwrite,
                                           protect=protect)
    tokenizer = load_tokenizer(recipe.model)
    identity = IdentityJob(recipe.model, recipe.data, config) if is_main else None
    set_seed(recipe.training.seed)
    # arguments first: they join the process group, so the data is built once while the other
    # processes wait; and under ZeRO-3 they make from_pretrained load the model sharded
    args = training_arguments(recipe, run, prepare_processes(bool(recipe.training.deepspeed)),
                              evaluate=recipe.data.validation_sequences > 0)
    built = build_data_once(recipe.data, tokenizer, recipe.seq_len, recipe.training.seed, args)
    model = build_training_model(recipe, plan)
    if prepares and not resume:  # only now: a bad input above leaves nothing behind
        run.create(recipe, replace=replace, protect=protect)
    trainer = _build_trainer(recipe, run, args, model, tokenizer, built)
    trainable, total = model.get_nb_trainable_parameters()  # peft's count
    facts = None
    recorded = _recorded_facts(run) if resume and is_main else None
    if is_main:
        facts = _start_facts(recipe, plan, trainer.extras_names, trainable, total, built, allocator)
        facts.loss = loss_route(model, recipe.training.chunked_loss)[1]
        run.write_facts(facts)
        _announce(recipe, plan, built, trainable, total, facts)
    checkpoint = agreed_checkpoint(run) if resume else None
    if checkpoint is not None and is_main:
        _forget_metrics_after(run, _checkpoint_step(checkpoint))
        print(f"pi-lora: resuming from {checkpoint} (step {_checkpoint_step(checkpoint)})",
              flush=True)
    first_step = _first_step_seen(trainer)
    try:
        _fit(trainer, run, checkpoint, facts, identity)
    except BaseException as exc:
        # one rule for the record: a failure before the first new step changes nothing a
        # run recorded (a complete run stays complete, its adapter mergeable)
        if recorded is not None and not first_step.seen:
            if is_main:
                run.write_facts(recorded)
            if checkpoint is not None and isinstance(exc, Exception) \
                    and not isinstance(exc, PiLoraError):
                raise resume_failed(run, checkpoint, exc) from exc
            raise
        if facts is not None and not run.recorded_failure():  # a divergence says it better
            record_failure(run, facts, trainer.state.global_step, describe_failure(exc))
        if isinstance(exc, KeyboardInterrupt) and is_main:
            say_what_is_kept(run, trainer.state.global_step, trainer.state.max_steps)
        raise
    return run.path


def _recorded_facts(run: RunDir) -> RunFacts | None:
    """What run.json says before a resume rewrites it (None when it cannot be read)."""
    try:
        return run.read_facts()
    except PiLoraError:
        return None


def _first_step_seen(trainer: Any) -> Any:
    """A callback that notes the first optimizer step this process completes."""
    from transformers import TrainerCallback

    class FirstStep(TrainerCallback):
        seen = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.seen = True

    callback = FirstStep()
    trainer.add_callback(callback)
    return callback


def _fit(trainer: Any, run: RunDir, checkpoint: Path | None, facts: RunFacts | None,
         identity: IdentityJob | None) -> None:
    """Train, then save and mark complete only a run whose weights are finite."""
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if trainer.divergence is None and not trainer.weights_finite():
        trainer.diverge("the trainable weights hold NaN/inf after the last step")
    if trainer.divergence is not None:
        step, reason = trainer.divergence
        if facts is not None:
            record_failure(run, facts, step, f"diverged: {reason}")
        last = run.latest_checkpoint()
        keep = (f"its last good checkpoint is {last.name}: lower it and `pi-lora train "
                f"RECIPE --resume`, or restart with --overwrite") if last else \
            "then rerun (with no checkpoint to resume, the failed run is replaced)"
        raise PiLoraError(f"training diverged at step {step} ({reason}); no adapter was saved",
                          field="training.learning_rate",
                          fix=f"lower training.learning_rate (was {trainer.args.learning_rate:g}); "
                              f"{keep}")
    _save_final(trainer, run)
    if facts is not None:  # the main process: the adapter directory made safe for peft users
        write_adapter_card(run.adapter_dir, run.extras_path if trainer.extras_names else None,
                           run.load_recipe(), facts.rope_plan)
    if facts is not None and identity is not None:
        provenance = RunProvenance(software=facts.provenance.software, **identity.result())
        run.write_facts(facts.model_copy(update={
            "status": "complete", "final_loss": _last_loss(trainer),
            "train_loss": result.training_loss, "steps": trainer.state.global_step,
            "train_seconds": time.time() - started, "provenance": provenance}))


def _announce(recipe: Recipe, plan: RopePlan, built: BuiltData, trainable: int, total: int,
              facts: RunFacts) -> None:
    mix = recipe.data.short_mix
    lengths = f"{recipe.seq_len}" + (f" ({mix.fraction:.0%} cut to {mix.seq_len})" if mix else "")
    if recipe.data.pose:
        lengths += (f" with PoSE positions up to {plan.target_context} "
                    f"({recipe.data.pose.chunks} pieces per row)")
    print(f"pi-lora: {recipe.model.name} {_rope_words(plan)}, "
          f"{built.sequences if built.sequences is not None else 'a stream of'} sequences "
          f"of {lengths}, global batch {recipe.training.global_batch(_groups(recipe))} "
          f"({recipe.training.per_device_batch_size} x {_parallel(recipe)} x "
          f"{recipe.training.accumulation_steps(_groups(recipe))} accumulation), "
          f"trainable {trainable:,} / {total:,}", flush=True)
    _report_conversations(built, recipe.seq_len)
    print(f"pi-lora: loss {facts.loss}", flush=True)


def _parallel(recipe: Recipe) -> str:
    n = recipe.training.sequence_parallel
    if n == 1:
        return f"{world_size()} processes"
    return f"{_groups(recipe)} group(s) of {n} processes sharing each sequence"


def _prepares_run_dir(recipe: Recipe) -> bool:
    """Global rank 0 writes the run directory; with save_on_each_node each node's first
    process writes its own (no shared storage), so each node can resume from it."""
    info = process_info()
    return info.is_main or (recipe.training.save_on_each_node and info.local_rank == 0)


def agreed_checkpoint(run: RunDir) -> Path | None:
    """The checkpoint every rank resumes from: global rank 0's latest, which every rank must
    find in its own output_dir (multi-node without shared storage), else one clear error on
    all ranks instead of ranks silently resuming from different steps."""
    import torch.distributed as dist

    local = run.latest_checkpoint()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    choice = [local.name if local is not None else None]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] is None:
        return None
    path = run.checkpoints_dir / choice[0]
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, (socket.gethostname(), process_info().rank,
                                   (path / "trainer_state.json").is_file()))
    missing = [f"rank {rank} ({host})" for host, rank, ok in found if not ok]
    if missing:
        raise PiLoraError(
            f"{choice[0]}, the latest checkpoint of rank 0, is missing on {', '.join(missing)}",
            field="output_dir",
            fix="put output_dir on storage all nodes share, or train with "
                "training.save_on_each_node: true so each node keeps its checkpoints")
    return path


def build_data_once(data: DataSection, tokenizer: Any, seq_len: int, seed: int,
                    args: Any) -> BuiltData:
    """One process builds the cache while the others wait at a barrier, then all of them
    memory-map it: one build per node, or one in all when the recipe names a cache_dir
    (taken to be shared by the nodes). `args`: the TrainingArguments (its process group)."""
    with args.main_process_first(local=data.cache_dir is None, desc="pi-lora data"):
        return build_train_dataset(data, tokenizer, seq_len, seed=seed)


def _report_conversations(built: BuiltData, seq_len: int) -> None:
    """Conversations are never cut silently: say how many seq_len truncated or dropped."""
    counts = built.conversations
    if counts is None or not (counts.truncated or counts.dropped):
        return
    print(f"pi-lora: data: {counts.truncated} of {counts.conversations} conversations are longer "
          f"than {seq_len} tokens and were cut to it; {counts.dropped} dropped (no answer token "
          f"within {seq_len})", flush=True)


def _build_trainer(recipe: Recipe, run: RunDir, args: Any, model: Any, tokenizer: Any,
                   built: BuiltData) -> Any:
    from transformers.trainer_callback import PrinterCallback

    from pi_lora.model.loading import extras_parameter_names

    # real tokens, not seq_len x rows: short_mix rows and chat packs are shorter
    tokens_per_step = built.tokens_per_sequence * recipe.training.global_batch(_groups(recipe))
    t = recipe.training
    chunked, _ = loss_route(model, t.chunked_loss)
    trainer = trainer_class()(
        model=model, args=args, train_dataset=built.train, eval_dataset=built.validation,
        data_collator=_collator(recipe, tokenizer),
        callbacks=[progress_callback(run, tokens_per_step, _is_main()),
                   *filter(None, [tensorboard_callback(recipe, run, _is_main())])],
        chunk_tokens=t.loss_chunk_tokens if chunked else None,
        offload_checkpoints=t.offload_checkpoints,
        extras_names=tuple(extras_parameter_names(model, recipe.lora.trainable_extras)))
    trainer.remove_callback(PrinterCallback)  # our progress line replaces its raw dicts
    return trainer


def _collator(recipe: Recipe, tokenizer: Any) -> Any:
    collator = PackedCollator(tokenizer.pad_token_id, pose_skips(recipe))
    n = recipe.training.sequence_parallel
    return collator if n == 1 else ShardedRows(collator, n)


def _save_final(trainer: Any, run: RunDir) -> None:
    """Adapter + extras into the run dir (gathered under ZeRO-3 by Trainer.save_model)."""
    trainer.save_model(str(run.adapter_dir))
    produced = run.adapter_dir / EXTRAS_FILE
    if trainer.args.should_save and produced.is_file():
        produced.replace(run.extras_path)
    if trainer.args.should_save:
        follow_umask(run.adapter_dir)
        if run.extras_path.is_file():
            follow_umask(run.extras_path)


def _checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def _forget_metrics_after(run: RunDir, step: int) -> None:
    """A killed run logged steps past its last checkpoint; the resume logs them again."""
    if not run.metrics_path.is_file():
        return
    lines = run.metrics_path.read_text().splitlines()
    kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(kept) < len(lines):
        run.metrics_path.write_text("".join(f"{line}\n" for line in kept))


def _last_loss(trainer: Any) -> float | None:
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses[-1] if losses else None


def _start_facts(recipe: Recipe, plan: RopePlan, extras: list[str], trainable: int, total: int,
                 built: Any, allocator: str | None) -> RunFacts:
    return RunFacts(
        status="training", provenance=RunProvenance(software=software()), rope=plan.to_dict(),
        extras=[base_parameter_name(n) for n in extras],
        trainable_parameters=trainable, total_parameters=total,
        train_sequences=built.sequences, train_tokens=built.tokens,
        seq_len=recipe.seq_len, world_size=world_size(),
        data_cache=str(built.cache_path) if built.cache_path else None,
        epochs_for_max_steps=_epochs(recipe, built.sequences) if built.sequences else None,
        cpu_allocator=allocator)


def _epochs(recipe: Recipe, sequences: int) -> float:
    per_step = recipe.training.global_batch(_groups(recipe))
    return math.ceil(recipe.training.max_steps * per_step / max(sequences, 1) * 100) / 100
