"""What the Trainer is told: TrainingArguments (every knob from one recipe field), the
DeepSpeed config adapted to this machine, and the progress line mirrored to metrics.jsonl."""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.recipe.loading import Recipe, resolve_deepspeed_config
from pi_lora.run.directory import METRICS_FILE, RunDir
from pi_lora.run.loss_curve import LOSS_PLOT_FILE, try_draw_loss_curve
from pi_lora.train.distributed import adapt_deepspeed_config, load_deepspeed_config, world_size
from pi_lora.train.recompute import checkpoint_kwargs
from pi_lora.train.sequence_parallel import data_parallel_size, parallelism_config


def progress_callback(run: RunDir, tokens_per_step: float, is_main: bool) -> Any:
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One line per log: loss, lr, tokens/s, ETA; the same record in metrics.jsonl."""

        def __init__(self) -> None:
            self.last: tuple[float, int] | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last = (time.time(), state.global_step)

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if is_main:  # a diverged run's curve too: it shows where it went wrong
                try_draw_loss_curve(run)

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            # log the step before the last too, so the last log (run.json's final_loss) is the
            # last step's loss alone, not a mean back to the previous logging step; every
            # process decides alike (logging reduces the loss across them)
            if state.global_step >= state.max_steps - 1 and state.max_steps > 1:
                control.should_log = True
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if not is_main or not logs or self.last is None:
                return
            if "eval_loss" in logs:
                self._eval(state.global_step, logs["eval_loss"])
            if "loss" not in logs:
                return
            now, step = time.time(), state.global_step
            steps = max(step - self.last[1], 1)
            sec_per_step = (now - self.last[0]) / steps
            self.last = (now, step)
            remaining = (state.max_steps - step) * sec_per_step
            record = {"step": step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                      "grad_norm": logs.get("grad_norm"), "sec_per_step": sec_per_step,
                      "tokens_per_sec": tokens_per_step / sec_per_step if sec_per_step else None,
                      "eta_sec": remaining, "time": now}
            run.append_metrics(record)
            print(f"step {step}/{state.max_steps}  loss {logs['loss']:.4f}  "
                  f"lr {record['lr'] or 0:.2e}  {record['tokens_per_sec'] or 0:,.0f} tok/s  "
                  f"ETA {_fmt_seconds(remaining)}", flush=True)

        def _eval(self, step: int, loss: float) -> None:
            """Held-out loss at the training length: the long-context check during training."""
            ppl = math.exp(min(loss, 50.0))
            run.append_metrics({"step": step, "eval_loss": loss, "eval_ppl": ppl,
                                "time": time.time()})
            print(f"step {step}  eval loss {loss:.4f}  ppl {ppl:.2f} (held-out sequences)",
                  flush=True)

    return Progress()


def _fmt_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 \
        else f"{seconds // 60}m{seconds % 60:02d}s"


def reporters(recipe: Recipe) -> list[str]:
    """The trackers training.report_to names: auto is TensorBoard when it is installed, else
    none; a named tracker that is not installed is a user error (validate says it too)."""
    choice = recipe.training.report_to
    if choice == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") else []
    if choice == "none":
        return []
    if importlib.util.find_spec(choice) is None:
        raise PiLoraError(f"{choice} is not installed", field="training.report_to",
                          fix=f"pip install {choice}, or report_to: none")
    return [choice]


def tensorboard_folder(run_path: Path) -> Path:
    """Where TensorBoard events go: TENSORBOARD_LOGGING_DIR when the user set it, else RUN/tensorboard."""
    return Path(os.environ.get("TENSORBOARD_LOGGING_DIR") or run_path / "tensorboard")


def tracking_words(recipe: Recipe, run_path: Path) -> str:
    """Where this run's curves go, in words: `pi-lora train` says it once, validate too."""
    chosen = reporters(recipe)
    local = f"losses in {run_path / METRICS_FILE} and {run_path / LOSS_PLOT_FILE}"
    if not chosen:
        why = "report_to auto found none installed (pip install tensorboard)" \
            if recipe.training.report_to == "auto" else "report_to: none"
        return f"no tracker: {why}; {local}"
    named = {"tensorboard": f"TensorBoard events in {tensorboard_folder(run_path)}",
             "wandb": "Weights & Biases (its project and run name from WANDB_* variables)"}
    auto = " (report_to auto: TensorBoard is installed)" if recipe.training.report_to == "auto" else ""
    return "; ".join(named.get(r, r) for r in chosen) + f"{auto}; {local}"


