"""What every side runs on: the same token ids (BERT-base shape unless a bench says otherwise),
as our runner's `Windows` and as transformers' padded batches, and transformers' side itself."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from clinicalbert_core.limits import body_tokens
from clinicalbert_core.tokenizer import Specials, Windows

BERT_BASE = dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)  # fmt: skip

# the workload's ids: BERT's [CLS]/[SEP] and a [MASK] id inside the small WordLevel vocab
SPECIALS = Specials(cls=101, sep=102, mask=4)


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[np.ndarray]:
    """`n` id sequences ([CLS] ... [SEP]) with lengths uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    return [
        np.concatenate(([101], rng.integers(1000, vocab, size=body_tokens(ln)), [102]))
        for ln in lengths
    ]


def windows_of(seqs: list[np.ndarray]) -> Windows:
    lengths = np.array([len(s) for s in seqs])
    n = len(seqs)
    return Windows(
        ids=np.concatenate(seqs).astype(np.int32),
        token_char=np.zeros(int(lengths.sum()), np.int32),
        token_end=np.zeros(int(lengths.sum()), np.int32),
        bounds=np.concatenate(([0], np.cumsum(lengths))),
        note=np.arange(n), window_index=np.zeros(n, np.int32),
        char_start=np.zeros(n, np.int64), char_end=np.zeros(n, np.int64),
        note_tokens=body_tokens(lengths), truncated=np.zeros(n, bool),
    )  # fmt: skip


def specials_tokenizer() -> Any:
    """A WordLevel tokenizer of BERT's five special tokens: the runner needs one, but the
    bench feeds it token ids directly."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return Tokenizer(WordLevel({t: i for i, t in enumerate(specials)}, unk_token="[UNK]"))


def padded_batches(
    seqs: list[np.ndarray], batch: int, sort: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`batch` sequences at a time (longest first when `sort`), each batch padded to its
    longest: ids int64 (B, T) and attention mask int64 (B, T), 1 on real tokens."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i])) if sort else range(len(seqs))
    order = list(order)
    out = []
    for s in range(0, len(order), batch):
        chunk = [seqs[i] for i in order[s : s + batch]]
        ids = np.zeros((len(chunk), max(len(x) for x in chunk)), np.int64)
        mask = np.zeros_like(ids)
        for j, x in enumerate(chunk):
            ids[j, : len(x)], mask[j, : len(x)] = x, 1
        out.append((ids, mask))
    return out


def hf_side(
    model: Any, seqs: list[np.ndarray], batch: int, sort: bool, device: torch.device
) -> Callable[[], None]:
    """run(): transformers' `model` over `seqs` in padded batches of `batch` sequences."""
    batches = padded_batches(seqs, batch, sort)

    def run() -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                model(input_ids=torch.from_numpy(ids).to(device),
                      attention_mask=torch.from_numpy(mask).to(device))  # fmt: skip

    return run
