"""`clinicalbert bench`: this encoder vs transformers' BertModel on one mixed-length workload.

Everything runs in one process, side by side, on the same token ids (BERT-base shape, random
weights, lengths spread over 16-512): our packed encoder (fp32; bf16 where the device has bf16
units; int8 on CPU), transformers fp32 unsorted batches of 16 (as a user would run it), fp32
sorted, and its best (bf16 weights, length-sorted). `--peers` adds onnxruntime and CTranslate2,
fp32 and int8 (see jobs/peers.py), on the same length-sorted batches and thread count. Sides
are timed in interleaved rounds (each side once per round, best round per side), so the ratios
are taken side by side. GEMM probes measure the device's peak per precision (fp32, bf16, int8)
so each side's rate can be read as a fraction of what the hardware can do at its precision.
Peak memory is the high-water mark above the pre-run level (CUDA allocator stats, or sampled
RSS on CPU).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from clinicalbert_core import bert
from clinicalbert_core.config import EncoderConfig
from clinicalbert_core.quant import int8_supported
from clinicalbert_core.runner import (
    DTYPES,
    ClinicalBertRunner,
    RunnerOptions,
    check_device,
    cpu_has_bf16,
)
from clinicalbert_core.tokenizer import Specials, Windows

from .bench_memory import at_least
from .peers import MODULES as PEER_MODULES

BERT_BASE = dict(vocab_size=28996, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)  # fmt: skip


def workload(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[np.ndarray]:
    """`n` id sequences ([CLS] ... [SEP]) with lengths uniform in [lo, hi]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=n)
    return [
        np.concatenate(([101], rng.integers(1000, vocab, size=ln - 2), [102])) for ln in lengths
    ]


def windows_of(seqs: list[np.ndarray]) -> Windows:
    lengths = np.array([len(s) for s in seqs])
    n = len(seqs)
    return Windows(
        ids=np.concatenate(seqs).astype(np.int32),
        token_char=np.zeros(int(lengths.sum()), np.int32),
        bounds=np.concatenate(([0], np.cumsum(lengths))),
        note=np.arange(n), window_index=np.zeros(n, np.int32),
        char_start=np.zeros(n, np.int64), char_end=np.zeros(n, np.int64),
        note_tokens=lengths - 2, truncated=np.zeros(n, bool),
    )  # fmt: skip


# the workload's ids: BERT's [CLS]/[SEP] and a [MASK] id inside the small WordLevel vocab
SPECIALS = Specials(cls=101, sep=102, mask=4)


def flop_parts(cfg: EncoderConfig, lengths: np.ndarray) -> tuple[float, float]:
    """Forward FLOPs of the encoder on these sequence lengths (no padding counted):
    (linear layers, attention's two matmuls)."""
    c, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    linear = 2 * (4 * c * c + 2 * c * i) * layers * lengths.sum()
    attn = 4 * layers * c * (lengths.astype(np.float64) ** 2).sum()
    return float(linear), float(attn)


def _encoder_shapes(rows: int) -> list[tuple[int, int, int]]:
    """The encoder's GEMMs as (m, k, n): rows x C -> 3C (QKV), C -> I, I -> C."""
    c, i = BERT_BASE["hidden_size"], BERT_BASE["intermediate_size"]
    return [(rows, c, 3 * c), (rows, c, i), (rows, i, c)]


def _rate(call: Callable[[], Any], flop: float, device: torch.device, seconds: float) -> float:
    """FLOP/s of `call` (doing `flop` operations) over `seconds`, after one warm-up call."""
    call()
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        reps += 1
        _sync(device)
    return flop * reps / (time.perf_counter() - t0)


