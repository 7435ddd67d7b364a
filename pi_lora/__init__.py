"""pi-lora: extend the context window of RoPE language models with Position Interpolation + LoRA."""

__version__ = "0.1.0"
