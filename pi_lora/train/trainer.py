"""pi-lora's Trainer: transformers' Trainer plus a few jobs, one mixin each.

- `ChunkedLoss`: the loss without [tokens x vocab] logits (pi_lora.train.loss), in training and in
  evaluation, with autocast (the chunked path bypasses accelerate's wrapped forward) and
  optional offload of checkpointed activations to host memory.
- `ExtrasCheckpoints`: the LongLoRA extras (embeddings, norms) saved beside every adapter
  and checkpoint, and restored on resume.
- `MasterWeightsSave`: under DeepSpeed, the final adapter and extras come from the optimizer's
  full fp32 masters, not the module's (bf16 or ZeRO-3 empty) copies.
- `DivergenceGuard`: training stops at the first non-finite loss or gradient norm, and no
  checkpoint is saved from non-finite weights; `divergence` says where and why.
- `SequenceParallelSteps` (pi_lora.train.sequence_parallel): under `training.sequence_parallel`,
  the step's token count from the ranks' slices and resume through DeepSpeed's data adapter;
  `ChunkedLoss` computes each slice's exact share of the loss.

Everything is configured through the constructor; the class is assembled lazily so importing
pi-lora does not import transformers.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from pi_lora.model.loading import base_parameter_name
from pi_lora.run.directory import EXTRAS_FILE, apply_extras, load_extras, save_extras


class ChunkedLoss:
    """Route the loss through pi_lora.train.loss where the model allows it."""

    def __init__(self, *args: Any, chunk_tokens: int | None = None,
                 offload_checkpoints: bool = False, **kwargs: Any) -> None:
        self.chunk_tokens = chunk_tokens
        self.offload_checkpoints = offload_checkpoints
        super().__init__(*args, **kwargs)
        if chunk_tokens is not None:  # before accelerate wraps the forward (autocast, DDP)
            _install_chunked_forward(self.model, chunk_tokens)

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        with checkpoint_offload(self.offload_checkpoints):
            return self._loss(model, inputs, return_outputs, num_items_in_batch)

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> Any:
        """Evaluation loss by the same (chunked) path as training: no full logits at 32k."""
        if not prediction_loss_only:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self._loss(model, inputs, False, None)
        return loss.detach().mean(), None, None

    def _loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool,
              num_items_in_batch: Any) -> Any:
        sliced = "shift_labels" in inputs  # a sequence-parallel slice: pi_lora.train.sequence_parallel
        if not sliced and (self.chunk_tokens is None or return_outputs):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.chunk_tokens is None:  # a slice, plain loss: the model's own forward and loss
            from pi_lora.train.sequence_parallel import shard_loss

            loss = shard_loss(model, inputs, num_items_in_batch, None)
        else:
            loss = self._chunked(model, inputs, num_items_in_batch, "slice" if sliced else "rows")
        if sliced:
            from pi_lora.train.sequence_parallel import rank_share

            return rank_share(loss, self.accelerator.num_processes, self.slice_gradient_scale)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

    def _chunked(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any,
                 kind: str) -> Any:
        """The chunked loss of whole rows or of a slice. Under DDP or DeepSpeed it runs inside
        the wrapper's forward: DDP prepares its gradient reducer there, and DeepSpeed counts
        micro-steps there (ZeRO-3 called around its forward overwrites, instead of adding,
        the gradients of every micro-step but the last)."""
        keys = _LOSS_INPUTS[kind]
        batch = {key: inputs[key] for key in keys if inputs.get(key) is not None}
        with _gathered(_sharded_output_head(self.model)), self._mixed_precision():
            if isinstance(model, torch.nn.parallel.DistributedDataParallel) \
                    or self.is_deepspeed_enabled:
                return model(**batch, num_items_in_batch=num_items_in_batch,
                             pi_lora_loss=kind).loss
            return _chunked_loss(model, batch, num_items_in_batch, self.chunk_tokens, kind)

    def _mixed_precision(self) -> Any:
        """Autocast for the chunked path, which calls the decoder body directly and so
        bypasses accelerate's wrapped forward; fp32 extras then meet bf16 weights safely."""
        dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.args.device.type, dtype=dtype)


