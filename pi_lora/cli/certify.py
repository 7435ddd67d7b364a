"""`pi-lora certify RELEASE --base BASE`: its options and what it does once they are parsed.

Every protocol option is a CertifySettings field: the flag's help is the field's description
and the default shown is the field's own, so neither is written twice. Exit status: 0 when the
verdict passes, 1 when it fails, 2 on bad input (raised as PiLoraError before any model loads).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pi_lora.core.errors import PiLoraError

# field -> (flag, how its text is read); the order is --help's
FLAGS: dict[str, tuple[str, str]] = {
    "lengths": ("--lengths", "lengths"),
    "trials": ("--trials", "int"),
    "seed": ("--seed", "int"),
    "tasks": ("--tasks", "list"),
    "layout": ("--layout", "choice"),
    "haystack": ("--haystack", "many"),
    "documents": ("--docs", "many"),
    "ppl_windows": ("--ppl-windows", "int"),
    "threshold_ratio": ("--threshold-ratio", "float"),
    "threshold": ("--threshold", "float"),
    "min_threshold": ("--min-threshold", "float"),
    "min_retention": ("--min-retention", "float"),
    "required_length": ("--required-length", "length"),
    "dtype": ("--dtype", "choice"),
    "device": ("--device", "str"),
}


def add_certify_arguments(parser: argparse.ArgumentParser) -> None:
    import typing

    from pi_lora.eval.certify import CertifySettings

    parser.add_argument("release", metavar="RELEASE", help="release directory (pi-lora merge)")
    parser.add_argument("--base", required=True, metavar="BASE",
                        help="the base model the release was trained from (directory, .gguf or "
                             "hub id; checked against the release's record)")
    for name, (flag, kind) in FLAGS.items():
        field = CertifySettings.model_fields[name]
        shown = field.default
        if isinstance(shown, list):
            shown = ",".join(map(str, shown)) or None
        help_text = (field.description or "") + ("" if shown is None or "(default" in
                                                 (field.description or "") else f" (default: {shown})")
        if kind == "choice":
            parser.add_argument(flag, choices=typing.get_args(field.annotation), help=help_text)
        elif kind == "many":
            parser.add_argument(flag, nargs="+", metavar="FILE", help=help_text)
        else:  # read and range-checked by CertifySettings, errors named by the flag
            parser.add_argument(flag, help=help_text)
    parser.add_argument("--out", metavar="FILE",
                        help="where certificate.json goes (default: inside RELEASE)")
    parser.add_argument("--no-card", action="store_true",
                        help="leave the model card as it is (default: the verdict replaces the "
                             "Certificate section of RELEASE/README.md)")


def _given(args: argparse.Namespace) -> dict[str, Any]:
    """The CertifySettings fields the command line set, their text read."""
    from pi_lora.eval.targets import parse_length

    given: dict[str, Any] = {}
    for name, (flag, kind) in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is None:
            continue
        if kind == "lengths":
            value = [parse_length(x, flag) for x in value.split(",") if x.strip()]
        elif kind == "length":
            value = parse_length(value, flag)
        elif kind == "list":
            value = [x.strip() for x in value.split(",") if x.strip()]
        given[name] = value
    return given


def certify_settings(args: argparse.Namespace) -> Any:
    """CertifySettings from the command line; the first bad option as a PiLoraError."""
    from pydantic import ValidationError

    from pi_lora.core.safe_yaml import short_repr
    from pi_lora.eval.certify import CertifySettings

    try:
        return CertifySettings(**_given(args))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        flag = FLAGS.get(name, ("--" + name.replace("_", "-"), ""))[0]
        got = f" (got {short_repr(first['input'])})" if "input" in first else ""
        raise PiLoraError(f"{first['msg']}{got}", field=flag,
                          fix="see pi-lora certify --help") from None


def cmd_certify(args: argparse.Namespace) -> int:
    """Suite + retention for the release against its base; certificate.json and the card."""
    from pi_lora.cli.commands import _check_report_dir
    from pi_lora.eval.certificate import (
        CARD_FILE,
        CERTIFICATE_FILE,
        card_section,
        certify_release,
        write_certificate,
    )
    from pi_lora.eval.certify_run import prepare

    settings = certify_settings(args)
    inputs = prepare(args.release, args.base, settings)
    out = Path(args.out).expanduser() if args.out else inputs.release.path / CERTIFICATE_FILE
    _check_report_dir(out.parent)  # a real write probe, before the hours of measuring
    if not args.no_card:
        _check_report_dir(inputs.release.path)
    certificate, verdict = certify_release(inputs, settings)
    write_certificate(certificate, out, None if args.no_card else inputs.release.path / CARD_FILE)
    print(card_section(certificate))
    where = "" if args.no_card else f" and the Certificate section of {inputs.release.path / CARD_FILE}"
    print(f"pi-lora: {'PASS' if verdict.passed else 'FAIL'}; certificate written to {out}{where}")
    return 0 if verdict.passed else 1
