"""Sequence parallelism: one training sequence split over N processes (DeepSpeed Ulysses, ALST).

`training.sequence_parallel: N` hands the Trainer accelerate's `ParallelismConfig(sp_backend=
"deepspeed")`: DeepSpeed's `UlyssesSPAttentionHF` replaces the attention function (each rank
keeps T/N tokens of every layer's activations and, inside attention, swaps them for H/N heads
over all T tokens with all-to-alls), and its `UlyssesSPDataLoaderAdapter` gathers one batch
from every rank of a group and hands each rank its T/N slice of it, with the labels already
shifted across the slices (`shift_labels`). What pi-lora adds:

- the checks nothing else makes before hours are spent: heads divisible by N, attention
  kernels and data layouts whose masks Ulysses would drop (`sequence_parallel_problems`),
  world and accumulation multiples (`data_parallel_size`, `check_accumulation`);
- rows padded to a multiple of N, with the position ids the adapter requires (`ShardedRows`);
- an exact loss: each rank's slice loss is summed over its tokens and divided by the token
  count of the whole optimizer step over all ranks, so the gradients DeepSpeed sums are the
  single-process gradients whichever ZeRO stage averages them (`shard_loss`,
  `gradient_factor`, `rank_share`, `SequenceParallelSteps`);
- resume: the data a checkpoint already consumed is skipped in each rank's own loader, which
  the Trainer cannot do through the adapter (`SequenceParallelSteps._run_epoch`);
- ALST's tiled MLP, with or without sequence parallelism (`enable_tiled_mlp`).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.data import IGNORE_INDEX
from pi_lora.recipe.loading import Recipe, TrainingSection, resolve_deepspeed_config
from pi_lora.train.distributed import load_deepspeed_config, world_size, zero_stage

FIELD = "training.sequence_parallel"


# --------------------------------------------------------------------------- checks


def data_parallel_size(training: TrainingSection, world: int) -> int:
    """Groups of `sequence_parallel` processes that each train their own sequences."""
    n = training.sequence_parallel
    if world % n:
        raise PiLoraError(
            f"{world} processes cannot be split into groups of {n}", field=FIELD,
            fix=f"launch a multiple of {n} processes (--nproc), or set sequence_parallel to a "
                f"divisor of {world}")
    return world // n


def check_accumulation(training: TrainingSection, world: int) -> None:
    """A group trains one loaded batch per micro-step and loads N at a time (one per rank):
    an optimizer step must end on a whole load, or a resume could not find its place."""
    n = training.sequence_parallel
    steps = training.accumulation_steps(data_parallel_size(training, world))
    if n > 1 and steps % n:
        source = "training.global_batch_size" if training.global_batch_size is not None \
            else "training.gradient_accumulation_steps"
        raise PiLoraError(
            f"accumulation of {steps} micro-steps is not a multiple of sequence_parallel {n}: "
            f"each group of {n} processes loads {n} batches at a time", field=source,
            fix=f"make the accumulation a multiple of {n} (global batch = per_device_batch_size "
                f"x accumulation x {world // n} groups)")


def sequence_parallel_problems(recipe: Recipe, config: Any) -> list[PiLoraError]:
    """What the model's config rules out for `sequence_parallel: N` (empty for N = 1)."""
    n = recipe.training.sequence_parallel
    if n == 1:
        return []
    from pi_lora.model.loading import apply_sliding_window, attention_window

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    errors = []
    if heads % n:
        errors.append(PiLoraError(
            f"{config.model_type} has {heads} attention heads, not divisible by {n}: Ulysses "
            "gives each process heads/N of them", field=FIELD,
            fix=f"use a divisor of {heads}: {_divisors(heads, kv_heads)}"))
    elif kv_heads % n and n % kv_heads:
        errors.append(PiLoraError(
            f"{kv_heads} key/value heads and {n} processes: one must divide the other",
            field=FIELD, fix=f"use one of {_divisors(heads, kv_heads)}"))
    windowed = copy.deepcopy(config)
    apply_sliding_window(windowed, recipe.model)
    window = attention_window(windowed)
    if window is not None and window < recipe.seq_len \
            and recipe.model.attn_implementation != "flash_attention_2":
        errors.append(PiLoraError(
            f"the model attends {window} tokens back; with sequence parallelism sdpa gets no "
            "mask and would attend to the whole sequence", field=FIELD,
            fix="set model.attn_implementation: flash_attention_2 (it takes the window as an "
                "argument), or model.sliding_window: none"))
    return errors


