"""`clinicalbert bench --scale N`: what the driver's own steps cost on an N-note corpus.

Made once and cached (under `--cache`, default ~/.cache/clinicalbert/bench, in
`scale-<N>-<ids>/`; `_made.json` last, so a half-made dir is made again):

    corpus/notes-<k>.parquet  N short synthetic notes (note_id int64 or 14-character string ids,
                              scattered, each once; subject_id; text), FILE_ROWS rows per file
                              in row groups of GROUP_ROWS (= the default run.shard_rows)
    model/                    a tiny random BERT (prepared)
    job.yaml                  the job over them: one CPU actor, default shard_rows
    output/                   a finished output of the job as `verify` expects it (one part per
                              shard of the real plan, DIMS-float vectors, footers, _report.json,
                              _SUCCESS), written by the product's own part writer and report

Then each step runs in a fresh `python -m jobs.bench.scale STEP DIR` process, so its peak RSS
(VmHWM: this process alone, not its Ray's) is the step's own, with a Ray temp dir of its own
(a local Ray it starts never meets another on this machine):

    validate   `clinicalbert validate job.yaml` (footers, the shard plan, every id checked once)
    dry-run    `clinicalbert run --dry-run job.yaml` (a private local Ray, run.dry_run_notes notes)
    plan       a real run's planning, no encoding: open_job (checks, model, output claimed),
               the Ray connection, plan_job (shards, repeated ids); then a resume's
               planning over the same output (the ids' verdict kept: no id read)
    verify     `clinicalbert verify output/`

and the dispatcher benchmark (`--dispatch`) in this process.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FILE_ROWS, GROUP_ROWS = 250_000, 20_000
POOL_NOTES = 10_000  # distinct notes the corpus draws from (short: 5-60 words)
DIMS = 8  # the synthetic output's vector size
ID_MULT, ID_SPACE = 0x9E3779B1, 1 << 40  # row i -> id (i * ID_MULT mod ID_SPACE) + 1: one each
STEPS = ("validate", "dry-run", "plan", "verify")
MADE = "_made.json"


def default_cache() -> Path:
    return Path.home() / ".cache" / "clinicalbert" / "bench"


# ---- the files ---------------------------------------------------------------------------------
def note_ids(start: int, stop: int, kind: str) -> Any:
    """The ids of rows start..stop: int64 scattered over 1..2^40, or as 14-character strings
    ("n" and 13 digits)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = np.arange(start, stop, dtype=np.uint64)
    ids = pa.array(((rows * ID_MULT) % ID_SPACE + 1).astype(np.int64))
    if kind == "int64":
        return ids
    digits = pc.utf8_lpad(pc.cast(ids, pa.string()), width=13, padding="0")
    return pc.binary_join_element_wise("n", digits, "")


def write_corpus(root: Path, notes: int, kind: str, seed: int = 0) -> list[Path]:
    """The corpus's Parquet files under `root` (see the module's docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..synthetic import make_notes

    pool = pa.array(make_notes(POOL_NOTES, seed, min_words=5, max_words=60))
    rng = np.random.default_rng(seed)
    id_type = pa.int64() if kind == "int64" else pa.string()
    schema = pa.schema([("note_id", id_type), ("subject_id", pa.int64()), ("text", pa.string())])
    root.mkdir(parents=True)
    files = []
    for k, start in enumerate(range(0, notes, FILE_ROWS)):
        files.append(root / f"notes-{k:05d}.parquet")
        stop = min(notes, start + FILE_ROWS)
        with pq.ParquetWriter(files[-1], schema, use_dictionary=["subject_id"]) as writer:
            for at in range(start, stop, GROUP_ROWS):
                end = min(stop, at + GROUP_ROWS)
                columns = [note_ids(at, end, kind), rng.integers(10_000, 100_000, end - at),
                           pool.take(rng.integers(0, len(pool), end - at))]  # fmt: skip
                writer.write_table(pa.table(columns, schema=schema), row_group_size=GROUP_ROWS)
    return files


def write_spec(root: Path) -> Path:
    """job.yaml over corpus/ and model/ (paths relative to it)."""
    import yaml

    spec = {
        "name": "scale-bench",
        "corpus": {"format": "parquet", "paths": ["corpus"], "id_column": "note_id"},
        "model": {"variant": "custom", "path": "model", "max_seq": 128},
        "device_pool": [{"name": "cpu", "device": "cpu", "actors": 1, "cpus_per_actor": 1,
                         "precision": "fp32", "batch_tokens": 4096}],
        "output": {"path": "run/out"},
        "run": {"shard_rows": GROUP_ROWS, "dry_run_notes": 300, "progress_interval_s": 60},
    }  # fmt: skip
    (root / "job.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root / "job.yaml"


def write_output(root: Path, kind: str, seed: int = 0) -> int:
    """output/: the finished job's output for verify, one part per shard of the real plan,
    the shard's own ids in its rows. Returns the number of parts."""
    from datetime import UTC, datetime

    from ..corpus import plan_shards
    from ..dispatch import DispatchOutcome
    from ..output import OutputDir
    from ..report import RunFacts, build_report
    from ..spec import load_spec

    spec = load_spec(root / "job.yaml")
    shards = plan_shards(spec.corpus, spec.staging_dir(), spec.run.shard_rows)
    out = OutputDir(str(root / "output"))
    spec_hash = spec.spec_hash()
    out.check_spec(spec_hash, spec.resolved_json(), overwrite=False)
    t0, started, results, at = time.monotonic(), datetime.now(UTC), [], 0
    for shard in shards:
        results.append(_write_part(out, shard, at, kind, spec_hash, seed))
        at += shard.num_rows
    facts = RunFacts(spec.name, spec_hash, out.uri, spec.device_pool, len(shards), started, t0)
    report = build_report(facts, [], DispatchOutcome(results, [], 0, 0))
    out.write_json("_report.json", report.to_json())
    out.mark_success()
    return len(shards)


