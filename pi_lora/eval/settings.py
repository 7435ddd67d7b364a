"""`EvalSettings`: the whole eval protocol, every default of `pi-lora eval` in one place.

Its own module so that the runner (which measures) and the report (which writes the protocol
down) both read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pi_lora.recipe.loading import MAX_CONTEXT, DatasetSource

PplMode = Literal["sliding", "whole-window"]  # pi_lora.eval.perplexity's two scorings
# finite and bounded, as a recipe's numbers are: a typo must not start a week-long sweep
Length = Annotated[int, Field(ge=1, le=MAX_CONTEXT)]
Count = Annotated[int, Field(ge=1, le=1_000_000)]


class EvalSettings(BaseModel):
    """The whole protocol: every default of `pi-lora eval` lives here, and all of it is
    written to the report."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    passkey: bool = True
    passkey_lengths: list[Length] = [1024, 2048, 4096, 8192]
    passkey_depths: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0]
    # per (length, depth): 5 depths x 2 = 10 per length (PI)
    passkey_trials: Annotated[int, Field(ge=1, le=10_000)] = 2
    seed: int = Field(0, ge=0, le=2**32 - 1)
    k_max_threshold: float = Field(0.2, gt=0.0, le=1.0)
    max_new_tokens: Count = 12
    perplexity: bool = True
    ppl_lengths: list[Length] = [2048, 4096, 8192]
    ppl_stride: Length = 256
    ppl_mode: PplMode = "sliding"
    documents: list[Path] = []
    # a `datasets` split read as perplexity documents, one row = one document; the same
    # source type a recipe's `data.dataset` uses, so both name a split the same way
    dataset: DatasetSource | None = None
    dataset_text_field: str = "text"
    dataset_max_documents: Count | None = 1  # None = every row of the split
    ppl_max_windows: Count | None = 16  # per length; None = the whole text
    ppl_max_tokens: Annotated[int, Field(ge=1, le=10**12)] | None = None  # scored tokens per length
    ppl_span_tokens: Length | None = None  # every length scores the same first N tokens
    chunk_tokens: Length = 1024  # lm_head rows per chunk when scoring
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 where computed natively
    device: str = "auto"  # auto: cuda if available, else cpu
    progress: bool = True

    @field_validator("passkey_lengths", "ppl_lengths")
    @classmethod
    def _sorted_unique(cls, lengths: list[int]) -> list[int]:
        return sorted(set(lengths))

    @field_validator("passkey_depths")
    @classmethod
    def _depths_in_range(cls, depths: list[float]) -> list[float]:
        if any(not 0.0 <= d <= 1.0 for d in depths):
            raise ValueError(f"depths are fractions of the filler in [0, 1], got {depths}")
        return sorted(set(depths))

    @field_validator("dataset")
    @classmethod
    def _dataset_split_named(cls, source: DatasetSource | None) -> DatasetSource | None:
        # DatasetSource's split defaults to "train" (right for a recipe); scoring perplexity
        # on a training split by accident would flatter a model, so eval wants it named
        if source is not None and "split" not in source.model_fields_set:
            raise ValueError(f"name the split of dataset {source.name} to score (e.g. split: test)")
        return source

    @model_validator(mode="after")
    def _perplexity_inputs(self) -> EvalSettings:
        # no documents and no dataset: the runner scores the shipped held-out plays
        sliding = self.perplexity and self.ppl_mode == "sliding"
        shortest = min(self.ppl_lengths, default=self.ppl_stride)
        if "ppl_stride" not in self.model_fields_set and self.ppl_stride > shortest:
            self.ppl_stride = max(1, shortest // 2)  # the default: 256, or half a shorter window
        if sliding and self.ppl_stride > min(self.ppl_lengths, default=self.ppl_stride):
            raise ValueError(f"--stride {self.ppl_stride} is longer than the shortest "
                             f"--ppl-lengths window ({shortest}): windows would skip tokens")
        return self


@dataclass(frozen=True)
class EvalFlag:
    """One `pi-lora eval` option, declared once: the EvalSettings field it sets, its flag, its
    help, and how its text is read. The parser and the error messages are built from these;
    the default shown in --help is the field's own."""

    flag: str
    help: str
    kind: Literal["int", "float", "str", "lengths", "fractions", "paths", "off", "choice"] = "str"


FLAGS: dict[str, EvalFlag] = {
    "passkey_lengths": EvalFlag("--passkey-lengths", "passkey prompt lengths, a comma list "
                                "such as 1k,2k,4k,8k (default: each target's original "
                                "window, half its extended window and the extended window)",
                                "lengths"),
    "passkey_depths": EvalFlag("--depths", "key depths as fractions of the filler, a comma "
                               "list such as 0,0.5,1", "fractions"),
    "passkey_trials": EvalFlag("--trials", "trials per (length, depth), each a new key", "int"),
    "seed": EvalFlag("--seed", "seed of the keys and of the filler draws", "int"),
    "k_max_threshold": EvalFlag("--k-max-threshold", "success rate every length up to k_max "
                                "reaches (the PI paper: 0.2)", "float"),
    "ppl_lengths": EvalFlag("--ppl-lengths", "perplexity window lengths, a comma list such as "
                            "2k,4k,8k,16k (default: as --passkey-lengths)", "lengths"),
    "ppl_stride": EvalFlag("--stride", "sliding-window stride in tokens (or half the shortest "
                           "length when that is under 256)", "int"),
    "ppl_mode": EvalFlag("--ppl-mode", "sliding (Press et al.: only new tokens scored) or "
                         "whole-window (LongLoRA's script)", "choice"),
    "documents": EvalFlag("--docs", "text file or directory for perplexity (repeatable; "
                          "default: the held-out Shakespeare plays pi-lora ships)", "paths"),
    "ppl_max_windows": EvalFlag("--max-windows", "windows per length (bounds the cost)", "int"),
    "dtype": EvalFlag("--dtype", "auto: bf16 on GPUs and CPUs that compute it natively, else "
                      "fp32", "choice"),
    "device": EvalFlag("--device", "cuda, cuda:N or cpu; auto: cuda when there is one"),
    "passkey": EvalFlag("--no-passkey", "skip passkey retrieval", "off"),
    "perplexity": EvalFlag("--no-ppl", "skip perplexity", "off"),
}
