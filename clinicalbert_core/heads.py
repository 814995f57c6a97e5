"""Heads on packed hidden states: pooling, the masked-LM head, window aggregation."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

POOLINGS = ("cls", "mean", "pooler")
AGGREGATES = ("mean", "first", "none")


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens[B+1] -> int64[N]: the sequence each packed token belongs to."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def pool(
    hidden: torch.Tensor, cu_seqlens: torch.Tensor, how: str, pooler: nn.Module | None = None
) -> torch.Tensor:
    """hidden[N, C] packed -> [B, C] one vector per sequence."""
    starts = cu_seqlens[:-1].long()
    if how == "cls":
        return hidden[starts]  # (B, C) the [CLS] token
    if how == "pooler":
        assert pooler is not None, "pooling='pooler' needs the pooler head"
        return pooler(hidden[starts])
    if how == "mean":  # every real token of the sequence ([CLS]/[SEP] included, like HF)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).float()
        sums = hidden.new_zeros(len(starts), hidden.shape[1], dtype=torch.float32)
        sums.index_add_(0, segment_ids(cu_seqlens), hidden.float())  # (B, C) summed in fp32
        return sums / lengths[:, None]
    raise ValueError(f"unknown pooling {how!r}; expected one of {POOLINGS}")


class PredictionHead(nn.Module):
    """dense(C->C) + act + LayerNorm: the transform before an MLM decoder or a classifier."""

    def __init__(
        self,
        hidden: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        eps: float,
        *,
        dense_bias: bool = True,
        norm_bias: bool = True,
    ):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden, bias=dense_bias)
        self.act = act
        self.norm = nn.LayerNorm(hidden, eps=eps, bias=norm_bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(rows)))  # (M, C)


class MlmHead(PredictionHead):
    """The prediction head + decoder(C->V), on selected rows only. The decoder's weight is
    tied to the token embeddings at load when the checkpoint has none."""

    def __init__(
        self,
        hidden: int,
        vocab: int,
        act: Callable[[torch.Tensor], torch.Tensor],
        eps: float,
        *,
        dense_bias: bool = True,
        norm_bias: bool = True,
        decoder_bias: bool = True,
    ):
        super().__init__(hidden, act, eps, dense_bias=dense_bias, norm_bias=norm_bias)
        self.decoder = nn.Linear(hidden, vocab, bias=decoder_bias)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.decoder(super().forward(rows))  # (M, V) logits


def aggregate_windows(
    vectors: np.ndarray,
    note: np.ndarray,
    window_index: np.ndarray,
    n_tokens: np.ndarray,
    num_notes: int,
    how: str,
) -> np.ndarray:
    """Per-window vectors [W, C] -> per-note vectors [num_notes, C] float32.

    Windows may come in any order (they are batched by length, across notes): `note[W]` says
    which note each belongs to, `window_index[W]` its place in the note, `n_tokens[W]` its size.
    `mean` weighs each window by its token count; `first` keeps window 0.
    """
    if how == "first":
        out = np.zeros((num_notes, vectors.shape[1]), dtype=np.float32)
        first = window_index == 0
        out[note[first]] = vectors[first]
        return out
    if how == "mean":
        sums = np.zeros((num_notes, vectors.shape[1]), dtype=np.float64)
        np.add.at(sums, note, vectors.astype(np.float64) * n_tokens[:, None])
        total = np.bincount(note, weights=n_tokens, minlength=num_notes)
        return (sums / total[:, None]).astype(np.float32)
    raise ValueError(f"unknown window aggregate {how!r}; expected 'mean' or 'first'")
