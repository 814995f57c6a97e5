"""`clinicalbert bench --mlm-placement`: the MLM head in the encoder's graph vs on the host,
timed by batch size (the numbers `clinicalbert_core`'s `auto` placement follows)."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from clinicalbert_core import bert
from clinicalbert_core.runner import ClinicalBertRunner, RunnerOptions

from .meter import timed
from .workload import BERT_BASE, SPECIALS, specials_tokenizer, windows_of


def mlm_placement(args: argparse.Namespace, device: torch.device) -> dict[str, dict[int, float]]:
    """Seconds per batch of the MLM head in_graph vs on the host, by batch size (sequences).

    Each sequence is 128 tokens with 15% of them masked (BERT's rate), BERT-base vocab.
    """
    cfg = bert.Config(**BERT_BASE)
    rng = np.random.default_rng(0)
    v = cfg.vocab_size
    state = _mlm_state(cfg.hidden_size, v)
    tok = specials_tokenizer()
    out: dict[str, dict[int, float]] = {}
    for mode in ("in_graph", "cpu"):
        options = RunnerOptions(device=str(device), max_seq=512, pooling="cls", mlm=True,
                                mlm_mode=mode, batch_tokens=1 << 20)  # fmt: skip
        runner = ClinicalBertRunner(cfg, state, tok, SPECIALS, options)
        out[mode] = {}
        for b in args.mlm_batches:
            seqs = [
                np.concatenate(([101], rng.integers(1000, v, size=126), [102])) for _ in range(b)
            ]
            for s in seqs:
                s[1:-1][rng.random(126) < 0.15] = 4  # [MASK] id in this WordLevel vocab
            windows = windows_of(seqs)
            out[mode][b] = timed(
                lambda w=windows, r=runner: r.encode_windows(w, top_k=5), device, 3
            )
        del runner
    print(f"MLM head placement on {device} (seconds per batch of 128-token sequences, 15% masked):")
    print(f"  {'batch':>6} {'in_graph':>10} {'cpu':>10}  faster")
    for b in args.mlm_batches:
        a, h = out["in_graph"][b], out["cpu"][b]
        print(f"  {b:>6} {a:>10.4f} {h:>10.4f}  {'in_graph' if a <= h else 'cpu'}")
    return out


def _mlm_state(c: int, v: int) -> dict[str, torch.Tensor]:
    """A BERT-base checkpoint's state with an MLM head: random encoder (seeded), hidden `c`,
    vocab `v`."""
    from transformers import BertConfig, BertModel

    state = {
        "cls.predictions.transform.dense.weight": torch.randn(c, c) * 0.02,
        "cls.predictions.transform.dense.bias": torch.zeros(c),
        "cls.predictions.transform.LayerNorm.weight": torch.ones(c),
        "cls.predictions.transform.LayerNorm.bias": torch.zeros(c),
        "cls.predictions.bias": torch.zeros(v),
    }
    torch.manual_seed(0)
    base = BertModel(BertConfig(**BERT_BASE), add_pooling_layer=False).state_dict()
    return state | {f"bert.{k}": t for k, t in base.items()}
