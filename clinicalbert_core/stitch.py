"""A long note's windows stitched back into one token sequence, for per-token heads.

Consecutive windows of a note share `stride` tokens, so a token near a seam is seen by two (or
more) windows. Each token is taken from the window in which it has the most context on both
sides: the smaller of its distances to that window's two edges, where an edge that is the
note's own start or end counts as full context (nothing more could be seen there). Ties go to
the earlier window, so the choice is deterministic. A note that fits one window gets exactly
that window's tokens. All in numpy, over every window of a batch at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .tokenizer import Windows


def stitch(windows: Windows, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(take int64[T'], offsets int64[notes+1]): `take` indexes the packed tokens of
    `windows` (framing tokens never chosen), note after note, each note's tokens in order,
    each from the window where it has the most context; note i's are
    take[offsets[i]:offsets[i+1]]. `step`: tokens between consecutive windows' starts
    (body tokens minus the stride); the windows must be in note order, as tokenized."""
    lengths = windows.lengths
    body = np.maximum(lengths - 2, 0)  # (W,) tokens between the framing tokens
    w = np.repeat(np.arange(windows.num_windows), body)  # (B,) window of each body token
    j = np.arange(len(w)) - np.repeat(np.cumsum(body) - body, body)  # (B,) index in the body
    packed = windows.bounds[w] + 1 + j  # (B,) where it is in the packed tokens
    position = windows.window_index[w].astype(np.int64) * step + j  # (B,) index in the note
    per_note = windows.windows_per_note()
    first = windows.window_index[w] == 0
    last = windows.window_index[w] == per_note[windows.note[w]] - 1
    full = np.iinfo(np.int64).max
    left = np.where(first, full, j)
    right = np.where(last, full, body[w] - 1 - j)
    context = np.minimum(left, right)
    note = windows.note[w]
    order = np.lexsort((w, -context, position, note))  # best window first per token
    note, position = note[order], position[order]
    new = np.ones(len(order), bool)
    new[1:] = (note[1:] != note[:-1]) | (position[1:] != position[:-1])
    take = packed[order[new]]
    counts = np.bincount(note[new], minlength=windows.num_notes)
    return take, np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def owning_window(windows: Windows, take: np.ndarray) -> np.ndarray:
    """int64[len(take)]: the window each stitched token (an index into the packed tokens,
    as `stitch` returns) was taken from."""
    return np.searchsorted(windows.bounds, take, side="right") - 1
