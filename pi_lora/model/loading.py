"""Loading the base model (hub id, local dir, GGUF), applying the rope plan, wrapping with LoRA.

Everything the user names in `model:` is checked here, where it is read, so a wrong path or
a GPU-only option on a CPU machine fails before any weights are touched.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pi_lora.core.errors import PiLoraError
from pi_lora.model.rope import RopePlan, apply_rope
from pi_lora.recipe.dtypes import TORCH_DTYPES
from pi_lora.recipe.loading import DType, LoraSection, ModelSection

# LoRA targets per architecture: attention projections, as in the PI paper / LongLoRA
_ATTENTION_PROJECTIONS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "falcon": ["query_key_value", "dense"],
}
_DEFAULT_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a local directory (maybe holding a GGUF file) or a hub id."""

    path: str
    gguf_file: str | None
    is_local: bool


def resolve_source(model: ModelSection) -> ModelSource:
    """Local paths become absolute (so run dirs work from anywhere); others are hub ids."""
    name = os.path.expanduser(model.name)
    if name.endswith(".gguf"):
        file = Path(name)
        if not file.is_file():
            raise PiLoraError(f"GGUF file {name} not found", field="model.name", fix="check the path")
        return ModelSource(str(file.parent.resolve()), file.name, True)
    path = Path(name)
    if path.exists():
        if model.gguf_file and not (path / model.gguf_file).is_file():
            raise PiLoraError(f"{model.gguf_file} not found in {path}", field="model.gguf_file",
                              fix="name a .gguf file inside model.name")
        if not model.gguf_file and not (path / "config.json").is_file():
            raise PiLoraError(f"{path} has no config.json", field="model.name",
                              fix="point at a Hugging Face model directory or set model.gguf_file")
        return ModelSource(str(path.resolve()), model.gguf_file, True)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PiLoraError(f"local path {name} does not exist", field="model.name",
                          fix="check the path (or give a hub id such as org/name)")
    return ModelSource(name, model.gguf_file, False)


def _hub_error(model: ModelSection, exc: Exception) -> PiLoraError:
    if "trust_remote_code" in str(exc) and not model.trust_remote_code:
        return PiLoraError(
            f"{model.name!r} runs its own modelling code, which is off by default",
            field="model.trust_remote_code",
            fix="if you trust that code, set model.trust_remote_code: true in the recipe "
                "(pi-lora eval: --trust-remote-code)")
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    unreachable = None if offline or resolve_source(model).is_local else hub_unreachable()
    if unreachable:
        return PiLoraError(
            f"cannot load {model.name!r}: the hub cannot be reached ({unreachable}) and it is "
            "not in the local cache", field="model.name",
            fix=f"connect this machine, or download it where the hub is reachable (`hf download "
                f"{model.name} --local-dir DIR`), copy DIR here and point model.name at it")
    return PiLoraError(
        f"cannot load {model.name!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
        field="model.name",
        fix=(f"download it first (`hf download {model.name} --local-dir DIR`) and point "
             "model.name at DIR"
             if not offline else "HF_HUB_OFFLINE=1: point model.name at a local directory"),
    )


@functools.cache
def hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here, None when it can (or when a proxy is set,
    which only a real request can judge). One connection attempt of at most 3 s, once per
    process: without it a machine off the network waits through huggingface_hub's five
    retries (~25 s of "Retrying in 8s" lines) before our own error."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or exc}"
    return None


def hub_cache_only(source: ModelSource) -> bool:
    """Read a hub id from the local cache alone: offline mode, or the hub out of reach."""
    if source.is_local:
        return False
    return os.environ.get("HF_HUB_OFFLINE") == "1" or hub_unreachable() is not None


def _common_kwargs(model: ModelSection, source: ModelSource) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if hub_cache_only(source):
        kwargs["local_files_only"] = True
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if model.revision:
        kwargs["revision"] = model.revision
    return kwargs


