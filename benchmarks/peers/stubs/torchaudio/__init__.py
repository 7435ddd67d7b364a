"""Stand-in for torchaudio in the LLaMA-Factory venv (benchmarks/peers only).

LLaMA-Factory 0.9.5 imports torchaudio at start-up for its audio plugin; a text-only run never
calls it. PyPI's torchaudio (<= 2.11.1) is built against CUDA torch and fails to load next to
the CPU torch 2.13 wheel, and there is no newer one, so the benchmark puts this module on that
venv's path. Any use raises.
"""

__version__ = "0.0+stub"


def __getattr__(name: str):
    raise ImportError(f"torchaudio.{name}: torchaudio is a stub in this benchmark venv")
