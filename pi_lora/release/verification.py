"""Check that a release equals base + adapter, on a probe longer than the original window.

Two ways, same verdict. `full` loads both whole models (base + unmerged adapter through peft,
the release through plain `from_pretrained`). `layers` never holds more than one decoder layer
of each: the probe runs through the decoder with every layer (and the embeddings and final
norm) swapped for a pair that loads layer i of the reference (base weights, trained extras,
the LoRA pair as an unmerged side path) and layer i of the release from their safetensors,
runs each on its half of a batch of two, and drops them. The release half takes its rotary
embedding from the release's own config.json, so a release that lost its rope scaling fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from pi_lora.core.errors import PiLoraError
from pi_lora.model.base_weights import SafetensorsWeights, empty_model
from pi_lora.release.fold import BaseTensors
from pi_lora.run.finished import Adapter

HEAD_ROWS = 8192  # vocabulary rows per chunk of the logits check


@dataclass
class Comparison:
    """Release vs reference on the probe."""

    max_abs_diff: float  # of the logits
    max_abs_logit: float
    top1_agreement: float
    layer_max_abs_diff: list[float] = field(default_factory=list)

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / (self.max_abs_logit or 1.0)


def compare_logits(logits: torch.Tensor, reference: torch.Tensor) -> Comparison:
    diff = (logits - reference).abs().max().item() if torch.isfinite(logits).all() else float("inf")
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return Comparison(diff, reference.abs().max().item(), agreement)


# --------------------------------------------------------------------------- layer by layer


Reader = Callable[..., torch.Tensor]  # (name, rows=None) -> fp32 tensor


class _Twin(torch.nn.Module):
    """Stands in for one module: row 0 through the reference, row 1 through the release,
    each materialized from its weights only for this call."""

    def __init__(self, prefix: str, reference: torch.nn.Module, release: torch.nn.Module,
                 readers: tuple[Reader, Reader], device: torch.device,
                 lora: Adapter | None = None, rotary: torch.nn.Module | None = None,
                 record: list[float] | None = None, done: Callable[[], Any] | None = None) -> None:
        super().__init__()
        self.prefix, self.device = prefix, device
        self._modules_pair = (reference, release)  # plain attribute: not registered children
        self.readers, self.lora, self.rotary, self.record = readers, lora, rotary, record
        self.done = done

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        outputs = []
        for row in (0, 1):
            module, read = self._modules_pair[row], self.readers[row]
            row_args = tuple(_row(a, row) for a in args)
            row_kwargs = {k: _row(v, row) for k, v in kwargs.items()}
            if row == 1 and self.rotary is not None and "position_embeddings" in row_kwargs:
                row_kwargs["position_embeddings"] = self.rotary(
                    _row(hidden, row), kwargs.get("position_ids"))
            _materialize(module, self.prefix, read, self.device)
            hooks = _lora_hooks(module, self.prefix, self.lora) if row == 0 else []
            try:
                out = module(_row(hidden, row), *row_args, **row_kwargs)
            finally:
                for hook in hooks:
                    hook.remove()
                module.to("meta")
            outputs.append(out)
        first, second = (_main(o) for o in outputs)
        if self.record is not None:
            self.record.append(_max_diff(first, second))
        if self.done is not None:
            self.done()
        merged = torch.cat([first, second])
        return (merged, *outputs[0][1:]) if isinstance(outputs[0], tuple) else merged


def _row(value: Any, row: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 2:
        return value[row:row + 1]
    if isinstance(value, tuple):
        return tuple(_row(v, row) for v in value)
    return value


def _main(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return (a.float() - b.float()).abs().max().item()


def _materialize(module: torch.nn.Module, prefix: str, read: Reader, device: torch.device) -> None:
    state = {}
    for name in module.state_dict(keep_vars=True):
        state[name] = read(f"{prefix}{name}").to(device, torch.float32)
    module.load_state_dict(state, strict=True, assign=True)


def _lora_hooks(module: torch.nn.Module, prefix: str, lora: Adapter | None) -> list[Any]:
    """peft's unmerged LoRA forward, out + (x A^T B^T) * scale, on every adapted Linear."""
    if lora is None:
        return []
    hooks = []
    for name, sub in module.named_modules():
        pair = lora.pairs.get(f"{prefix}{name}.weight" if name else f"{prefix}weight")
        if pair is None:
            continue
        a, b, scale = (pair[0].to(sub.weight.device), pair[1].to(sub.weight.device), pair[2])

        def hook(_m: Any, inputs: tuple[Any, ...], out: torch.Tensor,
                 a: torch.Tensor = a, b: torch.Tensor = b, scale: float = scale) -> torch.Tensor:
            return out + ((inputs[0] @ a.T) @ b.T) * scale

        hooks.append(sub.register_forward_hook(hook))
    return hooks


def _param_name(model: Any, param: torch.nn.Parameter) -> str:
    return next(n for n, p in model.named_parameters(remove_duplicate=True) if p is param)


