"""`clinicalbert bench --arch modernbert`: this encoder vs transformers' ModernBertModel,
ModernBERT-base shape, on mixed clinical lengths (64-2,048 tokens) and single long notes."""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from clinicalbert_core.device import DTYPES
from clinicalbert_core.runner import ClinicalBertRunner, RunnerOptions

from .meter import memory_in_subprocess, peak_memory, timed_rounds
from .options import use_bf16
from .workload import SPECIALS, hf_side, windows_of, workload

MODERNBERT_BASE = dict(vocab_size=50368, hidden_size=768, num_hidden_layers=22,
                       num_attention_heads=12, intermediate_size=1152, local_attention=128,
                       global_attn_every_n_layers=3, max_position_embeddings=8192)  # fmt: skip


def modernbert_sides(args: argparse.Namespace, device: torch.device, precision: str) -> dict:
    """name -> factory(seqs) -> run(), ModernBERT-base shape, same random weights both sides."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import ModernBertConfig, ModernBertModel

    from clinicalbert_core import modernbert

    hf_config = ModernBertConfig(**MODERNBERT_BASE)
    hf_config._attn_implementation = "sdpa"  # the best transformers has here (no flash-attn)
    torch.manual_seed(0)
    hf = ModernBertModel(hf_config).eval()
    state = hf.state_dict()
    cfg = modernbert.Config.from_dict(hf_config.to_dict())
    tok = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    budget = args.batch_tokens or 8192
    dtype = DTYPES[precision]

    def ours(seqs: list[np.ndarray]) -> Callable:
        options = RunnerOptions(device=str(device), precision=precision, max_seq=8192,
                                pooling="mean", batch_tokens=max(budget, 8192))  # fmt: skip
        runner = ClinicalBertRunner(cfg, state, tok, SPECIALS, options)
        windows = windows_of(seqs)
        return lambda: runner.encode_windows(windows)

    def theirs(seqs: list[np.ndarray]) -> Callable:
        model = hf.to(device, dtype)
        batch = max(1, budget // max(len(s) for s in seqs))
        return hf_side(model, seqs, batch, True, device)

    return {"ours": ours, "transformers sorted": theirs}


def modernbert_bench(
    args: argparse.Namespace, device: torch.device, argv: list[str]
) -> dict | None:
    """Mixed clinical lengths (64-2,048) and single notes of 512 / 2,048 / 8,192 tokens.

    Returns the figures for --json; None for --memory-of (one side's peak memory, printed)."""
    precision = "bf16" if use_bf16(args, device) else "fp32"
    table = modernbert_sides(args, device, precision)
    v = MODERNBERT_BASE["vocab_size"]
    workloads = {
        "mixed": workload(args.notes, 64, 2048, v, seed=0),
        **{f"one note {n}": workload(1, n, n, v, seed=n) for n in args.single_lengths},
    }
    if args.memory_of:
        work, side = args.memory_of.split("|")
        print(peak_memory(table[side](workloads[work]), device))
        return None
    print(f"ModernBERT-base shape on {device}, {precision}, {torch.get_num_threads()} threads; "
          "vs transformers ModernBertModel (SDPA, length-sorted batches)", flush=True)  # fmt: skip
    out: dict[str, Any] = {"device": str(device), "precision": precision, "rows": {}}
    for work, seqs in workloads.items():
        out["rows"][work] = _row(args, device, argv, table, work, seqs)
    return out


def _row(args: argparse.Namespace, device: torch.device, argv: list[str], table: dict,
         work: str, seqs: list[np.ndarray]) -> dict[str, Any]:  # fmt: skip
    """Both sides on one workload: time (interleaved rounds), peak memory, ratios; printed."""
    tokens = sum(len(s) for s in seqs)
    runs = {side: factory(seqs) for side, factory in table.items()}
    best = timed_rounds(runs, device, args.repeats)
    del runs
    gc.collect()
    row = {}
    for side in table:
        if device.type == "cuda":
            mem = peak_memory(table[side](seqs), device)
        else:
            mem = memory_in_subprocess(f"{work}|{side}", argv)
        row[side] = {"seconds": best[side], "tok_s": tokens / best[side],
                     "peak_mem_mib": mem / 2**20}  # fmt: skip
    a, b = row["ours"], row["transformers sorted"]
    row["speed_ratio"], row["memory_ratio"] = (
        b["seconds"] / a["seconds"],
        (a["peak_mem_mib"] / max(b["peak_mem_mib"], 1e-9)),
    )
    print(f"  {work:<16} {tokens:>7} tokens  ours {a['seconds']:8.3f} s {a['tok_s']:>9.0f} tok/s "
          f"{a['peak_mem_mib']:7.0f} MiB | transformers {b['seconds']:8.3f} s "
          f"{b['tok_s']:>9.0f} tok/s {b['peak_mem_mib']:7.0f} MiB | speed "
          f"{row['speed_ratio']:.2f}x, memory {row['memory_ratio']:.2f}x", flush=True)  # fmt: skip
    return row