def load_config(model: ModelSection) -> Any:
    """The base config, rope settings untouched (legacy `rope_scaling` is read by transformers)."""
    from transformers import AutoConfig

    source = resolve_source(model)
    try:
        return AutoConfig.from_pretrained(source.path, **_common_kwargs(model, source))
    except (OSError, ValueError) as exc:
        raise _hub_error(model, exc) from None


def load_tokenizer(model: ModelSection) -> Any:
    from transformers import AutoTokenizer

    source = resolve_source(model)
    kwargs = _common_kwargs(model, source)
    path = source.path
    if model.tokenizer:
        path, kwargs = model.tokenizer, {"trust_remote_code": model.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise _hub_error(model, exc) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_runtime(model: ModelSection) -> None:
    """GPU-only and optional-package options fail here with the fix, before loading."""
    if model.attn_implementation == "flash_attention_2":
        if not torch.cuda.is_available():
            raise PiLoraError("flash_attention_2 needs a CUDA GPU", field="model.attn_implementation",
                              fix="use sdpa on this machine")
        if importlib.util.find_spec("flash_attn") is None:
            raise PiLoraError("flash_attn is not installed", field="model.attn_implementation",
                              fix="pip install flash-attn, or use sdpa")
    if model.quantization and importlib.util.find_spec("bitsandbytes") is None:
        raise PiLoraError("bitsandbytes is not installed", field="model.quantization",
                          fix="pip install bitsandbytes, or remove model.quantization")
    if model.dtype == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise PiLoraError("this GPU has no bf16", field="model.dtype", fix="use fp16")


def quantization_config(model: ModelSection) -> Any:
    """bitsandbytes config; 4-bit storage = compute dtype so ZeRO-3 can shard it."""
    if model.quantization is None:
        return None
    from transformers import BitsAndBytesConfig

    dtype = TORCH_DTYPES[model.dtype]
    if model.quantization.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=model.quantization.quant_type,
        bnb_4bit_use_double_quant=model.quantization.double_quant,
        bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
    )


def compute_4bit_as_trained(model: Any) -> int:
    """Make 4-bit layers compute inference the way they computed in training.

    bitsandbytes (>= 0.49) runs a 4-bit layer in eval mode on a CPU with AVX512-BF16 through
    a packed kernel that casts the activations to bf16, whatever the compute dtype; training
    (and any CPU without those units) dequantizes and multiplies in the compute dtype. A check
    of "the model as trained" must use the training arithmetic. Returns the layers switched.
    """
    switched = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            switched += 1
    return switched


def attention_window(config: Any) -> int | None:
    """Tokens a layer attends back (None: the whole context), as transformers reads it."""
    layer_types = getattr(config, "layer_types", None)
    if getattr(config, "use_sliding_window", True) is False or (
            layer_types and "sliding_attention" not in layer_types):
        return None
    return getattr(config, "sliding_window", None)


def apply_sliding_window(config: Any, model: ModelSection) -> None:
    """The recipe's `model.sliding_window` into the config (before weights load, and so into
    the release): a PI-extended model whose layers still look 4096 back is not 32k."""
    if model.sliding_window is None:
        return
    layer_types = list(getattr(config, "layer_types", None) or ())
    switchable = hasattr(config, "use_sliding_window")  # Qwen2-style: one switch for all
    if model.sliding_window == "none":
        if "sliding_attention" in layer_types and not switchable:
            raise PiLoraError(
                f"{config.model_type} interleaves local (sliding) and global layers",
                field="model.sliding_window",
                fix="give the local layers' window in tokens, or leave it unset")
        if switchable:
            config.use_sliding_window = False
        if layer_types:
            config.layer_types = ["full_attention"] * len(layer_types)
        config.sliding_window = None
        return
    if attention_window(config) is None and (switchable or layer_types):
        raise PiLoraError(f"{config.model_type} as configured attends to the whole context",
                          field="model.sliding_window", fix="leave it unset (or `none`)")
    config.sliding_window = model.sliding_window


