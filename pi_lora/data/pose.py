"""PoSE (Zhu et al., ICLR 2024): train at `seq_len`, teach positions up to the target window.

Each training row of n tokens is cut into `chunks` pieces at random points; every piece keeps
its tokens in order but its position ids are shifted by a skip, so the row's positions jump
ahead. Skips follow the paper: the first piece starts at 0 (as a real document does), piece i
starts u_i later with u_i drawn uniformly from [u_(i-1), target - n]. The last position is
then at most target - 1, and over many rows every relative distance up to target - 1 occurs,
while the step's compute and memory are those of n tokens.

The draw is seeded by the recipe seed and the row's own tokens, so it is the same in every
process, after a resume and in the validation loss, whatever order the rows come in.

Position ids that jump would read as document boundaries to transformers' packed-sequence
detection (it starts a new sequence wherever ids do not step by one) and to FlashAttention's
variable-length path, splitting the row into pieces that cannot see each other. Rows with
PoSE positions therefore always carry an explicit attention mask, which turns that detection
off; an all-ones mask costs nothing (sdpa and S2-Attn still run their causal path).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from pi_lora.recipe.loading import Recipe


@dataclass(frozen=True)
class PoseSkips:
    """How a collator draws PoSE positions: the window to cover, the pieces, the seed."""

    target_context: int
    chunks: int
    seed: int
    seq_len: int  # rows of this length get skips; shorter ones (short_mix) keep 0..n-1

    def positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position ids for one row (1-D), plain when the row is not a full training row."""
        n = int(tokens.numel())
        if n != self.seq_len:
            return torch.arange(n)
        rng = np.random.default_rng([self.seed, n, _row_digest(tokens)])
        return torch.from_numpy(skip_positions(n, self.target_context, self.chunks, rng))


def pose_skips(recipe: Recipe) -> PoseSkips | None:
    """The recipe's PoSE setting for the collator; None when the recipe trains plainly."""
    if recipe.data.pose is None:
        return None
    return PoseSkips(target_context=recipe.rope.target_context, chunks=recipe.data.pose.chunks,
                     seed=recipe.training.seed, seq_len=recipe.seq_len)


def _row_digest(tokens: torch.Tensor) -> int:
    return zlib.crc32(tokens.to(torch.int64).numpy().tobytes())


def skip_positions(n: int, target_context: int, chunks: int, rng: np.random.Generator) -> np.ndarray:
    """Increasing position ids for n tokens in `chunks` pieces, the last below target_context."""
    if not 1 <= chunks <= n:
        raise ValueError(f"PoSE needs 1 <= chunks <= tokens, got {chunks} chunks of {n} tokens")
    budget = target_context - n
    if budget < 0:
        raise ValueError(f"a row of {n} tokens does not fit the target window {target_context}")
    cuts = np.sort(rng.choice(np.arange(1, n), size=chunks - 1, replace=False)) if chunks > 1 \
        else np.empty(0, dtype=np.int64)
    skips = np.zeros(chunks, dtype=np.int64)
    for i in range(1, chunks):  # u_i ~ U[u_(i-1), budget]
        skips[i] = rng.integers(skips[i - 1], budget + 1)
    piece = np.zeros(n, dtype=np.int64)
    piece[cuts] = 1
    return np.arange(n, dtype=np.int64) + skips[np.cumsum(piece)]
