"""`_report.json`: what a run did, built once from the run's shard results and written once.

Counts cover the whole output (shards committed by earlier runs included, read back from
their parts' footers); throughput and per-pool/per-actor figures cover this run. `check()`
proves every input row and every shard is accounted for exactly once.
"""

from __future__ import annotations

import time
from dataclasses import MISSING, asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any

from clinicalbert_core.errors import describe

from .dispatch import DispatchOutcome
from .parts import ShardResult
from .reasons import ROW_REASONS
from .spec import PoolSpec

_LEFT_OUT_WHEN_NONE = ("repeated_ids", "empty", "dry_run")


@dataclass
class Report:
    """`_report.json`: counts cover the whole output (shards committed by earlier runs
    included); per-pool/per-actor figures, retries and wall time cover this run."""

    name: str
    spec_hash: str
    rows_in: int  # input rows read (before corpus.where)
    rows_out: int  # notes written; a note with one row per window counts once
    error_rows: int
    filtered_rows: int  # dropped by corpus.where
    errors_by_reason: dict[str, int]
    nulled_values: dict[str, int]  # kept column -> values written as null (not UTF-8)
    windows: int
    tokens: int
    truncated_notes: int
    shards: dict[str, Any]  # total, committed_before, processed, failed (shard_id, attempts, error)
    retries: int
    actor_restarts: int
    stalls: list[dict[str, Any]]  # actors killed for making no progress: actor, shard, quiet_s
    interrupted: bool  # the run was stopped before its end: shards left are not counted
    per_pool: dict[str, dict[str, Any]]  # name -> device, actors, precisions, shards, rows, ...
    per_actor: dict[str, dict[str, Any]]  # name -> pool, precision, shards, rows, tokens, ...
    wall_s: float
    tokens_per_s: float
    started_at: str
    finished_at: str
    # what ended the run before its shards were done (interrupted: true), in one line:
    # "interrupted (Ctrl-C or SIGTERM)", "NodeLost: the local Ray node ... died", ...
    stop_reason: str | None = None  # absent from reports written before it existed
    # ids on more than one input row (run.allow_duplicate_ids): {"ids": n, "extra_rows": m}
    repeated_ids: dict[str, int] | None = None
    # the output's notes (earlier runs' parts too) by the precision their part ran in; "" for
    # a part whose counts did not record it. Absent from reports written before it existed
    notes_by_precision: dict[str, int] | None = None
    output: str | None = None  # output.path (absent from reports written before it existed)
    # why a finished run wrote no _SUCCESS although no shard failed: it wrote no note
    # ("wrote no note: ..."; run.allow_empty accepts that); null otherwise
    empty: str | None = None
    dry_run: dict[str, Any] | None = None  # a dry run's rates and projections (dry_run.py)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Report:
        """A report from `_report.json`'s content; unknown or missing keys are a ValueError."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING}
        unknown, missing = sorted(set(obj) - names), sorted(required - set(obj))
        if unknown or missing:
            raise ValueError(f"report keys: unknown {unknown}, missing {missing}")
        return cls(**obj)

    def to_json(self) -> dict[str, Any]:
        """The content of `_report.json` (optional facts a run does not have are left out)."""
        return {
            k: v for k, v in asdict(self).items() if not (v is None and k in _LEFT_OUT_WHEN_NONE)
        }

    def check(self) -> None:
        """Raise ValueError unless every input row and every shard is accounted for once."""
        problems = []
        if self.rows_in != self.rows_out + self.error_rows + self.filtered_rows:
            problems.append(
                f"rows_in {self.rows_in} != rows_out {self.rows_out} + error_rows "
                f"{self.error_rows} + filtered_rows {self.filtered_rows}"
            )
        if sum(self.errors_by_reason.values()) != self.error_rows:
            problems.append(
                f"errors_by_reason {self.errors_by_reason} do not sum to error_rows "
                f"{self.error_rows}"
            )
        by = self.notes_by_precision
        if by is not None and sum(by.values()) != self.rows_out:
            problems.append(f"notes_by_precision {by} do not sum to rows_out {self.rows_out}")
        if unknown := sorted(set(self.errors_by_reason) - set(ROW_REASONS)):
            problems.append(f"unknown reason codes {unknown}")
        s = self.shards
        done = s.get("committed_before", 0) + s.get("processed", 0) + len(s.get("failed", []))
        if missing := sorted({"total", "committed_before", "processed", "failed"} - set(s)):
            problems.append(f"shards lacks {missing}")
        elif s["total"] < done if self.interrupted else s["total"] != done:
            problems.append(
                f"shards total {s['total']} != committed_before {s['committed_before']} + "
                f"processed {s['processed']} + failed {len(s['failed'])}"
            )
        if problems:
            raise ValueError(f"report {self.name!r} does not add up: " + "; ".join(problems))


@dataclass
class RunFacts:
    """What a report needs of a run besides its shard results."""

    name: str
    spec_hash: str
    output: str
    pools: tuple[PoolSpec, ...]
    total_shards: int
    started: datetime
    t0: float  # time.monotonic() at the start


def build_report(
    run: RunFacts,
    earlier: list[ShardResult],
    outcome: DispatchOutcome,
    stop_reason: str | None = None,
    repeated: dict[str, int] | None = None,
) -> Report:
    """The report of a run: `earlier` are the results of shards committed by earlier runs,
    `outcome` this run's. Checked to add up (ValueError otherwise)."""
    results = outcome.results
    wall = time.monotonic() - run.t0
    everything = earlier + results
    total = lambda key: sum(getattr(r, key) for r in everything)  # noqa: E731
    report = Report(
        name=run.name, spec_hash=run.spec_hash,
        rows_in=total("rows_in"), rows_out=total("rows_out"), error_rows=total("error_rows"),
        filtered_rows=total("filtered_rows"),
        errors_by_reason=_summed(r.reasons for r in everything),
        nulled_values=_summed(r.nulled for r in everything),
        windows=total("windows"), tokens=total("tokens"), truncated_notes=total("truncated"),
        shards={
            "total": run.total_shards, "committed_before": len(earlier),
            "processed": len(results), "failed": [asdict(f) for f in outcome.failed],
        },
        retries=outcome.retries, actor_restarts=outcome.actor_restarts,
        stalls=list(outcome.stalls), interrupted=stop_reason is not None, stop_reason=stop_reason,
        per_pool=_per_pool(run.pools, results, wall), per_actor=_per_actor(results),
        notes_by_precision=_summed({r.precision: r.rows_out} for r in everything),
        wall_s=round(wall, 3),
        tokens_per_s=round(sum(r.tokens for r in results) / wall, 1) if wall else 0.0,
        started_at=run.started.isoformat(), finished_at=datetime.now(UTC).isoformat(),
        repeated_ids=repeated, output=run.output,
    )  # fmt: skip
    report.check()  # every row and shard accounted for once, or an error
    return report


