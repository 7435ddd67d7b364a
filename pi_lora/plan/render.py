"""A plan for people (aligned text) and for scripts (JSON-ready dict)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pi_lora.plan.compute import FORMULA
from pi_lora.plan.devices import GIB
from pi_lora.plan.merging import merge_to_dict, render_merge

if TYPE_CHECKING:
    from pi_lora.plan.memory import MemoryPlan
    from pi_lora.plan.planner import Plan
    from pi_lora.plan.shape import ModelShape


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_table(plan: Plan) -> str:
    s, m, t, shape = plan.setup, plan.memory, plan.time, plan.shape
    lines = [
        f"pi-lora plan: {plan.recipe_name} on {s.nodes} node(s) x {s.gpus_per_node} {plan.device.name}",
        f"model: {shape.model_type}, {shape.total_params / 1e9:.2f}B parameters "
        f"({shape.trainable_params / 1e6:.1f}M trainable: LoRA {shape.lora_params / 1e6:.1f}M "
        f"+ extras {shape.extras_params / 1e6:.1f}M); config from {plan.config_source}; "
        f"attention window {_window(shape, s.seq_len)}",
        f"step: {_per_device(s)}, accumulation {s.grad_accum}, "
        f"global batch {s.global_batch}, "
        f"{s.tokens_per_step:,} tokens per optimizer step; "
        f"ZeRO-{s.zero_stage}{' + offload' if s.offload else ''}"
        f"{', checkpointing' if s.checkpointing else ''}"
        f"{', chunked loss' if s.chunked_loss else ', plain loss'}"
        f"{', S2-Attn' if s.s2_attn else ''}{', tiled MLP' if s.tiled_mlp else ''}, {s.attn}",
        "",
        f"memory per device (peak at {m.peak_moment}):",
    ]
    lines += [f"  {term.name:<38}{_gib(term.bytes)}   {term.note}" for term in m.terms]
    if m.load_peak_bytes:
        lines.append(f"  {'(loading peak)':<38}{_gib(m.load_peak_bytes)}   GGUF dequantized via fp32")
    lines.append(f"  {'total':<38}{_gib(m.peak_bytes)}   of {m.device_bytes / GIB:.1f} GiB: "
                 f"{plan.verdict.upper()}")
    if m.host_bytes_per_node:
        lines.append(f"  host RAM per node for offloaded states: {m.host_bytes_per_node / GIB:.1f} GiB")
    lines += _other_moments(m)
    lines += [
        "",
        "time:",
        f"  FLOPs: {FORMULA}",
        f"  executed {t.flops_per_token / 1e9:.1f} GFLOP/token (model-FLOPs convention 6N+12LDT: "
        f"{t.model_flops_per_token / 1e9:.1f}); {t.flops_per_step / 1e15:.1f} PFLOP per step",
        f"  assumed utilisation {t.mfu:.0%} of {plan.device.peak_tflops:g} TFLOP/s "
        f"({'; '.join(t.notes)})",
        f"  step {_duration(t.step_seconds)} (compute {_duration(t.compute_seconds)}, "
        f"communication {_duration(t.communication_seconds)} overlapped, "
        f"offload {_duration(t.offload_seconds)}"
        f"{_all_to_all(t.all_to_all_seconds, s.sequence_parallel)}), "
        f"{t.tokens_per_second:,.0f} tokens/s",
        f"  {s.max_steps} steps: {_duration(t.total_seconds)}, "
        f"{t.device_hours:,.1f} {plan.device.name}-hours",
    ]
    merge = render_merge(plan.merge) if plan.merge else []
    return "\n".join(lines + merge + _render_advice(plan))


def _per_device(s: Any) -> str:
    if s.sequence_parallel == 1:
        return f"{s.batch} x {s.seq_len:,} tokens per device"
    return (f"{s.batch} x {s.seq_len:,} tokens per sequence, shared by {s.sequence_parallel} "
            f"devices ({s.local_tokens:,} each, sequence parallel; {s.groups} group(s))")


def _all_to_all(seconds: float, parts: int) -> str:
    return "" if parts == 1 else f", sequence-parallel all-to-all {_duration(seconds)}"


def _other_moments(m: MemoryPlan) -> list[str]:
    """The transient terms of the moments that are not the peak, each with its own total."""
    lines = []
    for moment, terms in m.moments.items():
        if moment == m.peak_moment:
            continue
        total = sum(t.bytes for t in terms)
        lines.append(f"  at {moment}: transients {_gib(total).strip()}")
        lines += [f"    {term.name:<36}{_gib(term.bytes)}" for term in terms]
    return ["", "other moments of the step (not the peak):", *lines] if lines else []


def _render_advice(plan: Plan) -> list[str]:
    if not plan.recommendations:
        return []
    lines = ["", "recommendations (memory and step time if applied alone):"]
    for r in plan.recommendations:
        verdict = "fits" if r.fits else "does not fit"
        lines.append(f"  {r.name:<26} peak {r.peak_bytes / GIB:7.2f} GiB "
                     f"({r.peak_delta_bytes / GIB:+.2f}), step {_duration(r.step_seconds)} "
                     f"({r.step_delta_seconds:+.2f} s), {verdict}; {r.why}")
        lines.append(f"  {'':<26} --set {' --set '.join(r.overrides)}")
    return lines


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """Everything in the table, in bytes and seconds, for scripts (`--json`)."""
    return {
        "recipe": plan.recipe_name,
        "config_source": plan.config_source,
        "device": asdict(plan.device),
        "setup": asdict(plan.setup),
        "shape": asdict(plan.shape),
        "memory": {
            "terms": [asdict(t) for t in plan.memory.terms],
            "peak_moment": plan.memory.peak_moment,
            "moments": {name: [asdict(t) for t in terms]
                        for name, terms in plan.memory.moments.items()},
            "step_peak_bytes": plan.memory.step_peak_bytes,
            "load_peak_bytes": plan.memory.load_peak_bytes,
            "peak_bytes": plan.memory.peak_bytes,
            "device_bytes": plan.memory.device_bytes,
            "host_bytes_per_node": plan.memory.host_bytes_per_node,
            "verdict": plan.verdict,
        },
        "time": {"formula": FORMULA, **asdict(plan.time)},
        "recommendations": [asdict(r) for r in plan.recommendations],
        "merge": merge_to_dict(plan.merge) if plan.merge else None,
    }


def _window(shape: ModelShape, seq_len: int) -> str:
    window = shape.attention_window
    if window is None:
        return "whole context"
    if shape.global_layers:  # local layers keep their window by design; the global ones see all
        local = shape.layers - shape.global_layers
        return (f"{window:,} tokens in {local} local layers, whole context in "
                f"{shape.global_layers} global layers")
    short = " (below the training length: set model.sliding_window)" if window < seq_len else ""
    return f"{window:,} tokens{short}"