def _gemm_calls(device: torch.device, precision: str) -> Iterator[tuple[str, int, Callable]]:
    """(kernel, operations, call) for every kernel and shape the `precision` probe times.

    fp32 / bf16: `torch.matmul` on square and encoder shapes (one shape alone misleads: on some
    CPUs a 2048^3 fp32 matmul runs at 2/3 of a 4096^3 one) and, on CPU, oneDNN's linear on
    prepacked weights (`torch.ops.mkldnn._linear_pointwise`): on AMD CPUs `torch.matmul` fp32
    takes MKL's AVX2 path, at less than half of what oneDNN's AVX-512 kernels reach.
    int8 (CPU): `torch._int_mm` (int8 x int8 -> int32, what our int8 linears call) and oneDNN's
    quantized linear (`torch.ops.onednn.qlinear_pointwise`: uint8 activations x int8
    per-channel weights -> fp32 with the scales applied, the u8 x s8 form that VNNI's
    dot-product instruction takes, as the int8 GEMMs of onnxruntime and CTranslate2 do).
    """
    rows = 16384 if device.type == "cuda" else 2048
    if precision == "int8":
        for m, k, n in _encoder_shapes(rows):
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8)  # (out, in), as linears hold it
            for kernel, call in _int8_gemms(x, w).items():
                yield kernel, 2 * m * k * n, call
        return
    dtype = DTYPES[precision]
    square = (4096, 8192) if device.type == "cuda" else (2048, 4096)
    for m, k, n in [(n, n, n) for n in square] + _encoder_shapes(rows):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        yield "torch.matmul", 2 * m * k * n, lambda a=a, b=b: a @ b
    if device.type != "cpu":
        return
    mkldnn = torch.ops.mkldnn
    for m, k, n in _encoder_shapes(rows):
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        try:
            packed = mkldnn._reorder_linear_weight(w, m)
        except (RuntimeError, AttributeError):  # a build without oneDNN
            return
        call = lambda x=x, p=packed: mkldnn._linear_pointwise(x, p, None, "none", [], "")  # noqa: E731
        yield "onednn linear", 2 * m * k * n, call