def tensorboard_callback(recipe: Recipe, run: RunDir, is_main: bool) -> Any | None:
    """TensorBoard events in the run's own folder, through a writer handed to transformers'
    callback: transformers 5 would read the folder from the environment, and a library call
    must not write the environment. The main process also says once where the curves go."""
    if not is_main:
        return None
    print(f"pi-lora: {tracking_words(recipe, run.path)}", flush=True)
    if "tensorboard" not in reporters(recipe):
        return None
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tensorboard_folder(run.path))))


def training_arguments(recipe: Recipe, run: RunDir,
                       accelerator_config: dict[str, Any] | None = None, *,
                       evaluate: bool = False) -> Any:
    """TrainingArguments from the recipe: every Trainer knob has exactly one source here."""
    from transformers import TrainingArguments

    t = recipe.training
    on_cpu = not torch.cuda.is_available()
    extra: dict[str, Any] = {}
    if accelerator_config:
        extra["accelerator_config"] = accelerator_config
    if t.sequence_parallel > 1:  # DeepSpeed Ulysses over groups of N processes
        extra["parallelism_config"] = parallelism_config(recipe, world_size())
    if evaluate:  # loss on data.validation_sequences held out of training, every eval_steps
        extra.update(eval_strategy="steps", eval_steps=t.eval_steps or t.save_steps,
                     per_device_eval_batch_size=t.per_device_batch_size,
                     prediction_loss_only=True)
    return TrainingArguments(
        output_dir=str(run.checkpoints_dir), max_steps=t.max_steps, learning_rate=t.learning_rate,
        warmup_steps=t.warmup_steps, lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm, per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.accumulation_steps(data_parallel_size(t, world_size())),
        **_checkpointing_arguments(TrainingArguments, t.gradient_checkpointing,
                                   t.recompute_attention),
        bf16=t.precision == "bf16", fp16=t.precision == "fp16", seed=t.seed, data_seed=t.seed,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        save_on_each_node=t.save_on_each_node,
        logging_steps=t.logging_steps, report_to=[r for r in reporters(recipe) if r != "tensorboard"],
        deepspeed=deepspeed_config(recipe), disable_tqdm=True, remove_unused_columns=False,
        # use_cpu: the Trainer's bf16 check otherwise demands a GPU; bf16 autocast runs on CPU
        use_cpu=on_cpu, optim="adamw_torch",
        dataloader_num_workers=0, dataloader_pin_memory=not on_cpu,
        # the filter would log a NaN loss as the running mean: a diverged run looked healthy
        logging_nan_inf_filter=False, **extra,
    )


def _checkpointing_arguments(arguments_class: type, enabled: bool,
                             recompute_attention: bool = True) -> dict[str, Any]:
    """transformers renamed gradient_checkpointing to activation_checkpointing (old names
    warn from 5.2x on, go in v6): use the name this installed version defines."""
    fields = getattr(arguments_class, "__dataclass_fields__", {})
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": enabled,
            f"{prefix}_checkpointing_kwargs": checkpoint_kwargs(recompute_attention)}


def deepspeed_config(recipe: Recipe) -> dict[str, Any] | None:
    """The recipe's DeepSpeed config adapted to this machine; the Trainer fills its "auto"s."""
    if not recipe.training.deepspeed:
        return None
    path = resolve_deepspeed_config(recipe.training.deepspeed)
    assert path is not None, "recipe validation checks the path"
    config = adapt_deepspeed_config(load_deepspeed_config(path),
                                    has_cuda=torch.cuda.is_available())
    if recipe.training.precision == "fp16" and not torch.cuda.is_available():
        raise PiLoraError("fp16 training under DeepSpeed needs a GPU", field="training.precision",
                          fix="use bf16 or fp32 on this machine")
    return config
