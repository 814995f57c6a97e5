"""Windows -> notes: aggregating per-window vectors into rows, and setting empty notes aside.

A note is empty when it has no character but whitespace (a job's reason `empty` too), or
when the tokenizer yields no token for it (WordPiece: zero-width spaces, a BOM, control
characters); `tokenize` still gives a note without tokens one window, [CLS][SEP]. The runner's
note-level calls encode only the other notes (`select_notes`) and give each empty note a zero
row, flagged (`EncodeOutput.empty`); nothing here divides by an empty note's zero tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .heads import aggregate_windows
from .limits import body_tokens
from .tokenizer import Windows


def empty_notes(notes: Sequence[str], windows: Windows) -> np.ndarray:
    """bool[notes]: no character but whitespace (a job's reason `empty`), or no token."""
    blank = np.fromiter((not n or n.isspace() for n in notes), bool, count=len(notes))
    return blank | (windows.note_tokens == 0)


def empty_problem(empty: np.ndarray, limit: int = 10) -> str | None:
    """Why `embed` refuses notes where empty bool[notes] is set (the first `limit` named by
    index), or None when none is empty."""
    indices = np.flatnonzero(empty)
    if not len(indices):
        return None
    named = ", ".join(str(int(i)) for i in indices[:limit])
    named += f" and {len(indices) - limit} more" if len(indices) > limit else ""
    return (
        f"notes {named} of {len(empty)} are empty (only whitespace, or no token: zero-width "
        "spaces, control characters): they have no embedding; leave them out, or use "
        "encode(), which flags them in EncodeOutput.empty"
    )


def token_index(bounds: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """bounds int64[W+1], keep bool[W] (or window indices) -> int64[T'] the packed tokens of
    the kept windows (in the order of the indices)."""
    lengths = np.diff(bounds)[keep]  # (w,)
    starts = bounds[:-1][keep] - np.concatenate(([0], np.cumsum(lengths)[:-1]))  # (w,)
    return np.repeat(starts, lengths) + np.arange(int(lengths.sum()), dtype=np.int64)


def select_notes(windows: Windows, keep: np.ndarray) -> Windows:
    """The windows of the notes where keep bool[notes] is set, the notes numbered 0..k-1 in
    order: equal to tokenizing only those notes (so they encode bit for bit as alone)."""
    if keep.all():
        return windows
    kept = keep[windows.note]  # (W,)
    tokens = token_index(windows.bounds, kept)
    renumber = np.cumsum(keep) - 1  # (notes,) old note -> new note
    return Windows(
        ids=windows.ids[tokens],
        token_char=windows.token_char[tokens],
        token_end=windows.token_end[tokens],
        bounds=np.concatenate(([0], np.cumsum(windows.lengths[kept]))).astype(np.int64),
        note=renumber[windows.note[kept]].astype(np.int64),
        window_index=windows.window_index[kept],
        char_start=windows.char_start[kept],
        char_end=windows.char_end[kept],
        note_tokens=windows.note_tokens[keep],
        truncated=windows.truncated[keep],
    )


def fill_rows(keep: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """keep bool[R], rows float32[k, C] (k = keep.sum()) -> float32[R, C], zeros elsewhere."""
    out = np.zeros((len(keep), rows.shape[1]), np.float32)
    out[keep] = rows
    return out


def fill_hidden(
    windows: Windows, kept: np.ndarray, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [N', C] packed over the windows where kept bool[W] is set -> ([N, C] over every
    window, zeros in the others; cu_seqlens int32[W+1])."""
    cu = torch.from_numpy(windows.bounds).to(torch.int32)
    if kept.all():
        return hidden, cu
    full = hidden.new_zeros(int(windows.bounds[-1]), hidden.shape[1])  # (N, C)
    full[torch.from_numpy(token_index(windows.bounds, kept))] = hidden
    return full, cu


def aggregate_rows(windows: Windows, vectors: np.ndarray, how: str, normalize: bool) -> np.ndarray:
    """Per-window vectors [W, C] (window order) -> per note [notes, C] by `how` (with 'none'
    the windows are the rows), L2-normalized when `normalize`. A note without tokens
    (`windows.note_tokens == 0`) gets a zero row, never NaN; the others are unchanged."""
    has_tokens = windows.note_tokens > 0
    if not has_tokens.all():
        kept = has_tokens[windows.note]  # (W,)
        rows = aggregate_rows(select_notes(windows, has_tokens), vectors[kept], how, normalize)
        return fill_rows(kept if how == "none" else has_tokens, rows)
    if how != "none":
        vectors = aggregate_windows(
            vectors, windows.note, windows.window_index, body_tokens(windows.lengths),
            windows.num_notes, how,
        )  # fmt: skip
    if normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.maximum(norms, np.finfo(np.float32).tiny)
    return vectors
