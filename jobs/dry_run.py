"""`clinicalbert run --dry-run`: the job's steps over a sample, on a private local Ray.

The sample is the first `run.dry_run_notes` notes of the corpus (in shard order), run by the
spec's pools shrunk to this machine (GPU or Apple GPU pools are skipped where there is none)
into a scratch output dir, which is removed afterwards. What comes back: the sample's rates
and token lengths, and the projected wall time of the whole corpus per pool of the spec at its
full size, and staging's rate and the whole corpus's staging time. Staged inputs go where the
real job stages them, so the real run reuses them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from typing import Any

import numpy as np
import pyarrow.compute as pc

from clinicalbert_core.limits import body_tokens

from .corpus import Shard, idle_actors_warning, limit_shards
from .corpus.staging import staging_times
from .dispatch import fmt_duration
from .driver import Plan, execute, open_job, plan_job, report_of
from .launch import connect
from .output import OutputDir
from .spec import JobSpec, PoolSpec

log = logging.getLogger(__name__)


def dry_run_job(spec: JobSpec, on_result: Any = None) -> dict[str, Any]:
    """Run the sample; returns its report (the scratch output's counts) with `dry_run`: the
    rates, token lengths and projections (see `summary`). Nothing is left of the scratch
    output; staged inputs stay for the real run."""
    scratch = tempfile.mkdtemp(prefix=f"clinicalbert-dry-run-{spec.name}-")
    sample = spec.model_copy(update={"output": spec.output.model_copy(update={"path": scratch})})
    sampled = spec.corpus.model_copy(update={"limit": spec.run.dry_run_notes})
    full: list[Shard] = []

    def pick_sample(shards: list[Shard]) -> list[Shard]:  # the corpus is planned once
        full.extend(shards)
        return limit_shards(shards, sampled)

    try:
        with open_job(sample, staging=spec.staging_dir()) as job:
            connect("local")
            plan = plan_job(job, pools_here(spec.device_pool), limit=pick_sample)
            outcome = execute(plan, on_result)
            report = report_of(plan, outcome)
            report.dry_run = summary(spec, full, report.to_json(), _note_tokens(plan))
            report.dry_run["staging"] = staging_summary(staging_times(plan.staged))
        return report.to_json()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the sample's scratch output


def pools_here(pools: tuple[PoolSpec, ...]) -> tuple[PoolSpec, ...]:
    """The spec's pools shrunk to the local Ray's CPUs and GPUs (a warning per pool left out);
    RuntimeError when none can run here."""
    import ray
    import torch

    res = ray.cluster_resources()
    mps = torch.backends.mps.is_available()
    here = scale_pools(pools, int(res.get("CPU", 1)), int(res.get("GPU", 0)), mps)
    if not here:
        raise RuntimeError("dry run: no pool of the spec can run on this machine")
    kept = {p.name for p in here}
    for pool in pools:
        if pool.name not in kept:
            what = "Apple GPU (mps)" if pool.device == "mps" else "GPU"
            log.warning("dry run: pool %s skipped (no %s on this machine)", pool.name, what)
    return here


def scale_pools(
    pools: tuple[PoolSpec, ...], cpus: int, gpus: int, mps: bool = False
) -> tuple[PoolSpec, ...]:
    """The spec's pools shrunk to fit one machine (dry runs): GPU pools need a GPU here, mps
    pools an Apple GPU (`mps`)."""
    scaled: list[PoolSpec] = []
    cpu_left = max(cpus - 1, 1)  # leave a core to the driver
    for pool in pools:
        if pool.device == "mps" and not mps:
            continue
        if pool.device == "cuda":
            if gpus:
                scaled.append(pool.model_copy(update={"actors": min(pool.actors, gpus)}))
            continue
        per = min(pool.cpus_per_actor, cpu_left)
        actors = max(1, min(pool.actors, cpu_left // per))
        scaled.append(pool.model_copy(update={"actors": actors, "cpus_per_actor": per}))
    return tuple(scaled)


def _note_tokens(plan: Plan) -> np.ndarray:
    """Each sampled note's word pieces, from the scratch parts' `n_tokens` (per window rows:
    a note's last window starts window_index x the window step into the note)."""
    spec = plan.job.spec
    table = OutputDir(spec.output.path).read_table()
    if table is None or not table.num_rows:
        return np.zeros(0, np.int64)
    tokens = table["n_tokens"].to_numpy().astype(np.int64)
    if "window_index" not in table.column_names:
        return tokens
    step = body_tokens(spec.model.max_seq) - spec.model.long_notes.stride
    ends = tokens + table["window_index"].to_numpy().astype(np.int64) * step
    last = pc.equal(table["window_index"], pc.subtract(table["n_windows"], 1))
    return ends[last.to_numpy(zero_copy_only=False)]


def summary(
    spec: JobSpec, full_shards: list[Shard], report: dict[str, Any], lengths: np.ndarray
) -> dict[str, Any]:
    """Rates of the sample, token lengths, and the projected wall time of the whole corpus."""
    notes, rows_in, tokens = report["rows_out"], report["rows_in"], report["tokens"]
    corpus_rows = sum(s.num_rows for s in full_shards)
    kept = (notes / rows_in) if rows_in else 0.0  # share of rows that become notes
    corpus_tokens = corpus_rows * kept * (tokens / notes if notes else 0.0)
    # one throughput figure: the sample's actors together, per second of their busy time
    # (Ray and model start-up excluded), the same rates the projections scale from
    rate = sum(a["tokens_per_busy_s"] for a in report["per_actor"].values())
    tokens_per_note = tokens / notes if notes else 0.0
    out: dict[str, Any] = {
        "sampled_rows": rows_in,
        "sampled_notes": notes,
        "notes_per_s": rate / tokens_per_note if tokens_per_note else 0.0,
        "tokens_per_s": rate,
        "windows_per_note": report["windows"] / notes if notes else 0.0,
        "corpus_rows": corpus_rows,
        "corpus_tokens_estimate": int(corpus_tokens),
        "shards": len(full_shards),
        "idle_actors": idle_actors_warning(full_shards, sum(p.actors for p in spec.device_pool)),
    }
    if len(lengths):
        out["token_length"] = {
            "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
            "share_over_max_seq": float((lengths > body_tokens(spec.model.max_seq)).mean()),
        }  # fmt: skip
    out |= _projection(spec, report, corpus_tokens)
    return out


def _projection(spec: JobSpec, report: dict[str, Any], corpus_tokens: float) -> dict[str, Any]:
    """Per pool of the *spec* (full size): measured tokens per busy second of one actor of
    the same pool, times the spec's actor count."""
    per_actor_rate: dict[str, list[float]] = {}
    precisions: dict[str, set[str]] = {}
    for a in report["per_actor"].values():
        per_actor_rate.setdefault(a["pool"], []).append(a["tokens_per_busy_s"])
        precisions.setdefault(a["pool"], set()).add(a["precision"])
    projection: dict[str, Any] = {}
    total_rate = 0.0
    for pool in spec.device_pool:
        rates = per_actor_rate.get(pool.name)
        if not rates:
            projection[pool.name] = {"measured": False}
            continue
        rate = float(np.mean(rates)) * pool.actors
        total_rate += rate
        projection[pool.name] = {
            "measured": True, "tokens_per_s": rate,
            "precisions": sorted(precisions[pool.name]),
            "hours_alone": corpus_tokens / rate / 3600 if rate else None,
        }  # fmt: skip
    together = corpus_tokens / total_rate / 3600 if total_rate else None
    return {"projection": projection, "projected_hours_all_measured_pools": together}


def staging_summary(times: list[dict[str, float]]) -> dict[str, Any] | None:
    """Staging's rate per task (the input's bytes as stored, .gz compressed; and the Arrow
    bytes read), measured staging each input (by this dry run, or as its completion marker
    recorded), and the whole corpus's staging time on the real run: with a task per input,
    the slowest input's; in one task, their sum. None where nothing is staged (Parquet)."""
    if not times:
        return None
    seconds = sum(t["seconds"] for t in times) or 1e-9
    mb = lambda key: sum(t[key] for t in times) / 1e6  # noqa: E731
    return {
        "inputs": len(times), "input_mb": mb("input_bytes"), "data_mb": mb("data_bytes"),
        "input_mb_per_s": mb("input_bytes") / seconds, "data_mb_per_s": mb("data_bytes") / seconds,
        "projected_s_task_per_input": max(t["seconds"] for t in times),
        "projected_s_one_task": seconds,
    }  # fmt: skip


def print_dry_run(report: dict[str, Any]) -> None:
    d = report["dry_run"]
    print(f"dry run sample: {d['sampled_notes']:,} notes ({d['sampled_rows']:,} rows), "
          f"{d['notes_per_s']:.1f} notes/s = {d['tokens_per_s']:,.0f} tokens/s (its actors "
          f"together, start-up excluded), {d['windows_per_note']:.2f} windows/note")  # fmt: skip
    if "token_length" in d:
        t = d["token_length"]
        print(f"token length per note: p50 {t['p50']:.0f}, p95 {t['p95']:.0f}, max {t['max']}, "
              f"{100 * t['share_over_max_seq']:.1f}% over max_seq")  # fmt: skip
    print(f"full corpus: {d['corpus_rows']:,} rows, ~{d['corpus_tokens_estimate']:,} tokens, "
          f"{d['shards']:,} shards")  # fmt: skip
    if d["idle_actors"]:
        print(f"  warning: {d['idle_actors']}")
    if s := d.get("staging"):
        print(f"  staging: {s['input_mb_per_s']:,.1f} MB/s of input per task ({s['data_mb_per_s']:,.1f} "
              f"MB/s of the columns read), {s['input_mb']:,.1f} MB in {s['inputs']:,} inputs: "
              f"{fmt_duration(s['projected_s_task_per_input'])} with a task per input, "
              f"{fmt_duration(s['projected_s_one_task'])} in one; encoding starts with the "
              "first chunk staged")  # fmt: skip
    for name, p in d["projection"].items():
        if not p["measured"]:
            print(f"  pool {name}: not measured here (its device is not on this machine)")
        else:
            print(f"  pool {name} ({'/'.join(p['precisions'])}): ~{p['tokens_per_s']:,.0f} "
                  f"tokens/s at full size -> {_hours(p['hours_alone'])} alone")  # fmt: skip
    if d["projected_hours_all_measured_pools"] is not None:
        print(f"  measured pools together: {_hours(d['projected_hours_all_measured_pools'])}")
    print("(the sample's scratch output was removed)")


def _hours(hours: float | None) -> str:
    return fmt_duration(None if hours is None else hours * 3600)