def _int8_gemms(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """kernel -> a call of it on x int8 (m, k) and w int8 (n, k)."""
    wt = w.t().contiguous()  # (k, n)
    calls: dict[str, Callable[[], Any]] = {"torch._int_mm": lambda: torch._int_mm(x, wt)}
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, list(x.shape))
    except (RuntimeError, AttributeError):
        return calls
    u8 = (x.to(torch.int16) + 128).to(torch.uint8)  # the same values, zero point 128
    scale, zero = torch.ones(len(w)), torch.zeros(len(w), dtype=torch.int64)
    calls["onednn qlinear"] = lambda: torch.ops.onednn.qlinear_pointwise(
        u8, 1.0, 128, packed, scale, zero, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return calls


def gemm_peak(device: torch.device, precision: str, seconds: float = 1.0) -> tuple[float, str]:
    """Best GEMM rate (operations/s) at this precision over the probed kernels and shapes,
    and the kernel that reached it; (0.0, "none") when no kernel ran."""
    rates: dict[str, float] = {}
    for kernel, ops, call in _gemm_calls(device, precision):
        try:
            rate = _rate(call, ops, device, seconds)
        except RuntimeError:  # a kernel this build or device lacks
            continue
        rates[kernel] = max(rates.get(kernel, 0.0), rate)
    if not rates:
        return 0.0, "none"
    kernel = max(rates, key=rates.__getitem__)
    return rates[kernel], kernel


# the precision attention's two matmuls run in, by side precision: int8 sides quantize the
# linear layers only (ours, onnxruntime's QAttention and CTranslate2 alike)
ATTENTION_PRECISION = {"fp32": "fp32", "bf16": "bf16", "int8": "fp32"}


def gemm_peaks(precisions: set[str], device: torch.device) -> dict[str, tuple[float, str]]:
    """precision -> (GEMM peak operations/s, kernel) for these side precisions and the
    precisions their attention runs in."""
    wanted = precisions | {ATTENTION_PRECISION[p] for p in precisions}
    return {p: gemm_peak(device, p) for p in sorted(wanted)}


def bound_fraction(precision: str, linear: float, attn: float, peaks: dict[str, float],
                   seconds: float) -> float:  # fmt: skip
    """The time the GEMM peaks allow at this precision (linear layers at the precision's peak,
    attention at its attention precision's) over the measured time; 0.0 with no peak."""
    linear_peak = peaks.get(precision, 0.0)
    attn_peak = peaks.get(ATTENTION_PRECISION[precision], 0.0)
    if not (linear_peak > 0 and attn_peak > 0):
        return 0.0
    return (linear / linear_peak + attn / attn_peak) / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    return timed_rounds({"fn": fn}, device, repeats)["fn"]


def timed_rounds(
    runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, float]:
    """name -> best wall time: one warm-up call each, then `repeats` rounds in which every
    run is called once in turn, so a slow spell on a shared machine hits every side alike."""
    for run in runs.values():
        run()
    _sync(device)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes above the pre-call level at the high-water mark of one call.

    CUDA: the caching allocator's peak. CPU: the kernel's RSS high-water mark (VmHWM), so
    call this in a fresh process per side (see --memory-of), where no freed memory from an
    earlier side can be reused unseen.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS, so a
        f.write("5")  # transient peak while building the model is not taken for the run's
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


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


def hf_side(model: Any, seqs: list[np.ndarray], batch: int, sort: bool, device: torch.device):
    batches = padded_batches(seqs, batch, sort)

    def run() -> None:
        with torch.inference_mode():
            for ids, mask in batches:
                model(input_ids=torch.from_numpy(ids).to(device),
                      attention_mask=torch.from_numpy(mask).to(device))  # fmt: skip

    return run


def sides(args: argparse.Namespace, device: torch.device) -> dict[str, tuple[str, Callable]]:
    """name -> (precision, factory) where factory() builds the model and returns its run()."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = bert.Config(**BERT_BASE)
    hf_config = BertConfig(**BERT_BASE)
    hf_config._attn_implementation = "sdpa"
    seqs = workload(args.notes, args.min_len, args.max_len, cfg.vocab_size, seed=0)
    budget = args.batch_tokens or args.hf_batch * args.max_len
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(specials)}, unk_token="[UNK]"))

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


def use_bf16(args: argparse.Namespace, device: torch.device) -> bool:
    return args.bf16 == "on" or (args.bf16 == "auto" and (device.type == "cuda" or cpu_has_bf16()))


def memory_in_subprocess(name: str, argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "jobs.bench", *argv, "--memory-of", name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def mlm_placement(args: argparse.Namespace, device: torch.device) -> dict[str, dict[int, float]]:
    """Seconds per batch of the MLM head in_graph vs on the host, by batch size (sequences).

    Each sequence is 128 tokens with 15% of them masked (BERT's rate), BERT-base vocab.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    cfg = bert.Config(**BERT_BASE)
    rng = np.random.default_rng(0)
    c, v = cfg.hidden_size, cfg.vocab_size
    state = {
        "cls.predictions.transform.dense.weight": torch.randn(c, c) * 0.02,
        "cls.predictions.transform.dense.bias": torch.zeros(c),
        "cls.predictions.transform.LayerNorm.weight": torch.ones(c),
        "cls.predictions.transform.LayerNorm.bias": torch.zeros(c),
        "cls.predictions.bias": torch.zeros(v),
    }
    torch.manual_seed(0)
    from transformers import BertConfig, BertModel

    base = BertModel(BertConfig(**BERT_BASE), add_pooling_layer=False).state_dict()
    state |= {f"bert.{k}": t for k, t in base.items()}
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(specials)}, unk_token="[UNK]"))
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


