"""Peak memory of an actor on very long notes vs normal notes.

Two sides, each in a fresh process (so no memory freed by one side is reused unseen by the
other), each running the actor's own per-shard code (`ShardProcessor.process`, no Ray) over
one shard:

- long:   `--notes` rows, `--long` of them of `--long-chars` characters (default 3 x
          2,000,000, the default `run.max_note_chars`), the rest synthetic discharge-summary-
          like notes;
- normal: the same normal notes plus more of them (`--match`): as many characters (the
          default with `--long-notes windows`: the encoder gets the same work) or as many rows
          (the default with `truncate`, where a note is one window whatever its length).

Reported per side: the process's RSS before the shard, its high-water mark (VmHWM) while the
shard runs (reset just before, so model loading's transient peak is not counted), the peak
above the starting level, and the ratio long / normal of the peaks. Each side runs in the
environment the driver gives a CPU actor (`launch.actor_env`; `--no-actor-env`: without).
Run it as `clinicalbert bench --long-note-memory` (see --help); the model is random, built in
a temp dir (or `--workdir`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .meter import reset_peak_rss, status_kib
from .options import at_least

# model shapes: `base` is BERT-base (what an actor really holds), `small` a narrow one whose
# encoder is cheap enough to run every window of 3 x 2M-char notes in minutes on 2 cores
SHAPES = {
    "base": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072},
    "small": {"hidden": 128, "layers": 2, "heads": 4, "intermediate": 512},
}


def long_note(chars: int, seed: int) -> str:
    """A synthetic note of exactly `chars` characters (sections repeated, as in a long
    record that concatenates many notes)."""
    from ..synthetic import make_note

    rng, parts, size = random.Random(seed), [], 0
    while size < chars:
        parts.append(make_note(rng, 2000))
        size += len(parts[-1]) + 1
    return "\n".join(parts)[:chars]


def build(
    root: Path, shape: str, notes: int, long: int, long_chars: int, same_work: bool
) -> dict[str, str]:
    """The model dir and the two corpora (one Parquet file, one row group each).

    long: `notes` rows, `long` of them of `long_chars` characters. normal: the same normal
    notes plus more of them, `same_work`: until they hold as many characters (with windows,
    every token is encoded: the encoder gets the same work, so memory differs by note size
    only, not by how much was encoded), else as many rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clinicalbert_core.hub import prepare

    from ..synthetic import make_model, make_notes

    dims = SHAPES[shape]
    raw = make_model(root / "raw", max_positions=512, seed=3, **dims)
    model = prepare(raw, root / "model", variant="custom", lowercase=False)
    normal = make_notes(notes - long, seed=11, min_words=300, max_words=2500)
    every = max(1, len(normal) // (long + 1))
    with_long = list(normal)
    for k in range(long):  # spread over the shard
        with_long.insert((k + 1) * every + k, long_note(long_chars, seed=100 + k))
    target = sum(map(len, with_long)) if same_work else 0
    seed = 12
    while len(normal) < notes or sum(map(len, normal)) < target:
        normal += make_notes(50, seed=seed, min_words=300, max_words=2500)
        seed += 1
    if not same_work:
        normal = normal[:notes]
    paths = {"model": str(model)}
    for name, texts in (("normal", normal), ("long", with_long)):
        table = pa.table({"note_id": pa.array(range(len(texts)), pa.int64()), "text": texts})
        pq.write_table(table, root / f"{name}.parquet", row_group_size=len(texts))
        paths[name] = str(root / f"{name}.parquet")
    return paths


def measure(corpus: str, model: str, out: str, long_notes: str, threads: int) -> dict[str, Any]:
    """Run one shard through the actor's code in this process; memory figures in MiB."""
    import torch

    from clinicalbert_core.hub import ModelBundle

    from ..actor import ShardProcessor
    from ..corpus import plan_shards
    from ..spec import parse_spec

    spec = parse_spec(
        {
            "name": "bench-memory",
            "corpus": {"format": "parquet", "paths": [corpus], "id_column": "note_id"},
            "model": {"variant": "custom", "path": model, "max_seq": 512,
                      "long_notes": {"strategy": long_notes}},
            "device_pool": [{"name": "cpu", "device": "cpu", "cpus_per_actor": threads,
                             "precision": "fp32"}],
            "output": {"path": out},
        },
        os.path.dirname(corpus),
    )  # fmt: skip
    (shard,) = plan_shards(spec.corpus, out + ".staging", spec.run.shard_rows)
    torch.set_num_threads(threads)  # as EncoderActor does for a CPU pool
    processor = ShardProcessor(ModelBundle.load(model), spec, spec.device_pool[0])
    reset_peak_rss()  # VmHWM := VmRSS now: model loading's transient peak is not the shard's
    before = status_kib("VmRSS")
    t0 = time.perf_counter()
    result = processor.process(shard)
    seconds = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {
        "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
        "peak_above_start_mib": (peak - before) / 1024, "seconds": seconds,
        "rows": result.rows_out, "windows": result.windows, "tokens": result.tokens,
    }  # fmt: skip


def _side(args: argparse.Namespace, paths: dict[str, str], side: str, root: Path) -> dict:
    """measure() of one side in a fresh `python -m jobs.bench --long-note-memory --side` run."""
    cmd = [
        sys.executable, "-m", "jobs.bench", "--long-note-memory", "--side", side,
        "--corpus", paths[side], "--model", paths["model"],
        "--out", str(root / f"out-{side}-{time.monotonic_ns()}"),
        "--long-notes", args.long_notes, "--threads", str(args.threads),
    ]  # fmt: skip
    env = dict(os.environ)
    if args.actor_env:  # what the driver gives an actor of this pool (threads, oneDNN caches)
        from ..launch import actor_env
        from ..spec import PoolSpec

        env |= actor_env(PoolSpec(name="cpu", device="cpu"), args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"side {side} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build once, then `--repeats` rounds of (normal, long), each side in its own process."""
    root = Path(args.workdir or tempfile.mkdtemp(prefix="clinicalbert-memory-"))
    same_work = args.match == "chars" or (args.match == "auto" and args.long_notes == "windows")
    paths = build(root, args.shape, args.notes, args.long, args.long_chars, same_work)
    runs: dict[str, list[dict]] = {"normal": [], "long": []}
    for _ in range(args.repeats):
        for side in runs:
            runs[side].append(_side(args, paths, side, root))
            r = runs[side][-1]
            print(f"  {side:<6} rss before {r['rss_before_mib']:7.0f} MiB  peak {r['peak_mib']:7.0f} "
                  f"MiB (+{r['peak_above_start_mib']:5.0f})  {r['windows']:6d} windows "
                  f"{r['tokens']:10,d} tokens  {r['seconds']:6.1f} s", flush=True)  # fmt: skip
    best = {side: min(rs, key=lambda r: r["peak_mib"]) for side, rs in runs.items()}
    worst = {side: max(rs, key=lambda r: r["peak_mib"]) for side, rs in runs.items()}
    ratio = worst["long"]["peak_mib"] / best["normal"]["peak_mib"]
    median = lambda side, key: sorted(r[key] for r in runs[side])[len(runs[side]) // 2]  # noqa: E731
    result = {
        "shape": args.shape, **SHAPES[args.shape], "long_notes": args.long_notes,
        "notes": args.notes, "long": args.long, "long_chars": args.long_chars,
        "normal_matches": "chars" if same_work else "rows",
        "threads": args.threads, "actor_env": args.actor_env, "runs": runs,
        "median_peak_mib": {s: median(s, "peak_mib") for s in runs},
        "median_peak_above_start_mib": {s: median(s, "peak_above_start_mib") for s in runs},
        "ratio_worst_long_to_best_normal": ratio,
        "ratio_median": median("long", "peak_mib") / median("normal", "peak_mib"),
    }  # fmt: skip
    print(
        f"peak RSS, median of {args.repeats}: normal {result['median_peak_mib']['normal']:.0f} MiB, "
        f"long {result['median_peak_mib']['long']:.0f} MiB: long/normal "
        f"{result['ratio_median']:.3f} (worst long / best normal {ratio:.3f}); above the start: "
        f"normal +{result['median_peak_above_start_mib']['normal']:.0f} MiB, "
        f"long +{result['median_peak_above_start_mib']['long']:.0f} MiB"
    )
    return result


def parser() -> argparse.ArgumentParser:
    """`clinicalbert bench --long-note-memory`'s options (its own, apart from the encoder
    bench's)."""
    p = argparse.ArgumentParser(prog="clinicalbert bench --long-note-memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--shape", choices=sorted(SHAPES), default="small",
                   help="model shape: small = hidden 128, 2 layers (default: every window of "
                   "3 x 2M-char notes in about a minute), base = BERT-base (with --long-notes "
                   "truncate on a CPU: hours with windows)")  # fmt: skip
    p.add_argument("--long-notes", choices=("windows", "truncate"), default="windows",
                   help="long-note strategy (default windows, the spec's default)")  # fmt: skip
    p.add_argument("--notes", type=at_least(1), default=40, help="rows in the shard (default 40)")
    p.add_argument("--match", choices=("auto", "chars", "rows"), default="auto",
                   help="what the normal side matches: chars (default with windows) or rows")  # fmt: skip
    p.add_argument("--long", type=at_least(1), default=3, help="of them very long (default 3)")
    p.add_argument("--long-chars", type=at_least(1), default=2_000_000,
                   help="characters in each very long note (default 2,000,000)")  # fmt: skip
    p.add_argument("--threads", type=at_least(1), default=1, help="torch threads (cpus_per_actor)")
    p.add_argument("--repeats", type=at_least(1), default=1,
                   help="runs of each side, interleaved; the median is reported (default 1)")  # fmt: skip
    p.add_argument("--no-actor-env", dest="actor_env", action="store_false",
                   help="run the sides without the environment the driver gives a CPU actor")  # fmt: skip
    p.add_argument("--workdir", help="where to build the model and corpora (default a temp dir)")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--side", choices=("normal", "long"), help=argparse.SUPPRESS)  # internal
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.long > args.notes:
        p.error(
            f"--long {args.long} is more than --notes {args.notes} (the long ones are among them)"
        )
    if args.side:
        print(json.dumps(measure(args.corpus, args.model, args.out, args.long_notes, args.threads)))
        return 0
    result = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
