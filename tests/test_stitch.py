"""Long notes for token classification: windows stitched back into each note's tokens, each
token from the window where it has the most context; notes that fit one window unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from clinicalbert_core.stitch import owning_window, stitch
from clinicalbert_core.tokenizer import NoteTokenizer
from jobs.synthetic import make_bpe_tokenizer, make_notes


@pytest.fixture(scope="module")
def tok():
    return make_bpe_tokenizer()


@pytest.mark.parametrize(("max_seq", "stride"), [(16, 4), (24, 11), (32, 0), (40, 19)])
def test_every_token_once_in_order_from_its_best_window(tok, max_seq, stride):
    notes = make_notes(6, seed=3, min_words=1, max_words=120)
    windowed = NoteTokenizer(tok, max_seq, "windows", stride)
    whole = NoteTokenizer(tok, 100_000, "truncate")
    w, ref = windowed(notes), whole(notes)
    take, offsets = stitch(w, windowed.step)
    assert (w.token_char[take] >= 0).all()  # never a framing token
    for i in range(len(notes)):
        mine = take[offsets[i] : offsets[i + 1]]
        body = ref.ids[ref.bounds[i] + 1 : ref.bounds[i + 1] - 1]  # the note in one piece
        np.testing.assert_array_equal(w.ids[mine], body)
        np.testing.assert_array_equal(
            w.token_char[mine], ref.token_char[ref.bounds[i] + 1 : ref.bounds[i + 1] - 1]
        )
        # each token's window gives it at least as much context as any other window holding it
        owner = owning_window(w, mine)
        for k, (t, o) in enumerate(zip(mine, owner)):
            best = _context(w, o, t - w.bounds[o] - 1)
            for other in np.flatnonzero(w.note == i):
                j = k - int(w.window_index[other]) * windowed.step
                if 0 <= j < w.lengths[other] - 2:
                    assert best >= _context(w, other, j)


def _context(w, window: int, j: int) -> float:
    body = int(w.lengths[window]) - 2
    last = w.window_index[window] == w.windows_per_note()[w.note[window]] - 1
    left = np.inf if w.window_index[window] == 0 else j
    right = np.inf if last else body - 1 - j
    return min(left, right)


def test_a_note_that_fits_one_window_is_that_window(tok):
    notes = make_notes(5, seed=8, min_words=1, max_words=10)
    nt = NoteTokenizer(tok, 128, "windows", 32)
    w = nt(notes)
    assert (w.windows_per_note() == 1).all()
    take, offsets = stitch(w, nt.step)
    body = np.concatenate([np.arange(w.bounds[i] + 1, w.bounds[i + 1] - 1) for i in range(5)])
    np.testing.assert_array_equal(take, body)
    np.testing.assert_array_equal(np.diff(offsets), w.lengths - 2)


@pytest.mark.parametrize("stride", [4, 5])
def test_seams_take_the_nearer_middle_and_ties_the_earlier_window(tok, stride):
    """Two windows of 10 body tokens, step 6 (stride 4): note tokens 6..9 are in both. Their
    context (tokens to the nearer edge that is not the note's own) is 3, 2, 1, 0 in window 0
    and 0, 1, 2, 3 in window 1: 6 and 7 come from window 0, 8 and 9 from window 1. With
    stride 5 (step 5), tokens 5..9 have 4..0 and 0..4: token 7 ties (2 and 2) and goes to
    the earlier window, so the split is the same."""
    note = " ".join(["word"] * 16)
    nt = NoteTokenizer(tok, 12, "windows", stride)
    w = nt([note])
    assert w.num_windows >= 2 and (w.lengths[:2] == 12).all()
    take, _ = stitch(w, nt.step)
    owner = owning_window(w, take)
    assert owner[:10].tolist() == [0] * 8 + [1, 1]