def _write_part(out: Any, shard: Any, at: int, kind: str, spec_hash: str, seed: int) -> Any:
    """One shard's part (rows at..at + its rows), committed with its counts in the footer."""
    import numpy as np
    import pyarrow as pa

    from ..parts import ShardResult
    from ..rows import output_schema

    n = shard.num_rows
    rng = np.random.default_rng([seed, at])
    schema = output_schema(pa.int64() if kind == "int64" else pa.string(), [], DIMS, "float32",
                           embeddings=True, windows=False, mlm=False)  # fmt: skip
    tokens = rng.integers(8, 120, n)
    vectors = pa.array(rng.standard_normal(n * DIMS, dtype=np.float32))
    table = pa.table([note_ids(at, at + n, kind), pa.FixedSizeListArray.from_arrays(vectors, DIMS),
                      pa.array(tokens), pa.array(np.ones(n, np.int32)), pa.array(np.zeros(n, bool))],
                     schema=schema)  # fmt: skip
    result = ShardResult(shard.id, "cpu", "cpu-0", "fp32", rows_in=n, rows_out=n, output_rows=n,
                         windows=n, tokens=int(tokens.sum()), batches=1)  # fmt: skip
    meta = {"id_column": "note_id", "variant": "custom", "precision": "fp32",
            "pooling": "cls", "spec_hash": spec_hash}  # fmt: skip
    with out.part_writer(shard.id, schema, meta) as writer:
        writer.write(table)
        writer.commit(None, result.stats())
    return result


def make_files(root: Path, notes: int, kind: str) -> dict[str, Any]:
    """The cached files of `root` (made now when `_made.json` is missing): how long making
    them took, their sizes on disk."""
    if (root / MADE).is_file():
        return {**json.loads((root / MADE).read_text()), "cached": True}
    from clinicalbert_core.hub import prepare

    from ..synthetic import make_model

    shutil.rmtree(root, ignore_errors=True)  # a half-made one
    t0 = time.perf_counter()
    files = write_corpus(root / "corpus", notes, kind)
    corpus_s = time.perf_counter() - t0
    raw = make_model(root / "raw", hidden=32, layers=2, heads=4, max_positions=128, seed=3)
    prepare(raw, root / "model", variant="custom", lowercase=False)
    shutil.rmtree(raw)
    write_spec(root)
    t1 = time.perf_counter()
    parts = write_output(root, kind)
    made = {
        "notes": notes, "ids": kind, "files": len(files), "row_groups": _row_groups(files),
        "corpus_bytes": _size(root / "corpus"), "corpus_s": round(corpus_s, 2),
        "output_parts": parts, "output_bytes": _size(root / "output"),
        "output_s": round(time.perf_counter() - t1, 2),
    }  # fmt: skip
    (root / MADE).write_text(json.dumps(made, indent=2) + "\n")
    return {**made, "cached": False}


