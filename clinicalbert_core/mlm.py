"""The masked-LM head's rows: top-k predictions at chosen token positions of a packed batch
(`mlm_rows`), gathered over batches (`concat_mlm`), and as the runner's `mlm()` hands them
out per note (`MlmPrediction`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .packing import PackedBatch


@dataclass
class MlmRows:
    """Top-k predictions at selected token positions, one row per position."""

    window: np.ndarray  # int64[M] window of each row
    position: np.ndarray  # int32[M] token position inside the window
    top_ids: np.ndarray  # int64[M, k]
    top_logprobs: np.ndarray  # float32[M, k]
    logits: np.ndarray | None = None  # float32[M, V] when asked for


@dataclass
class MlmPrediction:
    note: int
    window: int
    position: int  # token position in the window
    char_start: int  # in the note
    ids: list[int]
    tokens: list[str]
    log_probs: list[float]


def mlm_rows(
    hidden: torch.Tensor,
    batch: PackedBatch,
    ids: np.ndarray,
    chosen: np.ndarray,
    positions: str,
    top_k: int,
    return_logits: bool,
    mask_id: int | None,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
) -> MlmRows:
    """The rows of `batch` (packed `ids`, windows `chosen`) at its [MASK] tokens (`positions`
    'mask') or every token ('all'); `logits_of(hidden rows)` is the head where it runs."""
    if positions == "mask":
        if mask_id is None:
            raise ValueError(
                "the tokenizer has no mask token, so there are no masked positions to "
                "predict; use mlm positions 'all'"
            )
        rows = np.flatnonzero(ids == mask_id)
    elif positions == "all":
        rows = np.arange(len(ids))
    else:
        raise ValueError(f"mlm positions must be 'mask' or 'all', got {positions!r}")
    cu = batch.cu_seqlens.numpy()
    seq = np.searchsorted(cu, rows, side="right") - 1  # sequence of each row
    logits = logits_of(hidden.index_select(0, torch.from_numpy(rows).to(hidden.device)))
    logprobs = torch.log_softmax(logits, dim=-1)
    k = min(top_k, logprobs.shape[1])
    top = logprobs.topk(k, dim=-1)
    return MlmRows(
        window=chosen[seq].astype(np.int64),
        position=(rows - cu[seq]).astype(np.int32),
        top_ids=top.indices.cpu().numpy(),
        top_logprobs=top.values.cpu().numpy().astype(np.float32),
        logits=logits.cpu().numpy() if return_logits else None,
    )


def concat_mlm(parts: list[MlmRows]) -> MlmRows:
    logits = [p.logits for p in parts]
    return MlmRows(
        window=np.concatenate([p.window for p in parts]),
        position=np.concatenate([p.position for p in parts]),
        top_ids=np.concatenate([p.top_ids for p in parts]),
        top_logprobs=np.concatenate([p.top_logprobs for p in parts]),
        logits=None if any(x is None for x in logits) else np.concatenate(logits),
    )
