"""pi-lora's Trainer: transformers' Trainer plus three jobs, one mixin each.

- `ChunkedLoss`: the loss without [tokens x vocab] logits (pi_lora.loss), in training and in
  evaluation, with autocast (the chunked path bypasses accelerate's wrapped forward) and
  optional offload of checkpointed activations to host memory.
- `ExtrasCheckpoints`: the LongLoRA extras (embeddings, norms) saved beside every adapter
  and checkpoint, and restored on resume.
- `MasterWeightsSave`: under DeepSpeed, the final adapter and extras come from the optimizer's
  full fp32 masters, not the module's (bf16 or ZeRO-3 empty) copies.
- `DivergenceGuard`: training stops at the first non-finite loss or gradient norm, and no
  checkpoint is saved from non-finite weights; `divergence` says where and why.

Everything is configured through the constructor; the class is assembled lazily so importing
pi-lora does not import transformers.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import torch

from pi_lora.model import base_parameter_name
from pi_lora.rundir import EXTRAS_FILE, apply_extras, save_extras


class ChunkedLoss:
    """Route the loss through pi_lora.loss where the model allows it."""

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
        if self.chunk_tokens is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        batch = {key: inputs.get(key) for key in
                 ("input_ids", "labels", "attention_mask", "position_ids")}
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # DDP prepares its gradient reducer only inside its own forward: run it there
            with self._mixed_precision():
                loss = model(**batch, num_items_in_batch=num_items_in_batch,
                             pi_lora_chunked=True).loss
        else:
            from pi_lora.loss import causal_lm_loss

            with _gathered(_sharded_output_head(self.model)), self._mixed_precision():
                loss = causal_lm_loss(model, batch["input_ids"], batch["labels"],
                                      attention_mask=batch["attention_mask"],
                                      position_ids=batch["position_ids"],
                                      num_items_in_batch=num_items_in_batch,
                                      chunk_tokens=self.chunk_tokens)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        return loss

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
        apply_extras(model or self.model, Path(resume_from_checkpoint) / EXTRAS_FILE)


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


def _install_chunked_forward(module: Any, chunk_tokens: int) -> None:
    """`module(..., pi_lora_chunked=True)` returns the chunked loss from inside the module's
    own forward, which is where DDP's reducer expects the graph to be built."""
    original = module.forward

    def forward(*args: Any, pi_lora_chunked: bool = False, **kwargs: Any) -> Any:
        if not pi_lora_chunked:
            return original(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        from pi_lora.loss import causal_lm_loss

        loss = causal_lm_loss(module, kwargs["input_ids"], kwargs["labels"],
                              attention_mask=kwargs.get("attention_mask"),
                              position_ids=kwargs.get("position_ids"),
                              num_items_in_batch=kwargs.get("num_items_in_batch"),
                              chunk_tokens=chunk_tokens)
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

    return type("PiLoraTrainer", (ChunkedLoss, ExtrasCheckpoints, MasterWeightsSave,
                                  DivergenceGuard, Trainer), {})


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
