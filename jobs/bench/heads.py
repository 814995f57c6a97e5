"""`clinicalbert bench --heads`: what the task heads cost next to vectors only.

One synthetic corpus (long notes among them, cut into windows) and one random BERT; the sequence
classifier (a one-logit readmission head, windows aggregated `huang`) and the token classifier
(de-identification labels, aggregation `simple`, with and without redaction) are built from the
same base weights, so every side runs the same encoder on the same tokens. Each side is timed
three ways: the runner loop as one of the job's actors runs it (one thread; tokenize ->
encode_windows -> aggregate_vectors -> the head's note_classes or group_entities [+
redact_notes], unit by unit), in wall and CPU seconds; the actor's own code (ShardProcessor, no
Ray: reading, rows and Parquet parts included), in wall and CPU seconds; and the full job (local
Ray, as `--job`), in wall seconds and in its actors' busy seconds. Sides are interleaved round
by round (vectors, classify, tokens, tokens+redact, vectors, ...), so each ratio to vectors only
is measured side by side; notes/s are given for the best and the median round, and the targets
are checked on the best. CPU seconds of one thread are what a busy shared machine disturbs
least. Then one unit of the token path is split into its parts (stitch, Subwords.flags, group,
redact) to show where its time goes.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinicalbert_core.runner import ClinicalBertRunner

from .job import BUDGET, MAX_SEQ, _corpus_model_spec

STRIDE = 32  # as --job's spec


@dataclass(frozen=True)
class Side:
    """One side: the checkpoint it loads (make_task_model's task; None: the base model), the
    job spec's heads section, and its target as a fraction of vectors-only throughput."""

    name: str
    task: str | None
    heads: dict[str, Any] = field(default_factory=dict)
    target: float | None = None


SIDES = (
    Side("vectors", None),
    Side("classify", "readmission", {"classify": {"aggregate": "huang"}}, 0.97),
    Side("tokens", "deid", {"tokens": {"aggregation": "simple"}}, 0.90),
    Side("tokens+redact", "deid", {"tokens": {"aggregation": "simple", "redact": True}}, 0.90),
)


def heads_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every side's notes/s in the runner loop, the actor's code and the full job, the
    ratios to vectors only against their targets, and one unit's token path in its parts."""
    import pyarrow.parquet as pq

    root = Path(tempfile.mkdtemp(prefix="clinicalbert-headsbench-"))
    load_before, threads = os.getloadavg(), torch.get_num_threads()
    try:
        cpus = os.cpu_count() or 2
        setup = argparse.Namespace(job_notes=args.heads_notes, job_hidden=args.job_hidden,
                                   job_layers=args.job_layers)  # fmt: skip
        corpus, base, spec = _corpus_model_spec(setup, root, cpus)
        models = _task_models(root, base)
        specs = side_specs(spec, models)
        texts = pq.read_table(corpus, columns=["text"])["text"].to_pylist()
        torch.set_num_threads(1)  # as each of the job's actors (cpus_per_actor 1)
        result = runner_loop(models, texts, args.heads_rounds)
        wall, cpu = actor_code(specs, models, root, args.heads_rounds)
        torch.set_num_threads(threads)
        expect = (len(texts), result["tokens"])
        jobs, busy = _jobs(specs, root, cpus, args.heads_rounds, expect)
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)
    n = len(texts)
    return result | {
        "cpu": cpu_name(), "cpus": cpus, "rounds": args.heads_rounds,
        "model": f"hidden {args.job_hidden}, {args.job_layers} layers, fp32",
        "actor_code": summary(wall, n), "actor_code_cpu": summary(cpu, n),
        "job": summary(jobs, n), "job_actors_busy": summary(busy, n),
        "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
    }  # fmt: skip


