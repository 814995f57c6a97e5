"""The `clinicalbert bench` command line: its options, their checks, which benchmark runs, and
the --json file. `--long-note-memory` hands the rest of the line to memory.py's own options."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from . import encoder
from .options import BENCH_EXTRA, at_least, device_arg, missing_module
from .peers import MODULES as PEER_MODULES
from .workload import BERT_BASE


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clinicalbert bench", description=encoder.__doc__)
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
    p.add_argument("--heads", action="store_true",
                   help="instead: the runner loop, the actor's code and the full job with "
                   "heads.classify and heads.tokens vs vectors only (--job-hidden, "
                   "--job-layers)")  # fmt: skip
    p.add_argument("--heads-notes", type=at_least(1), default=120, help="notes for --heads (120)")
    p.add_argument("--heads-rounds", type=at_least(1), default=3,
                   help="--heads: interleaved rounds per side; best and median (3)")  # fmt: skip
    p.add_argument("--arch", choices=("bert", "modernbert"), default="bert",
                   help="modernbert: ModernBERT-base shape, mixed 64-2,048-token notes and single "
                   "notes (--single-lengths) vs transformers' ModernBertModel")  # fmt: skip
    p.add_argument("--single-lengths", type=at_least(3), nargs="+", default=[512, 2048, 8192],
                   help="--arch modernbert: lengths of the single-note runs")  # fmt: skip
    p.add_argument("--peers", action="store_true",
                   help="also run onnxruntime and CTranslate2, fp32 and int8, on the same batches "
                   "(CPU; needs the bench extra)")  # fmt: skip
    p.add_argument("--dispatch", action="store_true",
                   help="instead: the driver's own cost per dispatched shard and per progress "
                   "round, on fake actors (no Ray, no model)")  # fmt: skip
    p.add_argument("--dispatch-actors", type=at_least(1), default=1000,
                   help="fake actors for --dispatch (1000)")  # fmt: skip
    p.add_argument("--dispatch-shards", type=at_least(1), default=50_000,
                   help="shards for --dispatch (50000)")  # fmt: skip
    p.add_argument("--scale", type=at_least(1), metavar="N",
                   help="instead: validate, the dry run, a real run's planning and verify on an "
                   "N-note synthetic Parquet corpus (made once, cached), each step's wall time "
                   "and the driver's peak RSS; then --dispatch")  # fmt: skip
    p.add_argument("--scale-ids", choices=("int64", "string"), default="int64",
                   help="--scale: the corpus's note ids (int64, or 14-character strings)")  # fmt: skip
    p.add_argument("--cache", help="--scale: where corpora are cached "
                   "(default ~/.cache/clinicalbert/bench)")  # fmt: skip
    p.add_argument("--long-note-memory", action="store_true",
                   help="instead: an actor's peak memory on very long notes vs normal ones "
                   "(its options: --long-note-memory --help)")  # fmt: skip
    p.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: one side's peak memory
    return p


def check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors (exit 2) for options that do not go together."""
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--long-note-memory" in argv:  # a benchmark of its own, with its own options
        from .memory import main as memory_main

        return memory_main([a for a in argv if a != "--long-note-memory"])
    p = parser()
    args = p.parse_args(argv)
    check(p, args)
    from clinicalbert_core.ops import bound_onednn_caches

    bound_onednn_caches()  # before the probes' first oneDNN op, as a runner does
    own = args.job or args.dispatch or args.scale or args.heads  # the job layer's: no transformers
    needs = ([] if own else ["transformers"]) + (list(PEER_MODULES) if args.peers else [])
    missing = missing_module(needs)
    if missing:
        print(f"error: clinicalbert bench{' --peers' if args.peers else ''} needs the python "
              f"package {missing}, which is not installed: pip install '{BENCH_EXTRA}'",
              file=sys.stderr)  # fmt: skip
        return 2
    result = run(args, argv)
    if args.json and result is not None:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def run(args: argparse.Namespace, argv: list[str]) -> dict | None:
    """The benchmark the options pick; its figures for --json (None: nothing to write)."""
    device = args.device
    if args.scale:
        from .scale import print_scale, scale_bench

        result = scale_bench(args.scale, args.scale_ids, args.cache, args.dispatch_actors,
                             args.dispatch_shards)  # fmt: skip
        print_scale(result)
        return result
    if args.dispatch:
        from .dispatch import dispatch_bench, print_dispatch

        result = dispatch_bench(args.dispatch_actors, args.dispatch_shards)
        print_dispatch(result)
        return result
    if args.arch == "modernbert":
        from .modernbert import modernbert_bench

        return modernbert_bench(args, device, argv)
    if args.heads:
        from .heads import heads_bench, print_heads

        result = heads_bench(args)
        print_heads(result)
        return result
    if args.job:
        from .job import job_vs_runner

        return job_vs_runner(args)
    if args.mlm_placement:
        from .mlm import mlm_placement

        return {"device": str(device), "mlm_placement_s": mlm_placement(args, device)}
    return encoder.run(args, device, argv)
