"""`clinicalbert bench`: this encoder vs transformers' BertModel on one mixed-length workload.

Everything runs in one process, side by side, on the same token ids (BERT-base shape, random
weights, lengths spread over 16-512): our packed encoder (fp32; bf16 where the device has bf16
units; int8 on CPU), transformers fp32 unsorted batches of 16 (as a user would run it), fp32
sorted, and its best (bf16 weights, length-sorted). `--peers` adds onnxruntime and CTranslate2,
fp32 and int8 (see jobs/bench/peers.py), on the same length-sorted batches and thread count.
Sides are timed in interleaved rounds (each side once per round, best round per side), so the
ratios are taken side by side. GEMM probes measure the device's peak per precision (fp32, bf16,
int8) so each side's rate can be read as a fraction of what the hardware can do at its
precision. Peak memory is the high-water mark above the pre-run level (CUDA allocator stats, or
sampled RSS on CPU).
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from clinicalbert_core import bert
from clinicalbert_core.device import DTYPES
from clinicalbert_core.quant import int8_supported
from clinicalbert_core.runner import ClinicalBertRunner, RunnerOptions

from .meter import memory_in_subprocess, peak_memory, timed_rounds
from .options import use_bf16
from .probes import bound_fraction, flop_parts, gemm_peaks
from .workload import (
    BERT_BASE,
    SPECIALS,
    hf_side,
    padded_batches,
    specials_tokenizer,
    windows_of,
    workload,
)

# (ours, transformers) pairs whose speed and peak memory ratios are printed and kept
PAIRS = [("ours fp32", "transformers fp32 unsorted"), ("ours fp32", "transformers fp32 sorted"),
         ("ours bf16", "transformers bf16 sorted")]  # fmt: skip


def sides(args: argparse.Namespace, device: torch.device) -> dict[str, tuple[str, Callable]]:
    """name -> (precision, factory) where factory() builds the model and returns its run()."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = bert.Config(**BERT_BASE)
    hf_config = BertConfig(**BERT_BASE)
    hf_config._attn_implementation = "sdpa"
    seqs = workload(args.notes, args.min_len, args.max_len, cfg.vocab_size, seed=0)
    budget = args.batch_tokens or args.hf_batch * args.max_len
    tok = specials_tokenizer()

    def reference() -> Any:
        """transformers' fp32 BertModel with the bench's weights (seeded)."""
        torch.manual_seed(0)
        return BertModel(hf_config, add_pooling_layer=False).eval()

    state = {f"bert.{k}": v for k, v in reference().state_dict().items()}

    def ours(precision: str) -> Callable:
        options = RunnerOptions(device=str(device), precision=precision, max_seq=512,
                                pooling="cls", batch_tokens=budget)  # fmt: skip
        runner = ClinicalBertRunner(cfg, state, tok, SPECIALS, options)
        windows = windows_of(seqs)
        return lambda: runner.encode_windows(windows)

    def theirs(dtype: torch.dtype, sort: bool) -> Callable:
        return hf_side(reference().to(device, dtype), seqs, args.hf_batch, sort, device)

    out: dict[str, tuple[str, Callable]] = {
        "ours fp32": ("fp32", lambda: ours("fp32")),
        "transformers fp32 unsorted": ("fp32", lambda: theirs(torch.float32, False)),
        "transformers fp32 sorted": ("fp32", lambda: theirs(torch.float32, True)),
    }
    if use_bf16(args, device):
        out["ours bf16"] = ("bf16", lambda: ours("bf16"))
        out["transformers bf16 sorted"] = ("bf16", lambda: theirs(torch.bfloat16, True))
    if device.type == "cpu" and "int8" in DTYPES and int8_supported():
        out["ours int8"] = ("int8", lambda: ours("int8"))
    if args.peers:
        from . import peers

        batches = padded_batches(seqs, args.hf_batch, sort=True)
        out |= peers.sides(reference, batches, torch.get_num_threads())
    return out