def runner_loop(models: dict[str | None, Path], texts: list[str], rounds: int) -> dict[str, Any]:
    """The runner loop of every side, unit by unit as an actor cuts the notes, sides
    interleaved: wall and CPU seconds; then the token path's parts on the first unit."""
    from ..feed import UNIT_BATCHES, cut_runs

    units = cut_runs(list(range(len(texts))), [len(t) for t in texts], UNIT_BATCHES * BUDGET)
    units = [[texts[i] for i in unit] for unit in units]  # the notes of each actor's unit
    runners = {s.name: _runner(models[s.task], s) for s in SIDES}
    windows = runners["vectors"].tokenize(texts)
    loops = {s.name: _loop(runners[s.name], s, units) for s in SIDES}
    wall, cpu = _interleaved(loops, rounds, warm=lambda run: run(texts[:8]))
    return {
        "notes": len(texts), "windows": windows.num_windows, "tokens": int(windows.lengths.sum()),
        "units": len(units), "runner_loop": summary(wall, len(texts)),
        "runner_loop_cpu": summary(cpu, len(texts)),
        "token_parts_s": token_parts(runners["tokens+redact"], runners["vectors"], units[0]),
        "token_parts_notes": len(units[0]),
    }  # fmt: skip


def side_specs(spec: Any, models: dict[str | None, Path]) -> dict[str, dict[str, Any]]:
    """name -> the job spec (a mapping) of each side: --job's, with the side's model and heads."""
    base = spec.model_dump(mode="json", exclude_unset=True)
    path = lambda s: {"path": str(models[s.task])}  # noqa: E731
    return {s.name: base | {"heads": s.heads, "model": base["model"] | path(s)} for s in SIDES}


def actor_code(
    specs: dict[str, dict[str, Any]], models: dict[str | None, Path], root: Path, rounds: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Every shard through the actor's own code (`ShardProcessor.process`: read, tokenize
    ahead in a thread, encode, the heads, Arrow rows, Parquet part) in this process, without
    Ray, sides interleaved: wall and CPU seconds of each round."""
    from clinicalbert_core.hub import ModelBundle

    from ..actor import ShardProcessor
    from ..corpus import plan_shards
    from ..spec import parse_spec

    runs: dict[str, Callable[..., Any]] = {}
    for s in SIDES:
        spec = parse_spec(specs[s.name] | {"output": {"path": str(root / "actor" / s.name)}}, root)
        shards = plan_shards(spec.corpus, str(root / "actor-staging"), spec.run.shard_rows)
        processor = ShardProcessor(ModelBundle.load(models[s.task]), spec, spec.device_pool[0])
        runs[s.name] = partial(_process, processor, shards)
    return _interleaved(runs, rounds, warm=lambda run: run(1))


def _process(processor: Any, shards: list[Any], only: int | None = None) -> None:
    """The first `only` (default all) of `shards` through `processor`; a part rewritten in a
    later round replaces the earlier one."""
    for shard in shards[:only]:
        processor.process(shard)


def _task_models(root: Path, base: Path) -> dict[str | None, Path]:
    """task -> prepared model dir: the base (None) and each side's classifier from its weights."""
    from clinicalbert_core.hub import prepare

    from ..synthetic import make_task_model

    models: dict[str | None, Path] = {None: base}
    for task in {s.task for s in SIDES} - {None}:
        raw = make_task_model(root / "raw", root / f"raw_{task}", task)
        models[task] = prepare(raw, root / task, variant="custom", lowercase=False)
    return models


def _runner(model: Path, side: Side) -> ClinicalBertRunner:
    """The runner an actor of --job's pool loads for `side`'s heads."""
    heads: dict[str, Any] = {"classify": True} if side.task is not None else {}
    if "classify" in side.heads:
        heads["class_aggregate"] = side.heads["classify"]["aggregate"]
    return ClinicalBertRunner.load(model, precision="fp32", max_seq=MAX_SEQ, long_notes="windows",
                                   stride=STRIDE, batch_tokens=BUDGET, **heads)  # fmt: skip


