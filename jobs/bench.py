"""`clinicalbert bench`: this encoder vs transformers' BertModel on one mixed-length workload.

Everything runs in one process, side by side, on the same token ids (BERT-base shape, random
weights, lengths spread over 16-512): our packed encoder (fp32, and bf16 where the device has
bf16 units), transformers fp32 unsorted batches of 16 (as a user would run it), fp32 sorted,
and its best (bf16 weights, length-sorted). A matmul probe measures the device's peak so the
achieved GFLOP/s can be read as a fraction of what the hardware can do. Peak memory is the
high-water mark above the pre-run level (CUDA allocator stats, or sampled RSS on CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from clinicalbert_core import bert
from clinicalbert_core.config import EncoderConfig
from clinicalbert_core.runner import DTYPES, ClinicalBertRunner, RunnerOptions, cpu_has_bf16
from clinicalbert_core.tokenizer import Specials, Windows

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
        token_char=np.zeros(int(lengths.sum()), np.int64),
        bounds=np.concatenate(([0], np.cumsum(lengths))),
        note=np.arange(n), window_index=np.zeros(n, np.int32),
        char_start=np.zeros(n, np.int64), char_end=np.zeros(n, np.int64),
        note_tokens=lengths - 2, truncated=np.zeros(n, bool),
    )  # fmt: skip


# the workload's ids: BERT's [CLS]/[SEP] and a [MASK] id inside the small WordLevel vocab
SPECIALS = Specials(cls=101, sep=102, mask=4)


def flops(cfg: EncoderConfig, lengths: np.ndarray) -> float:
    """Forward FLOPs of the encoder on these sequence lengths (no padding counted)."""
    c, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    linear = 2 * (4 * c * c + 2 * c * i) * layers * lengths.sum()
    attn = 4 * layers * c * (lengths.astype(np.float64) ** 2).sum()
    return float(linear + attn)


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Best FLOP/s over square matmuls and the encoder's own GEMM shapes
    (rows x C -> 3C, C -> I, I -> C).

    One shape alone misleads: on some CPUs a 2048^3 fp32 matmul runs at 2/3 of a 4096^3 one.
    """
    c, i = BERT_BASE["hidden_size"], BERT_BASE["intermediate_size"]
    square = (4096, 8192) if device.type == "cuda" else (2048, 4096)
    rows = 16384 if device.type == "cuda" else 2048
    shapes = [(n, n, n) for n in square] + [(rows, c, 3 * c), (rows, c, i), (rows, i, c)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            a @ b
            reps += 1
            _sync(device)
        best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0))
    return best


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
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
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


