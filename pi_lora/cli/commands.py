"""What each `pi-lora` command does once its arguments are parsed (pi_lora.cli parses them).

Each imports the heavy modules it needs inside itself, so `pi-lora --help` and `validate`
stay fast; user errors are raised as PiLoraError and turned into exit 2 by the cli.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pi_lora.core.errors import PiLoraError
from pi_lora.train.launch import LaunchPlan

if TYPE_CHECKING:
    from pydantic import ValidationError


def cmd_validate(recipe_path: str, overrides: list[str]) -> int:
    """Print the resolved recipe and what follows from it, without training anything."""
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.train.preflight import validate_recipe

    recipe = load_recipe(recipe_path, overrides)
    print(recipe.to_yaml())
    _working("validate: reading the model config, building the model on the meta device")
    print(validate_recipe(recipe))
    return 0


def _working(what: str) -> None:
    """One line before the 10-70 s a command spends importing transformers and counting a
    model's parameters, so it is never silent (stderr: stdout stays the command's output)."""
    print(f"pi-lora {what} ...", file=sys.stderr, flush=True)


def cmd_train(recipe_path: str, overrides: list[str], resume: bool, overwrite: bool,
              launch: LaunchPlan) -> int:
    """Train in this process, or relaunch this command under torchrun / deepspeed."""
    from pi_lora.core.run_lock import hold
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.run.directory import RunDir
    from pi_lora.train.distributed import process_info
    from pi_lora.train.launch import maybe_relaunch, needs_launch, train_child_args

    recipe = load_recipe(recipe_path, overrides)
    protect = [recipe_path]  # --overwrite never deletes the recipe file being run
    if needs_launch(launch):  # user errors exit 2 here, not inside N processes
        if recipe.training.sequence_parallel > 1 and not launch.hostfile:
            from pi_lora.train.sequence_parallel import check_accumulation

            check_accumulation(recipe.training, launch.processes_per_node() * launch.nnodes)
        # the main node's launcher holds the run's lock for its children: a second launch is
        # refused before it starts N processes (other nodes' launchers share the run)
        with hold(recipe.output_dir, enabled=launch.node_rank == 0, for_children=True):
            RunDir(recipe.output_dir).prepare(recipe, resume=resume, overwrite=overwrite,
                                              is_main=False, protect=protect)
            return maybe_relaunch(launch, train_child_args(recipe_path, overrides, resume,
                                                           overwrite)) or 0
    from pi_lora.run.loss_curve import try_draw_loss_curve
    from pi_lora.train.assembly import train

    try:
        run = train(recipe, resume=resume, overwrite=overwrite, protect=protect)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the curve so far, beside its checkpoints
        if process_info().is_main:
            try_draw_loss_curve(RunDir(recipe.output_dir))
        raise
    if process_info().is_main:
        print(f"pi-lora: run saved in {run}\n  next: pi-lora merge {run}")
    _release_process_group()
    return 0


def cpu_allocator() -> None:
    """On a machine without GPUs, re-run this command with tcmalloc preloaded when it is
    installed (pi_lora/core/allocator.py: the same peak as glibc tuned, without its page-fault
    bill). Decided before torch is imported, so the re-run costs one interpreter start."""
    from pi_lora.core.allocator import reexec_with_tcmalloc

    if not any(Path(device).exists() for device in ("/dev/nvidiactl", "/dev/kfd")):
        reexec_with_tcmalloc()


def _release_process_group() -> None:
    """Leave the process group once every rank has finished (all output is saved by then).

    A launched rank leaves with os._exit after the barrier: in ~1 of 4 suite runs a non-main
    rank of a finished 2-process ZeRO-3 run aborted in the interpreter's teardown ("terminate
    called without an active exception", exit -6), turning a complete run into a failure.
    """

    import torch.distributed as dist

    from pi_lora.train.distributed import process_info

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()  # no rank leaves while another still talks to it
    if process_info().world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()


def cmd_merge(args: argparse.Namespace) -> int:
    """Stream the run into a release shard by shard, verify it, publish it atomically."""
    from pi_lora.core.allocator import tune_cpu_allocator
    from pi_lora.release.merge import merge_run

    tune_cpu_allocator()  # this process only: each freed shard goes back to the OS at once
    report = merge_run(args.run_dir, args.output, dtype=args.dtype, probe_tokens=args.probe_tokens,
                       overwrite=args.overwrite, verify=args.verify, device=args.device,
                       max_shard_size=args.max_shard_size,
                       allow_base_mismatch=args.allow_base_mismatch,
                       checkpoint=args.checkpoint)
    lines = [
        f"pi-lora: release written to {report.release_dir} ({report.dtype}, {report.shards} "
        f"shard(s); {report.lora_folded} LoRA pairs and {report.extras_applied} trained extras "
        f"folded in)",
        f"  verification ({report.verify}) on {report.probe_tokens} probe tokens: max |logit diff| "
        f"{report.max_abs_diff:.3g} ({report.relative_diff:.3%} of max |logit| "
        f"{report.max_abs_logit:.3g}; tolerance {report.tolerance:.2%}), top-1 agreement "
        f"{report.top1_agreement:.2%}, {report.seconds:.1f}s",
    ]
    if report.layer_max_abs_diff:
        worst = max(range(len(report.layer_max_abs_diff)), key=report.layer_max_abs_diff.__getitem__)
        lines.append(f"  hidden states: max |diff| {report.layer_max_abs_diff[worst]:.3g} "
                     f"(layer {worst} of {len(report.layer_max_abs_diff)}; every layer in "
                     f"merge_report.json)")
    if report.quantized_max_abs_diff is not None:
        lines.append(f"  vs the quantized model as trained (QLoRA): max |logit diff| "
                     f"{report.quantized_max_abs_diff:.3g}, top-1 agreement "
                     f"{report.quantized_top1_agreement:.2%}")
    lines.append(f"  next: pi-lora eval {report.release_dir}")
    print("\n".join(lines))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A release -> GGUF through llama.cpp's converter, its rope metadata checked."""
    from pi_lora.release.gguf_export import export_release

    report = export_release(args.release_dir, args.gguf, outtype=args.outtype,
                            converter=args.converter, python=args.python,
                            overwrite=args.overwrite)
    facts = report.facts
    scaling = facts.scaling if facts.factor is None else f"{facts.scaling} x{facts.factor:g}"
    if facts.original_context:
        scaling += f" from {facts.original_context}"
    print(f"pi-lora: GGUF written to {report.gguf} ({report.architecture}, {report.outtype}, "
          f"{report.seconds:.0f}s)\n"
          f"  rope metadata checked against config.json: context {facts.context_length}, "
          f"scaling {scaling}, freq base {facts.freq_base:g}"
          + "".join(f", yarn {k} {v:g}" for k, v in facts.yarn.items())
          + "".join(f", {t}" for t in facts.tensors) + "\n"
          "  serve it with:\n" + "\n".join(f"    {line}" for line in report.serving))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Passkey + perplexity for every target into one report (JSON, Markdown, PNGs)."""
    import time

    from pydantic import ValidationError

    from pi_lora.eval.report import render_markdown
    from pi_lora.eval.runner import default_lengths, resolve_device, resolve_dtype, run_eval
    from pi_lora.eval.settings import EvalSettings
    from pi_lora.eval.targets import resolve_targets

    given = _eval_values(args)
    out = Path(args.out or f"reports/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_report_dir(out)  # before hours of evaluation, not after
    try:
        settings = EvalSettings(**given)
    except ValidationError as exc:
        raise _eval_option_error(exc) from None
    resolve_device(settings)  # an unknown or absent device fails here, before any loading
    targets = resolve_targets(args.targets, args.rope, resolve_dtype(settings),
                              args.trust_remote_code)
    derived = {name: lengths for name in ("passkey_lengths", "ppl_lengths") if name not in given
               if (lengths := default_lengths(targets, passkey=name == "passkey_lengths"))}
    if derived:  # lengths follow the targets' windows
        try:
            settings = EvalSettings(**given, **derived)
        except ValidationError as exc:
            raise _eval_option_error(exc) from None
        said = "; ".join(f"{name.split('_')[0]} {','.join(map(str, lengths))}"
                         for name, lengths in derived.items())
        print(f"pi-lora: lengths {said} (the targets' original, half-extended and extended "
              "windows; --passkey-lengths / --ppl-lengths choose others)", flush=True)
    if settings.perplexity and not settings.documents and settings.dataset is None:
        print("pi-lora: perplexity on the held-out Shakespeare plays pi-lora ships (public "
              "domain); --docs scores your own text", flush=True)
    report = run_eval(targets, settings, out)
    print(render_markdown(report))
    print(f"pi-lora: report written to {out}/report.md (numbers and protocol: {out}/report.json)")
    if not args.no_card:
        from pi_lora.eval.card_results import update_release_cards
        from pi_lora.run.provenance import command_line

        for note in update_release_cards(report, command_line()):
            print(f"pi-lora: {note}")
    return 0


def _eval_values(args: argparse.Namespace) -> dict[str, Any]:
    """The EvalSettings fields the command line set (FLAGS: one declaration per option)."""
    from pi_lora.eval.settings import FLAGS
    from pi_lora.eval.targets import parse_fraction, parse_length

    lists = {"lengths": parse_length, "fractions": parse_fraction}
    given: dict[str, Any] = {}
    for name, option in FLAGS.items():
        value = getattr(args, option.flag.lstrip("-").replace("-", "_"))
        if option.kind == "off":
            given[name] = not value
        elif option.kind in lists and value:
            given[name] = [lists[option.kind](x, option.flag) for x in value.split(",")]
        elif value is not None and value != []:
            given[name] = value
    return given


def _eval_option_error(exc: ValidationError) -> PiLoraError:
    """The first bad option, named by its flag, its value cut short."""
    from pi_lora.core.safe_yaml import short_repr

    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    from pi_lora.eval.settings import FLAGS

    option = FLAGS.get(name)
    message = first["msg"].removeprefix("Value error, ")  # pydantic's wording is not ours
    if not name:  # a rule across options: its message names the flags
        flag = message.split()[0] if message.startswith("--") else None
        return PiLoraError(message, field=flag, fix="see `pi-lora eval --help` for each flag")
    flag = option.flag if option else "--" + name.replace("_", "-")
    got = f" (got {short_repr(first['input'])})" if "input" in first else ""
    return PiLoraError(f"{message}{got}", field=flag, fix=f"see `pi-lora eval --help` for {flag}")


def _check_report_dir(out: Path) -> None:
    """The report directory can be created (or is one): not a file, not under a file."""
    if out.exists() and not out.is_dir():
        raise PiLoraError(f"{out} is an existing file, not a directory", field="--out",
                          fix="give a directory for the report (new or existing)")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise PiLoraError(f"{parent} is a file, so {out} cannot be created", field="--out",
                          fix="give a directory path for the report")
    where = out if out.exists() else parent
    try:  # a real write: os.access says yes to root on a read-only mount's 0555 directory
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as exc:
        raise PiLoraError(f"cannot write to {where} ({exc.strerror})", field="--out",
                          fix="choose a writable directory") from None


def cmd_plan(recipe_path: str, overrides: list[str], gpu: str, gpus: int, nodes: int,
             as_json: bool) -> int:
    """Memory per device, step time and cost of a recipe, offline, before launching it."""
    import contextlib
    import json

    from pi_lora.plan import device_names, get_device, plan_recipe, plan_to_dict, render_table
    from pi_lora.recipe.loading import load_recipe

    device = get_device(gpu)
    if device is None:
        raise PiLoraError(f"unknown device {gpu!r}", field="--gpu",
                          fix=f"one of {', '.join(device_names())}")
    _working("plan: reading the model config, building the model on the meta device")
    with contextlib.redirect_stdout(sys.stderr):  # library banners must not corrupt --json
        plan = plan_recipe(load_recipe(recipe_path, overrides), device, gpus=gpus, nodes=nodes)
    print(json.dumps(plan_to_dict(plan), indent=1) if as_json else render_table(plan))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """LongRoPE's factor search on the recipe's base at its target length."""
    from pi_lora.eval.texts import load_documents
    from pi_lora.recipe.loading import load_recipe
    from pi_lora.search.longrope import SearchSettings, run_search

    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out or Path("search") / Path(recipe.output_dir).name)
    _check_report_dir(out)  # before the search, not after it
    if (out / "factors.json").exists() and not args.overwrite:
        raise PiLoraError(f"{out / 'factors.json'} already exists (an earlier search)",
                          field="--out", fix="choose another --out, or pass --overwrite")
    if args.minutes is not None and args.minutes <= 0:
        raise PiLoraError("--minutes must be positive", field="--minutes", fix="e.g. 30")
    settings = SearchSettings(population=args.population, generations=args.generations,
                              mutations=args.mutations, crossovers=args.crossovers,
                              parents=min(args.parents, args.population), samples=args.samples,
                              seed=args.seed, minutes=args.minutes)
    documents = [d.text for d in load_documents([Path(p) for p in args.docs])]
    result = run_search(recipe, documents, out, settings)
    print(f"pi-lora: factors written to {out}/factors.json (ppl {result.fitness:.4f} at "
          f"{result.target_context}; " + ", ".join(
              f"{k} {v:.4f}" for k, v in result.baselines.items())
          + f"; {result.evaluations} candidates in {result.seconds:.0f} s)\n"
          f"  next: --set rope.method=longrope --set rope.longrope.factors={out}/factors.json")
    return 0