def _loop(runner: ClinicalBertRunner, side: Side, units: list[list[str]]) -> Callable[..., None]:
    """The runner loop of `side` (an actor's `_encode` without the Arrow rows): one call runs
    `units` unit by unit (or the `notes` given, as one unit)."""
    from clinicalbert_core.classify import HUANG_C, note_classes
    from clinicalbert_core.redact import redact_notes

    classify, tokens = side.heads.get("classify"), side.heads.get("tokens")
    how = classify["aggregate"] if classify else None
    aggregation = tokens["aggregation"] if tokens else None

    def run(notes: list[str] | None = None) -> None:
        for texts in units if notes is None else [notes]:
            windows = runner.tokenize(texts)
            out = runner.encode_windows(windows)
            runner.aggregate_vectors(windows, out.vectors)
            if classify is not None:
                note_classes(out.class_logits, windows, runner.task, how, 0.5, HUANG_C)
            if tokens is not None:
                found = runner.group_entities(texts, windows, out.token_logits, aggregation)
                if tokens.get("redact"):
                    redact_notes(texts, found)

    return run


def _interleaved(
    runs: dict[str, Callable[..., Any]], rounds: int, warm: Callable[[Callable[..., Any]], Any]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """name -> seconds of each round, wall and this process's CPU: `warm(run)` once per side,
    then `rounds` rounds in which every side runs once in turn (A B C A B C ...)."""
    for run in runs.values():
        warm(run)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu


def token_parts(
    runner: ClinicalBertRunner, vectors: ClinicalBertRunner, texts: list[str], repeats: int = 3
) -> dict[str, float]:
    """Best seconds of each step of the token path (tokens + redact) on one unit's notes over
    `repeats` runs of the chain, its head's own steps split as `group_entities` runs them;
    and, for reference, the vectors-only runner's encode_windows of the same windows
    ('encode_windows, vectors only'), timed in the same runs."""
    from clinicalbert_core.entities import NoteTokens, Subwords, group
    from clinicalbert_core.redact import redact_notes
    from clinicalbert_core.stitch import stitch

    subwords = Subwords.of(runner.tokenizer.tokenizer)
    state: dict[str, Any] = {}

    def tokens() -> NoteTokens:
        w, (take, offsets) = state["windows"], state["stitch"]
        return NoteTokens(w.ids[take], w.token_char[take].astype(np.int64),
                          w.token_end[take].astype(np.int64), state["out"].token_logits[take],
                          offsets)  # fmt: skip

    steps: dict[str, Callable[[], Any]] = {
        "tokenize": lambda: runner.tokenize(texts),
        "encode_windows": lambda: runner.encode_windows(state["windows"]),
        "aggregate_vectors": lambda: runner.aggregate_vectors(state["windows"],
                                                              state["out"].vectors),
        "stitch": lambda: stitch(state["windows"], runner.tokenizer.step),
        "gather stitched tokens": tokens,
        "Subwords.flags": lambda: subwords.flags(texts, state["tokens"]),
        "group": lambda: group(state["tokens"], state["flags"], runner.task.labels, "simple"),
        "redact_notes": lambda: redact_notes(texts, state["entities"]),
        "encode_windows, vectors only": lambda: vectors.encode_windows(state["windows"]),
    }  # fmt: skip
    keys = {"tokenize": "windows", "encode_windows": "out", "stitch": "stitch",
            "gather stitched tokens": "tokens", "Subwords.flags": "flags",
            "group": "entities"}  # fmt: skip
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):  # the whole chain each time: both encodes interleaved
        for name, step in steps.items():
            t0 = time.perf_counter()
            value = step()
            best[name] = min(best[name], time.perf_counter() - t0)
            if name in keys:
                state[keys[name]] = value
    return best