def load_model(
    model: ModelSection,
    plan: RopePlan | None,
    *,
    dtype: DType | None = None,
    quantize: bool = True,
    device_map: Any = None,
) -> Any:
    """The base causal LM with the rope plan written into its config before weights load."""
    from transformers import AutoModelForCausalLM

    check_runtime(model)
    source = resolve_source(model)
    config = load_config(model)
    if plan is not None:
        apply_rope(config, plan)
    apply_sliding_window(config, model)
    kwargs = _common_kwargs(model, source)
    kwargs.update(config=config, dtype=TORCH_DTYPES[dtype or model.dtype],
                  attn_implementation=model.attn_implementation)
    if quantize and model.quantization:
        kwargs["quantization_config"] = quantization_config(model)
    elif source.gguf_file:
        # transformers 5 keeps GGUF blocks packed (not trainable, not savable): unpack them
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    if device_map is not None:
        kwargs["device_map"] = device_map
    from safetensors import SafetensorError

    try:
        loaded = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    except SafetensorError as exc:  # not an OSError: a truncated or garbled weights file
        raise _damaged_weights(Path(source.path), exc) from None
    except (OSError, ValueError) as exc:
        raise _hub_error(model, exc) from None
    return loaded


def _damaged_weights(directory: Path, exc: Exception) -> PiLoraError:
    """Name the weights file safetensors refused (its error names none), and the fix."""
    from safetensors import SafetensorError, safe_open

    broken = directory
    for path in sorted(directory.glob("*.safetensors")) if directory.is_dir() else ():
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError):
            broken = path
            break
    return PiLoraError(f"{broken} is damaged (safetensors: {str(exc).splitlines()[0][:160]}); "
                       "a download or copy was cut short", field="model.name",
                       fix="download or copy the model again (compare its size with the "
                           "source's), then rerun")


# --------------------------------------------------------------------------- LoRA


def default_target_modules(model_type: str) -> list[str]:
    return list(_ATTENTION_PROJECTIONS.get(model_type, _DEFAULT_PROJECTIONS))


def extras_parameter_names(model: Any, extras: list[str]) -> list[str]:
    """Parameter names (as `model.named_parameters()` gives them) of the LongLoRA extras."""
    wanted: set[int] = set()
    if "embeddings" in extras:
        wanted |= {id(p) for p in model.get_input_embeddings().parameters()}
    if "lm_head" in extras and model.get_output_embeddings() is not None:
        wanted |= {id(p) for p in model.get_output_embeddings().parameters()}
    if "norms" in extras:
        for module in model.modules():
            if type(module).__name__.endswith(("Norm", "RMSNorm", "LayerNorm")):
                wanted |= {id(p) for p in module.parameters(recurse=False)}
    return [name for name, p in model.named_parameters(remove_duplicate=True) if id(p) in wanted]


def wrap_lora(model: Any, lora: LoraSection, *, gradient_checkpointing: bool) -> Any:
    """peft LoRA on the attention projections, plus trainable extras kept in fp32."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    targets = lora.target_modules or default_target_modules(model.config.model_type)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present]
    if missing:
        raise PiLoraError(
            f"modules {missing} not found in {model.config.model_type}", field="lora.target_modules",
            fix=f"choose among e.g. {sorted(n for n in present if 'proj' in n or 'dense' in n)[:8]}")
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    extras = set(extras_parameter_names(peft_model, lora.trainable_extras))
    for name, param in peft_model.named_parameters():
        if name in extras:
            param.requires_grad_(True)
            # updates of lr * 1 vanish in bf16; optimizer math needs fp32 weights (DeepSpeed
            # keeps fp32 masters itself, and a ZeRO-3 sharded parameter has no data to cast)
            if not hasattr(param, "ds_id"):
                param.data = param.data.float()
    return peft_model


def base_parameter_name(peft_name: str) -> str:
    """`base_model.model.model.norm.weight` -> `model.norm.weight` (the base model's key)."""
    prefix = "base_model.model."
    return peft_name[len(prefix):] if peft_name.startswith(prefix) else peft_name