def job_vs_runner(args: argparse.Namespace) -> dict[str, Any]:
    """The full job (local Ray, 2 CPU actors) vs the bare runner loop, same corpus and model."""
    import logging
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq
    import ray

    from clinicalbert_core.hub import prepare

    from .driver import run_job
    from .spec import parse_spec
    from .synthetic import make_model, write_corpus

    root = Path(tempfile.mkdtemp(prefix="clinicalbert-jobbench-"))
    corpus = write_corpus(root / "notes.parquet", args.job_notes, seed=7, max_words=400)
    raw = make_model(root / "raw", hidden=args.job_hidden, layers=args.job_layers, heads=4)
    model = prepare(raw, root / "model", variant="custom", lowercase=False)
    cpus = os.cpu_count() or 2
    max_seq, budget = 256, 4096
    spec = parse_spec(
        {
            "name": "bench",
            "corpus": {"format": "parquet", "paths": [str(corpus)], "id_column": "note_id"},
            "model": {"variant": "custom", "path": str(model), "max_seq": max_seq,
                      "long_notes": {"strategy": "windows", "stride": 32}},
            "device_pool": [{"name": "cpu", "device": "cpu", "actors": cpus, "cpus_per_actor": 1,
                             "precision": "fp32", "batch_tokens": budget}],
            "output": {"path": str(root / "out")},
            "run": {"shard_rows": max(1, args.job_notes // (4 * cpus)), "progress_interval_s": 30},
        },
        root,
    )  # fmt: skip
    texts = pq.read_table(corpus, columns=["text"])["text"].to_pylist()
    torch.set_num_threads(cpus)
    runner = ClinicalBertRunner.load(model, precision="fp32", max_seq=max_seq, long_notes="windows",
                                     stride=32, batch_tokens=budget)  # fmt: skip
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(texts), 512):  # the bare loop: tokenize, encode, aggregate
        windows = runner.tokenize(texts[start : start + 512])
        runner.aggregate_vectors(windows, runner.encode_windows(windows).vectors)
        tokens += int(windows.lengths.sum())
    bare_s = time.perf_counter() - t0
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        t0 = time.perf_counter()
        report = run_job(spec)
        job_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    assert report["tokens"] == tokens, (report["tokens"], tokens)
    result = {
        "notes": len(texts), "tokens": tokens, "bare_runner_s": bare_s, "job_s": job_s,
        "bare_tok_s": tokens / bare_s, "job_tok_s": tokens / job_s, "ratio": bare_s / job_s,
        "model": f"hidden {args.job_hidden}, {args.job_layers} layers", "cpus": cpus,
    }  # fmt: skip
    print(
        f"job vs bare runner on {cpus} CPUs ({result['model']}, {len(texts)} notes, {tokens:,} tokens):"
    )
    print(f"  bare runner loop ({cpus} threads): {bare_s:7.1f} s  {tokens / bare_s:9,.0f} tok/s")
    print(f"  full job ({cpus} actors x 1 thread, local Ray, incl. planning, actor start, writes): "
          f"{job_s:7.1f} s  {tokens / job_s:9,.0f} tok/s")  # fmt: skip
    print(f"  job / bare runner throughput: {100 * result['ratio']:.0f}%")
    return result


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


def modernbert_bench(args: argparse.Namespace, device: torch.device, argv: list[str]) -> dict:
    """Mixed clinical lengths (64-2,048) and single notes of 512 / 2,048 / 8,192 tokens."""
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
        return {}
    print(f"ModernBERT-base shape on {device}, {precision}, {torch.get_num_threads()} threads; "
          "vs transformers ModernBertModel (SDPA, length-sorted batches)", flush=True)  # fmt: skip
    out: dict[str, Any] = {"device": str(device), "precision": precision, "rows": {}}
    for work, seqs in workloads.items():
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
        out["rows"][work] = row
        print(f"  {work:<16} {tokens:>7} tokens  ours {a['seconds']:8.3f} s {a['tok_s']:>9.0f} tok/s "
              f"{a['peak_mem_mib']:7.0f} MiB | transformers {b['seconds']:8.3f} s "
              f"{b['tok_s']:>9.0f} tok/s {b['peak_mem_mib']:7.0f} MiB | speed "
              f"{row['speed_ratio']:.2f}x, memory {row['memory_ratio']:.2f}x", flush=True)  # fmt: skip
    return out


BENCH_EXTRA = "clinicalbert-jobs[bench]"


def missing_module(modules: list[str]) -> str | None:
    """The first of these python modules that cannot be imported, or None."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


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


def device_arg(text: str) -> torch.device:
    """An argparse type: a torch device this process can use (check_device's error otherwise)."""
    try:
        return check_device(text)
    except (ValueError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--long-note-memory" in argv:  # a benchmark of its own, with its own options
        from .bench_memory import main as memory_main

        return memory_main([a for a in argv if a != "--long-note-memory"])
    p = argparse.ArgumentParser(prog="clinicalbert bench", description=__doc__)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda, cuda:1, mps (default: cuda where torch sees one)")  # fmt: skip
    p.add_argument("--notes", type=at_least(1), default=64, help="notes in the workload (64)")
    p.add_argument("--min-len", type=at_least(3), default=16,
                   help="shortest note in tokens, [CLS] and [SEP] included (16)")  # fmt: skip
    p.add_argument("--max-len", type=at_least(3), default=512, help="longest note in tokens (512)")
    p.add_argument("--batch-tokens", type=at_least(0), default=0,
                   help="our token budget; default hf-batch x max-len, the tokens of "
                   "transformers' largest batch, so both sides hold the same work at once")  # fmt: skip
    p.add_argument("--hf-batch", type=at_least(1), default=16,
                   help="sequences per batch for transformers and the peers (16)")  # fmt: skip
    p.add_argument("--repeats", type=at_least(1), default=2,
                   help="interleaved timed rounds after the warm-up; best round per side (2)")  # fmt: skip
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="auto: only where the device has bf16 units (AMX/AVX512-BF16, CUDA)")  # fmt: skip
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--mlm-placement", action="store_true",
                   help="time the MLM head in_graph vs cpu by batch size instead")  # fmt: skip
    p.add_argument("--mlm-batches", type=at_least(1), nargs="+",
                   default=[1, 2, 4, 8, 16, 32, 64, 128], help="batch sizes for --mlm-placement")  # fmt: skip
    p.add_argument("--job", action="store_true",
                   help="time the full job vs the bare runner loop instead")  # fmt: skip
    p.add_argument("--job-notes", type=at_least(1), default=4000, help="notes for --job (4000)")
    p.add_argument("--job-hidden", type=at_least(4), default=256,
                   help="hidden size of --job's random BERT (256; 4 heads, so a multiple of 4)")  # fmt: skip
    p.add_argument("--job-layers", type=at_least(1), default=4,
                   help="layers of --job's random BERT (4)")  # fmt: skip
    p.add_argument("--arch", choices=("bert", "modernbert"), default="bert",
                   help="modernbert: ModernBERT-base shape, mixed 64-2,048-token notes and single "
                   "notes (--single-lengths) vs transformers' ModernBertModel")  # fmt: skip
    p.add_argument("--single-lengths", type=at_least(3), nargs="+", default=[512, 2048, 8192],
                   help="--arch modernbert: lengths of the single-note runs")  # fmt: skip
    p.add_argument("--peers", action="store_true",
                   help="also run onnxruntime and CTranslate2, fp32 and int8, on the same batches "
                   "(CPU; needs the bench extra)")  # fmt: skip
    p.add_argument("--long-note-memory", action="store_true",
                   help="instead: an actor's peak memory on very long notes vs normal ones "
                   "(its options: --long-note-memory --help)")  # fmt: skip
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one side's peak memory
    args = p.parse_args(argv)
    device = args.device
    if args.min_len > args.max_len:
        p.error(f"--min-len {args.min_len} is above --max-len {args.max_len}")
    if args.arch == "bert" and args.max_len > BERT_BASE["max_position_embeddings"]:
        p.error(f"--max-len {args.max_len} is above BERT's 512 positions (longer notes: --arch "
                "modernbert)")  # fmt: skip
    if args.job_hidden % 4:
        p.error(f"--job-hidden must be a multiple of 4 (its 4 heads), got {args.job_hidden}")
    if args.peers and (args.arch != "bert" or args.job or args.mlm_placement):
        p.error("--peers applies to the BERT run only (not modernbert, --job, --mlm-placement)")
    if args.peers and device.type != "cpu":
        p.error(f"--peers runs the onnxruntime and CTranslate2 CPU builds; got --device {device}")
    needs = ([] if args.job else ["transformers"]) + (list(PEER_MODULES) if args.peers else [])
    missing = missing_module(needs)
    if missing:
        print(f"error: clinicalbert bench{' --peers' if args.peers else ''} needs the python "
              f"package {missing}, which is not installed: pip install '{BENCH_EXTRA}'",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.arch == "modernbert":
        result = modernbert_bench(args, device, argv)
        if args.json and not args.memory_of:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    if args.job:
        result = job_vs_runner(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        return 0
    if args.mlm_placement:
        result = mlm_placement(args, device)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": str(device), "mlm_placement_s": result}, f, indent=2)
        return 0
    table = sides(args, device)
    if args.memory_of:
        print(peak_memory(table[args.memory_of][1](), device))
        return 0

    seqs = workload(args.notes, args.min_len, args.max_len, BERT_BASE["vocab_size"], seed=0)
    lengths = np.array([len(s) for s in seqs])
    linear, attn = flop_parts(bert.Config(**BERT_BASE), lengths)
    tokens, work = int(lengths.sum()), linear + attn
    probed = gemm_peaks({p for p, _ in table.values()}, device)
    peaks = {p: rate for p, (rate, _) in probed.items()}
    print(f"bench on {device} ({torch.get_num_threads()} threads): {args.notes} notes, {tokens} tokens "
          f"({lengths.min()}-{lengths.max()}), {work / 1e9:.0f} GFLOP; GEMM peak "
          + ", ".join(f"{p} {rate / 1e9:.0f} G{'OP' if p == 'int8' else 'FLOP'}/s ({kernel})"
                      for p, (rate, kernel) in probed.items()), flush=True)  # fmt: skip
    runs = {}
    for name, (_, factory) in table.items():
        t0 = time.perf_counter()
        runs[name] = factory()
        print(f"  built {name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(f"timing {len(runs)} sides in {args.repeats} interleaved rounds after a warm-up ...",
          flush=True)  # fmt: skip
    best = timed_rounds(runs, device, args.repeats)
    del runs
    gc.collect()
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
    pairs = [("ours fp32", "transformers fp32 unsorted"), ("ours fp32", "transformers fp32 sorted"),
             ("ours bf16", "transformers bf16 sorted")]  # fmt: skip
    ratios, memory = {}, {}
    for a, b in pairs:
        if a in rows and b in rows:
            ratios[f"{a} / {b}"] = rows[a]["tok_s"] / rows[b]["tok_s"]
            memory[f"{a} / {b}"] = rows[a]["peak_mem_mib"] / max(rows[b]["peak_mem_mib"], 1e-9)
            print(f"  speed {a} / {b}: {ratios[f'{a} / {b}']:.2f}x   "
                  f"peak memory: {memory[f'{a} / {b}']:.2f}x")  # fmt: skip
    if not use_bf16(args, device):
        print("  bf16 skipped: this device has no bf16 matrix units (bf16 would be emulated)")
    targets = target_figures(rows)
    print("targets:")
    for label, t in targets.items():
        if "ratio" in t:
            print(f"  {label:<34} {t['ratio']:6.2f}x  ({t['sides'][0]} / {t['sides'][1]})")
        else:
            print(f"  {label:<34} {100 * t['fraction']:5.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "threads": torch.get_num_threads(), "tokens": tokens,
                       "gflop": work / 1e9, "gflop_linear": linear / 1e9, "gflop_attention": attn / 1e9,
                       "gemm_peak": {p: {"gflops": rate / 1e9, "kernel": kernel}
                                     for p, (rate, kernel) in probed.items()},
                       "rows": rows, "speed_ratios": ratios,
                       "memory_ratios": memory, "targets": targets}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