def hf_side(model: Any, seqs: list[np.ndarray], batch: int, sort: bool, device: torch.device):
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i])) if sort else range(len(seqs))
    order = list(order)

    def run() -> None:
        with torch.inference_mode():
            for s in range(0, len(order), batch):
                chunk = [seqs[i] for i in order[s : s + batch]]
                width = max(len(x) for x in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                mask = torch.zeros(len(chunk), width, dtype=torch.long)
                for j, x in enumerate(chunk):
                    ids[j, : len(x)] = torch.from_numpy(x)
                    mask[j, : len(x)] = 1
                model(input_ids=ids.to(device), attention_mask=mask.to(device))

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
    make_hf = lambda: BertModel(hf_config, add_pooling_layer=False).eval()  # noqa: E731
    torch.manual_seed(0)
    state = {f"bert.{k}": v for k, v in make_hf().state_dict().items()}

    def ours(precision: str) -> Callable:
        options = RunnerOptions(device=str(device), precision=precision, max_seq=512,
                                pooling="cls", batch_tokens=budget)  # fmt: skip
        runner = ClinicalBertRunner(cfg, state, tok, SPECIALS, options)
        windows = windows_of(seqs)
        return lambda: runner.encode_windows(windows)

    def theirs(dtype: torch.dtype, sort: bool) -> Callable:
        torch.manual_seed(0)
        return hf_side(make_hf().to(device, dtype), seqs, args.hf_batch, sort, device)

    out: dict[str, tuple[str, Callable]] = {
        "ours fp32": ("fp32", lambda: ours("fp32")),
        "transformers fp32 unsorted": ("fp32", lambda: theirs(torch.float32, False)),
        "transformers fp32 sorted": ("fp32", lambda: theirs(torch.float32, True)),
    }
    if use_bf16(args, device):
        out["ours bf16"] = ("bf16", lambda: ours("bf16"))
        out["transformers bf16 sorted"] = ("bf16", lambda: theirs(torch.bfloat16, True))
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
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING)
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
        best = dict.fromkeys(runs, float("inf"))
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):  # interleaved rounds, best of each side
            for side, run in runs.items():
                _sync(device)
                t0 = time.perf_counter()
                run()
                _sync(device)
                best[side] = min(best[side], time.perf_counter() - t0)
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="clinicalbert bench", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--notes", type=int, default=64)
    p.add_argument("--min-len", type=int, default=16)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="our token budget; default hf-batch x max-len, the tokens of "
                   "transformers' largest batch, so both sides hold the same work at once")  # fmt: skip
    p.add_argument("--hf-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="auto: only where the device has bf16 units (AMX/AVX512-BF16, CUDA)")  # fmt: skip
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--mlm-placement", action="store_true",
                   help="time the MLM head in_graph vs cpu by batch size instead")  # fmt: skip
    p.add_argument("--mlm-batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    p.add_argument("--job", action="store_true",
                   help="time the full job vs the bare runner loop instead")  # fmt: skip
    p.add_argument("--job-notes", type=int, default=4000)
    p.add_argument("--job-hidden", type=int, default=256)
    p.add_argument("--job-layers", type=int, default=4)
    p.add_argument("--arch", choices=("bert", "modernbert"), default="bert",
                   help="modernbert: ModernBERT-base shape, mixed 64-2,048-token notes and single "
                   "notes (--single-lengths) vs transformers' ModernBertModel")  # fmt: skip
    p.add_argument("--single-lengths", type=int, nargs="+", default=[512, 2048, 8192])
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one side's peak memory
    args = p.parse_args(argv)
    device = torch.device(args.device)
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
    tokens, work = int(lengths.sum()), flops(bert.Config(**BERT_BASE), lengths)
    peaks = {prec: matmul_peak(device, DTYPES[prec]) for prec in {p for p, _ in table.values()}}
    print(f"bench on {device} ({torch.get_num_threads()} threads): {args.notes} notes, {tokens} tokens "
          f"({lengths.min()}-{lengths.max()}), {work / 1e9:.0f} GFLOP; matmul peak "
          + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in sorted(peaks.items())), flush=True)  # fmt: skip
    rows: dict[str, dict[str, float]] = {}
    for name, (precision, factory) in table.items():
        run = factory()
        seconds = timed(run, device, args.repeats)
        if device.type == "cuda":
            mem = peak_memory(run, device)
        else:
            del run
            gc.collect()
            mem = memory_in_subprocess(name, argv)
        rows[name] = {
            "tok_s": tokens / seconds, "seconds": seconds, "gflops": work / seconds / 1e9,
            "of_peak": work / seconds / peaks[precision], "peak_mem_mib": mem / 2**20,
        }  # fmt: skip
        r = rows[name]
        print(f"  {name:<28} {r['tok_s']:>9.0f} tok/s {r['gflops']:>9.1f} GFLOP/s "
              f"({100 * r['of_peak']:3.0f}% of {precision} peak)  peak mem {r['peak_mem_mib']:7.0f} MiB",
              flush=True)  # fmt: skip
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "tokens": tokens, "gflop": work / 1e9,
                       "matmul_peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
                       "rows": rows, "speed_ratios": ratios, "memory_ratios": memory}, f, indent=2)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
