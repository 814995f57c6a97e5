"""`clinicalbert bench --job`: the full job (local Ray, planning, actor start and Parquet
writes included) vs the bare tokenize/encode/aggregate loop, on the same corpus and model."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from clinicalbert_core.runner import ClinicalBertRunner

MAX_SEQ, BUDGET = 256, 4096  # the model's max_seq and the token budget, both sides


def job_vs_runner(args: argparse.Namespace) -> dict[str, Any]:
    """The full job (local Ray, 2 CPU actors) vs the bare runner loop, same corpus and model."""
    import pyarrow.parquet as pq
    import ray

    from ..driver import run_job

    root = Path(tempfile.mkdtemp(prefix="clinicalbert-jobbench-"))
    cpus = os.cpu_count() or 2
    corpus, model, spec = _corpus_model_spec(args, root, cpus)
    texts = pq.read_table(corpus, columns=["text"])["text"].to_pylist()
    torch.set_num_threads(cpus)
    runner = ClinicalBertRunner.load(model, precision="fp32", max_seq=MAX_SEQ, long_notes="windows",
                                     stride=32, batch_tokens=BUDGET)  # fmt: skip
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


def _corpus_model_spec(args: argparse.Namespace, root: Path, cpus: int) -> tuple[Path, Path, Any]:
    """The synthetic corpus, the random model (prepared) and the job's spec, under `root`."""
    from clinicalbert_core.hub import prepare

    from ..spec import parse_spec
    from ..synthetic import make_model, write_corpus

    corpus = write_corpus(root / "notes.parquet", args.job_notes, seed=7, max_words=400)
    raw = make_model(root / "raw", hidden=args.job_hidden, layers=args.job_layers, heads=4)
    model = prepare(raw, root / "model", variant="custom", lowercase=False)
    spec = parse_spec(
        {
            "name": "bench",
            "corpus": {"format": "parquet", "paths": [str(corpus)], "id_column": "note_id"},
            "model": {"variant": "custom", "path": str(model), "max_seq": MAX_SEQ,
                      "long_notes": {"strategy": "windows", "stride": 32}},
            "device_pool": [{"name": "cpu", "device": "cpu", "actors": cpus, "cpus_per_actor": 1,
                             "precision": "fp32", "batch_tokens": BUDGET}],
            "output": {"path": str(root / "out")},
            "run": {"shard_rows": max(1, args.job_notes // (4 * cpus)), "progress_interval_s": 30},
        },
        root,
    )  # fmt: skip
    return corpus, model, spec