def _row_groups(files: list[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_row_groups for f in files)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---- the steps, each in its own process --------------------------------------------------------
def run_step(step: str, root: Path) -> dict[str, Any]:
    """`step` in a fresh process (a Ray temp dir of its own, removed after): its figures."""
    temp = tempfile.mkdtemp(prefix="rayscale-", dir="/tmp")  # short: AF_UNIX paths
    env = {**os.environ, "RAY_TMPDIR": temp, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "jobs.bench.scale", step, str(root)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    process_s = time.perf_counter() - t0
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or not lines[-1].startswith("{"):
        tail = "\n".join(done.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"scale step {step} exited {done.returncode}:\n{tail}")
    return {**json.loads(lines[-1]), "process_s": round(process_s, 2)}


def _cli(*argv: str) -> dict[str, Any]:
    """A `clinicalbert` command in this process; it must exit 0."""
    from ..cli import main as cli_main

    code = cli_main(list(argv))
    if code:
        raise RuntimeError(f"clinicalbert {argv[0]} exited {code}")
    return {}


def _plan(root: Path) -> dict[str, Any]:
    """A real run's planning (open_job, the Ray connection, plan_job) into a scratch output."""
    import ray

    from ..driver import open_job, plan_job
    from ..launch import connect
    from ..spec import load_spec

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    messages = _Messages()
    logging.getLogger("jobs").addHandler(messages)
    scratch = tempfile.mkdtemp(prefix="clinicalbert-scale-plan-")
    try:
        spec = load_spec(root / "job.yaml", overrides=[f"output.path={scratch}/out"])
        t0 = time.perf_counter()
        with open_job(spec) as job:
            t1 = time.perf_counter()
            connect("local")
            t2 = time.perf_counter()
            plan = plan_job(job, spec.device_pool)
            t3 = time.perf_counter()
        with open_job(spec) as job:  # a resume's planning: the corpus unchanged, its verdict kept
            plan_job(job, spec.device_pool)
            t4 = time.perf_counter()
        ray.shutdown()
        t5 = time.perf_counter()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ids = messages.seconds(r"ids checked for repeats \(([\d.]+)s\)")
    kept = any("the corpus is unchanged since" in line for line in messages.lines)
    return {"open_s": round(t1 - t0, 2), "ray_start_s": round(t2 - t1, 2),
            "plan_s": round(t3 - t2, 2), "ids_s": ids, "resume_plan_s": round(t4 - t3, 2),
            "resume_ids": "verdict kept" if kept else "ids read again",
            "ray_stop_s": round(t5 - t4, 2),
            "shards": len(plan.shards), "rows": sum(s.num_rows for s in plan.shards)}  # fmt: skip


class _Messages(logging.Handler):
    """The log messages of a step (the driver logs its own timings)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def seconds(self, pattern: str) -> float | None:
        """The number `pattern`'s group holds in the last message it matches."""
        found = [float(m.group(1)) for line in self.lines if (m := re.search(pattern, line))]
        return found[-1] if found else None


def step_main(argv: list[str]) -> int:
    """`python -m jobs.bench.scale STEP DIR`: one step; its figures as the last stdout line."""
    step, root = argv[0], Path(argv[1])
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    if step == "validate":
        detail = _cli("validate", str(root / "job.yaml"))
    elif step == "dry-run":
        detail = _cli("run", "--dry-run", str(root / "job.yaml"))
    elif step == "plan":
        detail = _plan(root)
    elif step == "verify":
        detail = _cli("verify", str(root / "output"))
    else:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    wall = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: a child spawned by vfork (Python's subprocess) carries its
    # parent's peak in ru_maxrss across exec; VmHWM is this process's own address space's
    peak = _status_kib("VmHWM")
    sys.stdout.flush()
    print(json.dumps({"step": step, "wall_s": round(wall, 2), "rss_before_kib": before,
                      "peak_rss_kib": peak, **detail}))  # fmt: skip
    return 0


def _status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


# ---- the whole benchmark -----------------------------------------------------------------------
def scale_bench(
    notes: int, ids: str, cache: str | None, actors: int, shards: int
) -> dict[str, Any]:
    """The files (made or cached), each step's figures, and the dispatcher's."""
    from .dispatch import dispatch_bench

    root = Path(cache).expanduser() if cache else default_cache()
    root = root / f"scale-{notes}-{ids}"
    made = make_files(root, notes, ids)
    steps = {step: run_step(step, root) for step in STEPS}
    return {"dir": str(root), "made": made, "steps": steps,
            "dispatch": dispatch_bench(actors, shards)}  # fmt: skip


def print_scale(result: dict[str, Any]) -> None:
    from .dispatch import print_dispatch

    m, mib = result["made"], 1 << 20
    how = "cached" if m["cached"] else f"made in {m['corpus_s'] + m['output_s']:.1f}s"
    print(f"scale: {m['notes']:,} notes ({m['ids']} ids) in {m['files']} Parquet files, "
          f"{m['row_groups']:,} row groups of up to {GROUP_ROWS:,} rows, "
          f"{m['corpus_bytes'] / mib:,.1f} MiB; output {m['output_parts']:,} parts, "
          f"{m['output_bytes'] / mib:,.1f} MiB ({how}: corpus {m['corpus_s']:.1f}s, output "
          f"{m['output_s']:.1f}s) in {result['dir']}")  # fmt: skip
    print(f"  {'step':<9} {'wall':>9} {'process':>9} {'driver peak RSS':>16} {'RSS at start':>13}")
    for name, s in result["steps"].items():
        line = (f"  {name:<9} {s['wall_s']:>8.2f}s {s['process_s']:>8.2f}s "
                f"{s['peak_rss_kib'] / 1024:>12,.0f} MiB {s['rss_before_kib'] / 1024:>9,.0f} MiB")  # fmt: skip
        if name == "plan":
            line += (f"  (open_job {s['open_s']:.2f}s, Ray start {s['ray_start_s']:.2f}s, "
                     f"plan_job {s['plan_s']:.2f}s of which ids {s['ids_s']}s, Ray stop "
                     f"{s['ray_stop_s']:.2f}s; {s['shards']:,} shards; a resume's plan_job "
                     f"{s['resume_plan_s']:.2f}s, {s['resume_ids']})")  # fmt: skip
        print(line)
    print_dispatch(result["dispatch"])


if __name__ == "__main__":
    raise SystemExit(step_main(sys.argv[1:]))