def _layer_list(decoder: Any) -> tuple[str, torch.nn.ModuleList]:
    lists = [(n, m) for n, m in decoder.named_children() if isinstance(m, torch.nn.ModuleList)]
    if len(lists) != 1:
        raise PiLoraError(f"{type(decoder).__name__} has no single list of decoder layers",
                          field="--verify", fix="use --verify full for this architecture")
    return lists[0]


def verify_layers(reference_config: Any, release_dir: Any, base: BaseTensors, adapter: Adapter,
                  probe: torch.Tensor, device: torch.device) -> Comparison:
    """Layer-by-layer comparison of the release with base + adapter; one layer in memory."""
    from transformers import AutoConfig

    release_config = AutoConfig.from_pretrained(str(release_dir))
    ref_model, rel_model = empty_model(reference_config), empty_model(release_config)
    release = SafetensorsWeights(release_dir)
    release.use_model_names(rel_model)

    def read_release(name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if release.info(name) is None:
            raise PiLoraError(f"the release lacks {name}", field="--output",
                              fix="nothing was published; report this with the run directory")
        return release.read(name, rows).float()

    readers: tuple[Reader, Reader] = (base.read, read_release)
    heads = (_head_name(ref_model), _head_name(rel_model))  # before the twins hide the embeddings
    ref_decoder, rel_decoder = ref_model.get_decoder(), rel_model.get_decoder()
    prefix = _param_name(ref_model, ref_model.get_input_embeddings().weight).rsplit(".", 2)[0]
    prefix = f"{prefix}." if prefix else ""
    layers_name, ref_layers = _layer_list(ref_decoder)
    _, rel_layers = _layer_list(rel_decoder)
    record: list[float] = []
    rotary = getattr(rel_decoder, "rotary_emb", None)
    # minutes on a real model (each layer read twice from disk and run on the probe): say so
    bar = tqdm(total=len(ref_layers), desc="pi-lora: verifying layer by layer", unit="layer",
               file=sys.stderr, dynamic_ncols=True)
    for i in range(len(ref_layers)):
        ref_layers[i] = _Twin(f"{prefix}{layers_name}.{i}.", ref_layers[i], rel_layers[i],
                              readers, device, adapter, rotary, record, done=bar.update)
    for name, child in list(ref_decoder.named_children()):
        if name == layers_name or not any(True for _ in child.parameters()):
            continue
        setattr(ref_decoder, name, _Twin(f"{prefix}{name}.", child,
                                         getattr(rel_decoder, name), readers, device))
    for module in (rotary, getattr(ref_decoder, "rotary_emb", None)):
        if module is not None:
            module.to(device)
    with torch.no_grad():
        hidden = ref_decoder(input_ids=probe.repeat(2, 1).to(device), use_cache=False)
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        comparison = _compare_heads(heads, ref_model.config, hidden, readers)
    bar.close()
    comparison.layer_max_abs_diff = record
    return comparison


def _head_name(model: Any) -> tuple[str, int]:
    """The output head's weight name (the embedding's when tied) and its vocabulary size."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise PiLoraError(f"{type(model).__name__}'s output head is not a plain projection",
                          field="--verify", fix="use --verify full for this architecture")
    return _param_name(model, head.weight), head.weight.shape[0]


def _compare_heads(heads: tuple[tuple[str, int], tuple[str, int]], config: Any,
                   hidden: torch.Tensor, readers: tuple[Reader, Reader]) -> Comparison:
    """Logits of both halves, vocabulary chunk by chunk (never the whole T x V matrix)."""
    (ref_name, vocab), (rel_name, rel_vocab) = heads
    if rel_vocab != vocab:
        raise PiLoraError(f"the release's vocabulary has {rel_vocab} rows, the base {vocab}",
                          field="--output", fix="nothing was published; report this")
    cap = getattr(config, "final_logit_softcapping", None)
    h_ref, h_rel = hidden[0].float(), hidden[1].float()
    best = [torch.full((h_ref.shape[0],), -float("inf"), device=hidden.device) for _ in (0, 1)]
    best_id = [torch.zeros(h_ref.shape[0], dtype=torch.long, device=hidden.device) for _ in (0, 1)]
    max_diff, max_logit = 0.0, 0.0
    for start in range(0, vocab, HEAD_ROWS):
        rows = (start, min(vocab, start + HEAD_ROWS))
        logits = []
        for side, (h, name) in enumerate(((h_ref, ref_name), (h_rel, rel_name))):
            weight = readers[side](name, rows).to(h.device)
            chunk = h @ weight.T
            if cap:
                chunk = torch.tanh(chunk / cap) * cap
            value, index = chunk.max(-1)
            better = value > best[side]
            best[side] = torch.where(better, value, best[side])
            best_id[side] = torch.where(better, index + start, best_id[side])
            logits.append(chunk)
        max_diff = max(max_diff, _max_diff(logits[1], logits[0]))
        max_logit = max(max_logit, logits[0].abs().max().item())
    agreement = (best_id[0] == best_id[1]).float().mean().item()
    return Comparison(max_diff, max_logit, agreement)