def _jobs(
    specs: dict[str, dict[str, Any]], root: Path, cpus: int, rounds: int, expect: tuple[int, int]
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """name -> seconds of each round of the full job (`run_job`, local Ray: this process's, or
    one started here for the duration), sides interleaved: wall, and the actors' busy seconds
    (the report's per-pool busy_s: shards only, no planning or actor start). `expect`: the
    corpus's notes and tokens, which every job must report."""
    import ray

    from ..driver import run_job
    from ..spec import parse_spec

    busy: dict[str, list[float]] = {s.name: [] for s in SIDES}

    def run(name: str) -> None:
        out = root / "out" / name
        report = run_job(parse_spec(specs[name] | {"output": {"path": str(out)}}, root))
        shutil.rmtree(out)
        if (report["rows_out"], report["tokens"]) != expect:
            raise RuntimeError(f"--heads job {name}: {report['rows_out']} notes and "
                               f"{report['tokens']} tokens, expected {expect}")  # fmt: skip
        busy[name].append(sum(p["busy_s"] for p in report["per_pool"].values()))

    runs = {s.name: partial(run, s.name) for s in SIDES}
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level=logging.WARNING)  # fmt: skip
    try:
        return _interleaved(runs, rounds, warm=lambda run: None)[0], busy
    finally:
        if started:
            ray.shutdown()


def summary(times: dict[str, list[float]], notes: int) -> dict[str, dict[str, Any]]:
    """Each side's seconds per round, notes/s of its best and median round, their ratios to
    vectors only (the first side's), its target and whether the best round meets it."""
    base = times[SIDES[0].name]
    rows: dict[str, dict[str, Any]] = {}
    for s in SIDES:
        t = times[s.name]
        best, median = notes / min(t), notes / statistics.median(t)
        ratio = min(base) / min(t)
        rows[s.name] = {
            "seconds": t, "notes_s_best": best, "notes_s_median": median, "ratio_best": ratio,
            "ratio_median": statistics.median(base) / statistics.median(t), "target": s.target,
            "met": None if s.target is None else ratio >= s.target,
        }  # fmt: skip
    return rows


def cpu_name() -> str:
    """/proc/cpuinfo's model name ('unknown' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def print_heads(r: dict[str, Any]) -> None:
    """heads_bench's figures: one block per view, then the token path's parts."""
    print(f"task heads vs vectors only on {r['cpus']} CPUs ({r['cpu']}; {r['model']}; "
          f"{r['notes']:,} notes, {r['windows']:,} windows, {r['tokens']:,} tokens; "
          f"{r['rounds']} interleaved rounds):")  # fmt: skip
    print(f"  load average (1 min) {r['load_average_before']:.2f} before, "
          f"{r['load_average_after']:.2f} after")  # fmt: skip
    for key, what in (
        ("runner_loop", f"runner loop (1 thread, {r['units']} units), wall"),
        ("runner_loop_cpu", "runner loop, per CPU second of this process"),
        ("actor_code", "the actor's code, every shard (1 thread, no Ray), wall"),
        ("actor_code_cpu", "the actor's code, per CPU second of this process"),
        ("job", f"full job ({r['cpus']} actors x 1 thread, local Ray), wall"),
        ("job_actors_busy", "full job, per second of actor busy time (shards only)"),
    ):
        print(f"  {what}: notes/s best / median, ratio to vectors only best / median")
        for name, row in r[key].items():
            met = "met" if row["met"] else "NOT MET"
            target = "" if row["target"] is None else f"  target >= {row['target']:.2f}: {met}"
            print(f"    {name:<14} {row['notes_s_best']:8.1f} / {row['notes_s_median']:8.1f}"
                  f"  {row['ratio_best']:.3f} / {row['ratio_median']:.3f}{target}")  # fmt: skip
    parts = r["token_parts_s"]
    total = sum(v for k, v in parts.items() if k != "encode_windows, vectors only")
    print(f"  token path on one unit ({r['token_parts_notes']} notes), best of 3, share of "
          f"{1000 * total:.0f} ms:")  # fmt: skip
    for name, seconds in parts.items():
        share = "" if name == "encode_windows, vectors only" else f"{100 * seconds / total:5.1f}%"
        print(f"    {name:<30} {1000 * seconds:9.1f} ms  {share}")
