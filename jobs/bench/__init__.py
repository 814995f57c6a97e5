"""Benchmarks beside the product: `clinicalbert bench` (figures and how to run them: README.md
here). No product module imports this package but `jobs.cli`, lazily, for `clinicalbert bench`.

    command.py     the command line: options, checks, which benchmark runs, --json
    encoder.py     ours vs transformers' BertModel (and, --peers, the engines in peers.py)
    peers.py       onnxruntime and CTranslate2 sides, each checked against transformers first
    modernbert.py  --arch modernbert: ours vs transformers' ModernBertModel
    mlm.py         --mlm-placement: the MLM head in the graph vs on the host
    job.py         --job: the full job vs the bare runner loop
    heads.py       --heads: classify and tokens next to vectors only (runner, actor, job)
    memory.py      --long-note-memory: an actor's peak memory on very long notes
    workload.py    the token ids every side runs on, as windows and as padded batches
    probes.py      FLOP counts and GEMM peak probes per precision
    meter.py       best-of-rounds timing and peak memory
    scale.py       --scale N: validate, dry run, planning and verify on an N-note corpus
    dispatch.py    --dispatch: the driver's cost per shard with 1,000 fake actors
    options.py     argparse types, the bf16 choice, the bench extra's check

`python -m jobs.bench` is `clinicalbert bench`; the benchmarks run sides in fresh processes
through it. Importing this package is cheap (no torch): `--scale` steps run as
`python -m jobs.bench.scale` and measure the driver's memory without the bench's own imports.
"""

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """`clinicalbert bench` (command.py)."""
    from .command import main as command_main

    return command_main(argv)
