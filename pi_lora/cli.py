"""`pi-lora` command line: one function per command; nothing imports this module.

User errors (PiLoraError) print one message per problem and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from pi_lora.errors import EXIT_USER_ERROR, PiLoraError


def _quiet_libraries() -> None:
    """Silence warnings that say nothing to our users (bnb's kernels notice, TF banners)."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    warnings.filterwarnings("ignore", message=".*kernels.*", module="bitsandbytes")
    warnings.filterwarnings("ignore", message=".*gguf.*", category=UserWarning)


# --------------------------------------------------------------------------- commands


def cmd_validate(recipe_path: str, overrides: list[str]) -> int:
    """Print the resolved recipe and what follows from it, without training anything."""
    from pi_lora.describe import describe_recipe
    from pi_lora.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    print(recipe.to_yaml())
    print(describe_recipe(recipe))
    return 0


def cmd_train(recipe_path: str, overrides: list[str], resume: bool, overwrite: bool) -> int:
    from pi_lora.recipe import load_recipe
    from pi_lora.train import train

    recipe = load_recipe(recipe_path, overrides)
    run = train(recipe, resume=resume, overwrite=overwrite)
    print(f"pi-lora: run saved in {run}\n  next: pi-lora merge {run}")
    return 0


def cmd_merge(run_dir: str, output: str | None, dtype: str | None, probe_tokens: int | None,
              overwrite: bool) -> int:
    from pi_lora.merge import merge_run

    report = merge_run(run_dir, output, dtype=dtype, probe_tokens=probe_tokens,  # type: ignore[arg-type]
                       overwrite=overwrite)
    print(f"pi-lora: release written to {report.release_dir} ({report.dtype})\n"
          f"  verification on {report.probe_tokens} probe tokens: max |logit diff| "
          f"{report.max_abs_diff:.3g} ({report.relative_diff:.3%} of max |logit| "
          f"{report.max_abs_logit:.3g}; tolerance {report.tolerance:.2%}), top-1 agreement "
          f"{report.top1_agreement:.2%}, {report.seconds:.1f}s\n"
          f"  next: pi-lora eval {report.release_dir}")
    return 0


# --------------------------------------------------------------------------- parser


def _add_recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe value, e.g. training.max_steps=10")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pi-lora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a recipe and print what follows from it (offline)")
    _add_recipe_args(p)
    p.set_defaults(run=lambda a: cmd_validate(a.recipe, a.overrides))

    p = sub.add_parser("train", help="PI-patched base + LoRA fine-tune into a run directory")
    _add_recipe_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    p.set_defaults(run=lambda a: cmd_train(a.recipe, a.overrides, a.resume, a.overwrite))

    p = sub.add_parser("merge", help="fold the adapter into a verified release checkpoint")
    p.add_argument("run_dir")
    p.add_argument("--output", help="release directory (default: release/RUN_NAME)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="default: model.dtype")
    p.add_argument("--probe-tokens", type=int, help="verification length (default: original+128)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=lambda a: cmd_merge(a.run_dir, a.output, a.dtype, a.probe_tokens,
                                           a.overwrite))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    runner: Callable[[argparse.Namespace], int] = args.run
    try:
        return runner(args)
    except PiLoraError as err:
        print(f"pi-lora: error: {err.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("pi-lora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