def _summed(counts: Any) -> dict[str, int]:
    """Several {key: count} dicts added up."""
    out: dict[str, int] = {}
    for one in counts:
        for k, v in one.items():
            out[k] = out.get(k, 0) + v
    return out


def _per_pool(
    pools: tuple[PoolSpec, ...], results: list[ShardResult], wall: float
) -> dict[str, Any]:
    per_pool: dict[str, Any] = {}
    for p in pools:
        mine = [r for r in results if r.pool == p.name]
        tokens = sum(r.tokens for r in mine)
        per_pool[p.name] = {
            "device": p.device, "actors": p.actors, "shards": len(mine),
            "rows": sum(r.rows_in for r in mine), "tokens": tokens,
            "busy_s": round(sum(r.seconds for r in mine), 3),
            "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
            "precisions": sorted({r.precision for r in mine}),
        }  # fmt: skip
    return per_pool


def _per_actor(results: list[ShardResult]) -> dict[str, Any]:
    per_actor: dict[str, Any] = {}
    for r in results:
        a = per_actor.setdefault(
            r.actor,
            {"pool": r.pool, "precision": r.precision, "shards": 0, "rows": 0, "tokens": 0,
             "busy_s": 0.0},
        )  # fmt: skip
        a["shards"] += 1
        a["rows"] += r.rows_in
        a["tokens"] += r.tokens
        a["busy_s"] = round(a["busy_s"] + r.seconds, 3)
    for a in per_actor.values():
        a["tokens_per_busy_s"] = round(a["tokens"] / a["busy_s"], 1) if a["busy_s"] else 0.0
    return per_actor


def empty_reason(report: Report, allow_empty: bool) -> str | None:
    """Why a run that read rows but wrote none (no note, no error row) is not a success:
    corpus.where kept no row. None when it wrote something, or when run.allow_empty."""
    if allow_empty or not report.rows_in or report.rows_out or report.error_rows:
        return None
    return (
        f"wrote no note: {report.rows_in:,} rows read, {report.filtered_rows:,} "
        "dropped by corpus.where (check its values; run.allow_empty accepts this)"
    )


def stop_reason(stopped: BaseException) -> str:
    """What ended a run before its shards were done, in one line for `_report.json`."""
    if isinstance(stopped, KeyboardInterrupt):  # the CLI raises it for SIGTERM: "signal 15"
        return f"interrupted ({str(stopped) or 'Ctrl-C'})"
    return describe(stopped)