def check_launch(recipe: Recipe, config: Any, world: int) -> None:
    """Everything `sequence_parallel` needs from the model and the launch, before loading."""
    if recipe.training.sequence_parallel == 1:
        return
    problems = sequence_parallel_problems(recipe, config)
    if problems:
        raise problems[0]
    check_accumulation(recipe.training, world)
    path = resolve_deepspeed_config(recipe.training.deepspeed or "")
    assert path is not None, "recipe validation checks the path (and that there is one)"
    _check_zero3_reduction(load_deepspeed_config(path))


def sequence_parallel_sizes(training: TrainingSection, seq_len: int, heads: int, kv_heads: int,
                            world: int) -> list[int]:
    """Every N > 1 this launch and model allow: N divides the processes, the heads (the KV
    heads divide N or N them), the row length, and the accumulation it leads to."""
    sizes = []
    for n in _divisors(heads, kv_heads)[1:]:
        if world % n or seq_len % n:
            continue
        sized = training.model_copy(update={"sequence_parallel": n})
        try:
            check_accumulation(sized, world)
        except PiLoraError:
            continue
        sizes.append(n)
    return sizes


def _divisors(heads: int, kv_heads: int) -> list[int]:
    return [n for n in range(1, heads + 1)
            if heads % n == 0 and (kv_heads % n == 0 or n % kv_heads == 0)]


# --------------------------------------------------------------------------- Trainer wiring


def parallelism_config(recipe: Recipe, world: int) -> Any:
    """accelerate's ParallelismConfig for the Trainer; None without sequence parallelism."""
    n = recipe.training.sequence_parallel
    if n == 1:
        return None
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DeepSpeedSequenceParallelConfig

    check_accumulation(recipe.training, world)
    handler = DeepSpeedSequenceParallelConfig(
        sp_seq_length_is_variable=True,  # short_mix and chat packs make shorter rows
        sp_attn_implementation=recipe.model.attn_implementation)
    # data_parallel_size feeds DeepSpeed's train_batch_size check: micro x accumulation x groups
    return ParallelismConfig(sp_backend="deepspeed", sp_size=n, sp_handler=handler,
                             dp_replicate_size=data_parallel_size(recipe.training, world))


class ShardedRows:
    """The collator's batches made splittable: width padded to a multiple of N and position
    ids always present (the adapter needs them to give each slice its global positions).

    Pads go at the end with ignored labels, positions that continue the row, and a zero
    attention mask where the batch has one: with causal attention no real token sees them.
    """

    def __init__(self, collator: Any, parts: int) -> None:
        self.collator = collator
        self.parts = parts
        self.pad_token_id = collator.pad_token_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        batch = self.collator(rows)
        ids = batch["input_ids"]
        if "position_ids" not in batch:
            batch["position_ids"] = torch.arange(ids.shape[1]).expand_as(ids).clone()
        extra = -ids.shape[1] % self.parts
        if extra:
            batch = _pad_right(batch, extra, self.pad_token_id)
        return batch