class ExtrasCheckpoints:
    """The trained extras travel with every save (adapter and checkpoints) and every resume."""

    def __init__(self, *args: Any, extras_names: tuple[str, ...] = (), **kwargs: Any) -> None:
        self.extras_names = tuple(extras_names)
        super().__init__(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save and self.extras_names and output_dir:
            save_extras(self._extras_tensors(state_dict), Path(output_dir) / EXTRAS_FILE)

    def _extras_tensors(self, state_dict: dict | None) -> dict[str, torch.Tensor]:
        """From the (ZeRO-3 gathered) state dict when given, else from live parameters."""
        if state_dict:
            found = {base_parameter_name(k): v for k, v in state_dict.items()
                     if k in self.extras_names}
            if len(found) == len(self.extras_names):
                return found
        params = dict(self.accelerator.unwrap_model(self.model).named_parameters())
        return {base_parameter_name(n): params[n].detach() for n in self.extras_names}

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        apply_extras(model or self.model, load_extras(Path(resume_from_checkpoint) / EXTRAS_FILE))


class MasterWeightsSave:
    """Under DeepSpeed, save the gathered fp32 masters of the trainable parameters.

    The Trainer would save the module's (bf16) copies, or under ZeRO-3 without the 16-bit
    gather flag, empty (0,) placeholders; the masters are full and exact.
    """

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_deepspeed_enabled:
            super().save_model(output_dir, _internal_call)
            return
        self._save(output_dir or self.args.output_dir, state_dict=gather_trainable(self.model))


class DivergenceGuard:
    """A diverged run stops at once and keeps its last good checkpoint.

    transformers' `logging_nan_inf_filter` would hide a NaN loss behind the running mean
    (training_arguments turns it off), so the logged loss and grad_norm are the evidence; the
    weights are checked before every checkpoint, since they may go bad between two logs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.divergence: tuple[int, str] | None = None  # (step, reason)
        super().__init__(*args, **kwargs)
        self.add_callback(_divergence_callback(self))

    def diverge(self, reason: str) -> None:
        if self.divergence is None:
            self.divergence = (self.state.global_step, reason)
        self.control.should_training_stop = True
        self.control.should_save = False

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        if self.divergence is None and not self.weights_finite():
            self.diverge("the trainable weights hold NaN/inf")
        if self.divergence is None:
            super()._save_checkpoint(model, trial)

    def weights_finite(self) -> bool:
        """Every trainable parameter finite, on every rank (a collective under a process
        group, so all ranks take the same branch; ZeRO-3 ranks check their own shards)."""
        import torch.distributed as dist

        ok = torch.tensor(1.0, device=self.args.device)
        for param in self.model.parameters():
            if param.requires_grad and param.numel() and not bool(torch.isfinite(param).all()):
                ok.zero_()
                break
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())


def _divergence_callback(trainer: Any) -> Any:
    from transformers import TrainerCallback

    class Divergence(TrainerCallback):
        """Logged values are already averaged over ranks: every rank stops at the same step."""

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None,
                   **kw: Any) -> Any:
            for key in ("loss", "grad_norm", "eval_loss"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(float(value)):
                    trainer.diverge(f"{key} {value}")
                    control.should_training_stop = True
                    control.should_save = False
                    break
            return control

    return Divergence()


# what each kind of chunked loss reads from a batch
_LOSS_INPUTS = {"rows": ("input_ids", "labels", "attention_mask", "position_ids"),
                "slice": ("input_ids", "shift_labels", "attention_mask", "position_ids")}


def _chunked_loss(model: Any, batch: dict[str, Any], num_items_in_batch: Any, chunk_tokens: int,
                  kind: str) -> Any:
    """`rows`: whole sequences (labels shifted inside); `slice`: a sequence-parallel slice."""
    if kind == "slice":
        from pi_lora.train.sequence_parallel import shard_loss

        return shard_loss(model, batch, num_items_in_batch, chunk_tokens)
    from pi_lora.train.loss import causal_lm_loss

    return causal_lm_loss(model, batch["input_ids"], batch["labels"],
                          attention_mask=batch.get("attention_mask"),
                          position_ids=batch.get("position_ids"),
                          num_items_in_batch=num_items_in_batch, chunk_tokens=chunk_tokens)


def _install_chunked_forward(module: Any, chunk_tokens: int) -> None:
    """`module(..., pi_lora_loss="rows" | "slice")` returns the chunked loss from inside the
    module's own forward, where DDP and DeepSpeed expect the graph to be built."""
    original = module.forward

    def forward(*args: Any, pi_lora_loss: str | None = None, **kwargs: Any) -> Any:
        if pi_lora_loss is None:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        loss = _chunked_loss(module, kwargs, num_items, chunk_tokens, pi_lora_loss)
        return CausalLMOutputWithPast(loss=loss)

    module.forward = forward


def loss_route(model: Any, chunked: bool) -> tuple[bool, str]:
    """(chunked?, what the run and its run.json say): the chunked loss everywhere but where
    ZeRO-3 shards a trainable output head, whose gradient only the module's own forward
    produces (LoRA+ with tied embeddings, or the lm_head extra)."""
    if not chunked:
        return False, "plain: training.chunked_loss is false ([tokens x vocab] logits)"
    head = _sharded_output_head(model)
    if head is not None and head.weight.requires_grad:
        return False, ("plain: ZeRO-3 shards a trainable output head ([tokens x vocab] "
                       "logits; drop the lm_head extra or untie it to chunk)")
    return True, "chunked: no [tokens x vocab] logits"


def trainer_class() -> type:
    """PiLoraTrainer(model=..., args=..., chunk_tokens=..., offload_checkpoints=...,
    extras_names=..., ...): the mixins in front of transformers' Trainer."""
    from transformers import Trainer

    from pi_lora.train.sequence_parallel import SequenceParallelSteps

    return type("PiLoraTrainer", (ChunkedLoss, ExtrasCheckpoints, MasterWeightsSave,
                                  DivergenceGuard, SequenceParallelSteps, Trainer), {})


def checkpoint_offload(enabled: bool) -> Any:
    """Tensors saved for backward during the forward go to (pinned) host memory.

    With non-reentrant checkpointing the only tensors a checkpointed layer saves are its inputs
    (torch saves them through save_for_backward, so saved-tensor hooks see them): the device
    then holds one layer's activations at a time, the host L x B x T x D. The copies are not
    overlapped with compute; `pi-lora plan` counts them over the host link.
    """
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())


# --------------------------------------------------------------------------- DeepSpeed helpers


def _sharded_output_head(model: Any) -> Any:
    """The output head when ZeRO-3 shards it (the chunked loss reads its weight directly)."""
    head = model.get_output_embeddings()
    return head if head is not None and hasattr(head.weight, "ds_id") else None


def _gathered(module: Any) -> Any:
    """Gather a frozen ZeRO-3 module's parameters for use outside its forward."""
    if module is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def gather_trainable(model: Any) -> dict[str, torch.Tensor]:
    """Full fp32 copies of every trainable parameter from DeepSpeed's optimizer (ZeRO 1-3).

    A collective: every rank must call it, in the same order. Names are the peft model's,
    which is what peft's save_pretrained and `_extras_tensors` expect.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    gathered = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            full = safe_get_full_fp32_param(param)
            assert full is not None, f"{name} is trainable but DeepSpeed holds no master copy"
            gathered[name] = full.detach().cpu()
    return gathered