def target_figures(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets from the rows present: speed ratios (tok/s) of ours vs the best
    peer (any side not ours: transformers, onnxruntime, CTranslate2) per precision and
    overall, int8 vs fp32 ours, and ours fp32's fraction of the fp32 GEMM bound."""

    def best(ours: bool, precision: str | None = None) -> str | None:
        names = [n for n, r in rows.items() if n.startswith("ours ") == ours
                 and precision in (None, r["precision"])]  # fmt: skip
        return max(names, key=lambda n: rows[n]["tok_s"], default=None)

    pairs = {
        "ours int8 / best int8 peer": ("ours int8", best(False, "int8")),
        "ours fp32 / best fp32 peer": ("ours fp32", best(False, "fp32")),
        "ours best / best peer": (best(True), best(False)),
        "ours int8 / ours fp32": ("ours int8", "ours fp32"),
    }
    out: dict[str, dict[str, Any]] = {}
    for label, (a, b) in pairs.items():
        if a in rows and b in rows:
            out[label] = {"ratio": rows[a]["tok_s"] / rows[b]["tok_s"], "sides": [a, b]}
    if "ours fp32" in rows:
        out["ours fp32 of the fp32 GEMM bound"] = {"fraction": rows["ours fp32"]["of_bound"]}
    return out


def run(args: argparse.Namespace, device: torch.device, argv: list[str]) -> dict | None:
    """The BERT comparison: print each side's figures, the ratios and the targets; return the
    figures for --json (None for --memory-of, which prints one side's peak memory only)."""
    table = sides(args, device)
    if args.memory_of:
        print(peak_memory(table[args.memory_of][1](), device))
        return None
    seqs = workload(args.notes, args.min_len, args.max_len, BERT_BASE["vocab_size"], seed=0)
    lengths = np.array([len(s) for s in seqs])
    linear, attn = flop_parts(bert.Config(**BERT_BASE), lengths)
    tokens, work = int(lengths.sum()), linear + attn
    probed = gemm_peaks({p for p, _ in table.values()}, device)
    print(f"bench on {device} ({torch.get_num_threads()} threads): {args.notes} notes, {tokens} tokens "
          f"({lengths.min()}-{lengths.max()}), {work / 1e9:.0f} GFLOP; GEMM peak "
          + ", ".join(f"{p} {rate / 1e9:.0f} G{'OP' if p == 'int8' else 'FLOP'}/s ({kernel})"
                      for p, (rate, kernel) in probed.items()), flush=True)  # fmt: skip
    best = _time_sides(table, device, args.repeats)
    peaks = {p: rate for p, (rate, _) in probed.items()}
    rows: dict[str, dict[str, Any]] = {}
    for name, (precision, factory) in table.items():
        seconds = best[name]
        if device.type == "cuda":
            mem = peak_memory(factory(), device)
        else:
            mem = memory_in_subprocess(name, argv)
        rows[name] = {
            "precision": precision, "tok_s": tokens / seconds, "seconds": seconds,
            "gflops": work / seconds / 1e9,
            "of_bound": bound_fraction(precision, linear, attn, peaks, seconds),
            "peak_mem_mib": mem / 2**20,
        }  # fmt: skip
        r = rows[name]
        print(f"  {name:<28} {r['tok_s']:>9.0f} tok/s {r['gflops']:>9.1f} GFLOP/s "
              f"({100 * r['of_bound']:3.0f}% of the {precision} GEMM bound)  "
              f"peak mem {r['peak_mem_mib']:7.0f} MiB", flush=True)  # fmt: skip
    ratios, memory = _pair_ratios(rows)
    if not use_bf16(args, device):
        print("  bf16 skipped: this device has no bf16 matrix units (bf16 would be emulated)")
    targets = target_figures(rows)
    _print_targets(targets)
    return {"device": str(device), "threads": torch.get_num_threads(), "tokens": tokens,
            "gflop": work / 1e9, "gflop_linear": linear / 1e9, "gflop_attention": attn / 1e9,
            "gemm_peak": {p: {"gflops": rate / 1e9, "kernel": kernel}
                          for p, (rate, kernel) in probed.items()},
            "rows": rows, "speed_ratios": ratios,
            "memory_ratios": memory, "targets": targets}  # fmt: skip


def _time_sides(
    table: dict[str, tuple[str, Callable]], device: torch.device, repeats: int
) -> dict[str, float]:
    """Build every side, then name -> best seconds over `repeats` interleaved rounds."""
    runs = {}
    for name, (_, factory) in table.items():
        t0 = time.perf_counter()
        runs[name] = factory()
        print(f"  built {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"timing {len(runs)} sides in {repeats} interleaved rounds after a warm-up ...",
          flush=True)  # fmt: skip
    best = timed_rounds(runs, device, repeats)
    del runs
    gc.collect()
    return best


def _pair_ratios(rows: dict[str, dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Print and return the speed and peak memory ratios of the PAIRS present."""
    ratios, memory = {}, {}
    for a, b in PAIRS:
        if a in rows and b in rows:
            ratios[f"{a} / {b}"] = rows[a]["tok_s"] / rows[b]["tok_s"]
            memory[f"{a} / {b}"] = rows[a]["peak_mem_mib"] / max(rows[b]["peak_mem_mib"], 1e-9)
            print(f"  speed {a} / {b}: {ratios[f'{a} / {b}']:.2f}x   "
                  f"peak memory: {memory[f'{a} / {b}']:.2f}x")  # fmt: skip
    return ratios, memory


def _print_targets(targets: dict[str, dict[str, Any]]) -> None:
    print("targets:")
    for label, t in targets.items():
        if "ratio" in t:
            print(f"  {label:<34} {t['ratio']:6.2f}x  ({t['sides'][0]} / {t['sides'][1]})")
        else:
            print(f"  {label:<34} {100 * t['fraction']:5.0f}%")