def _pad_right(batch: dict[str, torch.Tensor], extra: int,
               pad_token_id: int) -> dict[str, torch.Tensor]:
    fills = {"input_ids": pad_token_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    padded = {}
    for key, tensor in batch.items():
        if key == "position_ids":
            last = tensor[:, -1:]
            tail = last + torch.arange(1, extra + 1)
        else:
            tail = torch.full((tensor.shape[0], extra), fills[key], dtype=tensor.dtype)
        padded[key] = torch.cat([tensor, tail], dim=1)
    return padded


# --------------------------------------------------------------------------- the loss


def shard_loss(model: Any, inputs: dict[str, Any], num_items_in_batch: Any,
               chunk_tokens: int | None) -> torch.Tensor:
    """Sum of this rank's token losses over its slice / the step's token count (all ranks).

    `inputs` is the adapter's slice: input_ids, position_ids ([B, T/N], global positions),
    shift_labels ([B, T/N], already shifted across slices, so the slice's last token predicts
    the next slice's first), attention_mask where the collator made one. Chunked: the decoder,
    then pi_lora.train.loss's chunked head + cross-entropy on the shifted targets (no [T/N, V]
    logits); else the model's own loss, which takes shift_labels as they are.
    """
    targets = inputs["shift_labels"].contiguous()  # a column slice; the model's loss views it
    common = {k: inputs[k] for k in ("input_ids", "position_ids", "attention_mask") if k in inputs}
    if chunk_tokens is None:
        return model(**common, labels=targets, shift_labels=targets,
                     num_items_in_batch=num_items_in_batch).loss
    # pi_lora.train.loss takes unshifted labels and shifts inside each row, which would drop every
    # slice's last target: its autograd function takes the targets directly
    from pi_lora.train.loss import _ChunkedLinearCrossEntropy, _plain_output_head, _unwrap_peft

    causal_lm = _unwrap_peft(model)
    head = _plain_output_head(causal_lm)
    hidden = causal_lm.get_decoder()(**common, use_cache=False).last_hidden_state  # [B, T/N, D]
    return _ChunkedLinearCrossEntropy.apply(
        hidden, head.weight, head.bias, targets.reshape(-1), chunk_tokens, IGNORE_INDEX,
        getattr(causal_lm.config, "final_logit_softcapping", None), num_items_in_batch)


def gradient_factor(deepspeed_config: dict[str, Any], processes: int, parts: int) -> int:
    """What each rank's loss is multiplied by so that DeepSpeed's averaged gradient is the sum
    over all ranks of (slice loss sum / step token count), the single-process gradient.

    ZeRO 0-2 sum the gradients over all processes and divide by the data-parallel size
    (processes / parts). ZeRO-3 reduce-scatters them with `reduce_scatter_coalesced`, which
    divides by all processes (DeepSpeed 0.19.8, stage3 `__avg_scatter_grads`): without this
    factor its gradients came out `parts` times too small (the tests measure both).
    """
    if zero_stage(deepspeed_config) == 3:
        return processes
    return processes // parts


def rank_share(loss: torch.Tensor, processes: int, gradient_scale: int) -> torch.Tensor:
    """This rank's loss for the Trainer: its gradient carries `gradient_scale`
    (`gradient_factor`), its value `processes`, because the Trainer logs the mean of the
    ranks' values; the difference passes no gradient."""
    scaled = loss * gradient_scale
    if gradient_scale == processes:
        return scaled
    return scaled + (loss * (processes - gradient_scale)).detach()


def _check_zero3_reduction(deepspeed_config: dict[str, Any]) -> None:
    """ZeRO-3 without reduce_scatter averages small buckets over the data-parallel groups
    and parameters larger than a bucket over all processes: no one factor corrects both."""
    zero = deepspeed_config.get("zero_optimization") or {}
    if zero_stage(deepspeed_config) == 3 and zero.get("reduce_scatter", True) is False:
        raise PiLoraError(
            "ZeRO-3 with reduce_scatter false averages gradients over different groups for "
            "different parameters under sequence parallelism", field="training.deepspeed",
            fix="drop \"reduce_scatter\": false from the DeepSpeed config (true is the default)")


class SequenceParallelSteps:
    """Trainer mixin: the step's token count from the slices, and resume through the adapter."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        parts = self.get_sp_size()
        if parts > 1:  # the slice loss is divided by the whole step's count
            self.loss_is_scaled_for_ga = True
            # read by ChunkedLoss for every slice's loss (pi_lora.train.trainer)
            self.slice_gradient_scale = gradient_factor(
                self.args.hf_deepspeed_config.config, self.accelerator.num_processes, parts)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        if self.get_sp_size() == 1:
            return super()._get_num_items_in_batch(batch_samples, device)
        # every target is in exactly one rank's slice: the sum over all ranks counts each once
        count = sum((b["shift_labels"] != IGNORE_INDEX).sum() for b in batch_samples)
        count = torch.as_tensor(count, device=device)
        return self.accelerator.gather(count.reshape(1)).sum()

    def _run_epoch(self, **kwargs: Any) -> Any:
        """Position each rank's own loader (the adapter wraps it; the Trainer's skip cannot
        reach through), then let the Trainer run the rest of the epoch as a shorter one."""
        parts = self.get_sp_size()
        if parts == 1:
            return super()._run_epoch(**kwargs)
        skip = 0
        if kwargs["epoch"] == kwargs["epochs_trained"] and kwargs["resume_from_checkpoint"] \
                and not self.args.ignore_data_skip:
            skip = kwargs["steps_trained_in_current_epoch"]
        _restart(kwargs["train_dataloader"], kwargs["epoch"], skip // parts)
        accumulation = self.args.gradient_accumulation_steps
        kwargs.update(steps_trained_in_current_epoch=0,
                      steps_in_epoch=kwargs["steps_in_epoch"] - skip,
                      num_update_steps_per_epoch=kwargs["num_update_steps_per_epoch"]
                      - skip // accumulation)
        return super()._run_epoch(**kwargs)


def _restart(adapter: Any, epoch: int, loads_done: int) -> None:
    """The adapter's loader at `epoch` (its shuffle) past `loads_done` batches of this rank."""
    from accelerate import skip_first_batches

    loader = getattr(adapter, "pi_lora_loader", None) or adapter.dl
    adapter.pi_lora_loader = loader
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    sampler = getattr(getattr(loader, "batch_sampler", None), "batch_sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    adapter.dl = skip_first_batches(loader, loads_done) if loads_done else loader
    adapter.iter = iter(adapter.dl)
    adapter.micro_batches.clear()


# --------------------------------------------------------------------------- tiled MLP


def enable_tiled_mlp(model: Any, training: TrainingSection) -> int:
    """ALST's tiled MLP (DeepSpeed `TiledMLP`) in every decoder layer; returns the layers.

    The MLP is per token, so running it over tiles of rows changes no value; its [T, F]
    intermediates are never saved (backward recomputes one tile at a time), which at 100k+
    tokens is the largest activation of a layer. ZeRO-3's gradient reduction waits for the
    last tile (`ds_grad_is_ready`); ZeRO-1/2 and DDP would reduce a trained MLP parameter once
    per tile, so that case is refused, as is dropout inside the MLP (the recomputed tile would
    draw another mask).
    """
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP
    except ImportError:
        raise PiLoraError("the tiled MLP is DeepSpeed's (TiledMLP), and DeepSpeed is not "
                          "installed", field="training.tiled_mlp",
                          fix="pip install 'pi-lora[distributed]', or drop tiled_mlp") from None
    path = resolve_deepspeed_config(training.deepspeed) if training.deepspeed else None
    sharded_gradients = path is not None and zero_stage(load_deepspeed_config(path)) == 3
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    for layer in layers:
        _check_tileable(layer.mlp, sharded_gradients)
        layer.mlp.forward = _tiled_forward(layer.mlp, TiledMLP)
    return len(layers)


def _check_tileable(mlp: torch.nn.Module, sharded_gradients: bool) -> None:
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in mlp.modules()):
        raise PiLoraError("LoRA dropout inside the MLP: a tile recomputed in backward would "
                          "draw another mask", field="lora.dropout",
                          fix="set lora.dropout: 0, or drop training.tiled_mlp")
    trains = any(p.requires_grad for p in mlp.parameters())
    if trains and not sharded_gradients and world_size() > 1:
        raise PiLoraError("the MLP trains (LoRA on its projections), and only ZeRO-3 reduces "
                          "a tiled MLP's gradients once per step", field="training.tiled_mlp",
                          fix="use training.deepspeed: zero3, or LoRA on attention only")


def _tiled_forward(mlp: torch.nn.Module, tiled: Any) -> Any:
    original = mlp.forward
    params = list(mlp.parameters())

    def forward(x: torch.Tensor) -> torch.Tensor:  # x: [B, T, D]
        tiles = torch.tensor(max(1, -(-x.shape[-2] // x.shape[-1])), device=x.device)
        if world_size() > 1:  # ZeRO-3 gathers weights per tile call: every rank the same count
            import torch.distributed as dist

            dist.all_reduce(tiles, op=dist.ReduceOp.MAX)
        return tiled.apply(lambda _, tile: original(tile), mlp, x, int(tiles.item()), params)

    return forward

