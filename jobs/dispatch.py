"""Pull-based shard dispatch over heterogeneous actors, with retries and progress.

Every actor slot holds at most `max_in_flight` shards; when one finishes, that slot pulls the
next. A fast GPU actor therefore takes proportionally more shards than a slow CPU one, which
row-balanced splitting (`streaming_split`) cannot do (DESIGN.md, decision 1). A shard whose
actor died or whose processing raised goes back to the front of the queue until it has had
`max_attempts`; then it is recorded as failed and the rest of the job goes on. An actor that
could not start (its `__init__` raised) costs its shards no attempt: they wait for a live
actor, and the error says why the actor did not start.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from clinicalbert_core.errors import describe, message_line

from .parts import ShardResult

log = logging.getLogger(__name__)


@dataclass
class Slot:
    pool: str
    index: int
    handle: Any
    restarts: int = 0
    in_flight: int = 0
    alive: bool = True

    @property
    def name(self) -> str:
        return f"{self.pool}-{self.index}"


@dataclass
class FailedShard:
    """A shard none of whose rows were written: where its input is, and why."""

    shard_id: str
    attempts: int
    error: str
    source: str  # the input file it reads
    row_groups: list[int]  # of the Parquet file it reads (the input, or its staged copy)
    rows: int  # input rows it covers
    row_range: list[int] | None = None  # [start, stop) within its one row group, if a range

    @classmethod
    def of(cls, shard: Any, attempts: int, error: str) -> FailedShard:
        ranged = getattr(shard, "row_start", None) is not None
        return cls(shard.id, attempts, error, shard.source, list(shard.row_groups), shard.num_rows,
                   [shard.row_start, shard.row_stop] if ranged else None)  # fmt: skip

    def where(self) -> str:
        """One line naming the input (never its content)."""
        g = self.row_groups
        span = f"row group {g[0]}" if len(g) == 1 else f"row groups {g[0]}-{g[-1]}" if g else "-"
        if self.row_range:
            span = f"rows {self.row_range[0]:,}-{self.row_range[1] - 1:,} of {span}"
        return f"{self.source} ({span}, {self.rows:,} rows, shard {self.shard_id})"


@dataclass
class DispatchOutcome:
    results: list[ShardResult]
    failed: list[FailedShard]
    retries: int
    actor_restarts: int
    stalls: list[dict[str, Any]] = field(default_factory=list)  # actors killed as stalled


class Dispatcher:
    """Runs shards on actor slots. `submit(handle, shard)` returns a Ray ObjectRef.

    `ray_api` is what the dispatcher waits, gets and kills through: the `ray` module itself
    (default), or a fake with the same `wait`, `get` and `kill` (tests drive the scheduling
    without a cluster). An actor's death is a `ray.exceptions.RayActorError` from `get`, a
    shard's own error a `RayTaskError`."""

    def __init__(
        self,
        slots: list[Slot],
        submit: Callable[[Any, Any], Any],
        restart: Callable[[Slot], Any],
        max_attempts: int = 3,
        max_in_flight: int = 2,
        max_restarts: int = 2,
        on_result: Callable[[ShardResult, Slot], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        ray_api: Any = None,
        probe: Callable[[Any], Any] | None = None,
    ):
        self.slots, self.submit, self.restart, self.probe = slots, submit, restart, probe
        self.max_attempts, self.max_in_flight, self.max_restarts = (
            max_attempts, max_in_flight, max_restarts,
        )  # fmt: skip
        self.on_result, self.on_tick = on_result, on_tick
        if ray_api is None:
            import ray as ray_api
        self.ray = ray_api
        self.in_flight: dict[Any, tuple[Slot, Any, Any, int]] = {}  # ref -> slot, handle, ...
        self.pending: deque[tuple[Any, int]] = deque()  # (shard, its attempt), next first
        # one entry per free place of a slot (idle slots' places first): filling costs one
        # step per shard dispatched, whatever the number of slots
        self.places: deque[Slot] = deque(s for s in slots for _ in range(max_in_flight))
        # restarted actors not yet constructed: `probe(handle)`'s ref -> (slot, handle); such
        # a slot gets places only once it answers (a replacement with no room on the cluster
        # left, e.g. after a lost node, never holds shards the others could run)
        self.starting: dict[Any, tuple[Slot, Any]] = {}
        self.outcome = DispatchOutcome([], [], 0, 0)
        self.death = ""  # how the last actor that died died

    def run(
        self, shards: Sequence[Any], more: Callable[[float], list[Any] | None] | None = None
    ) -> DispatchOutcome:
        """Run every shard (retried up to max_attempts); returns what happened. `outcome`
        holds the results so far should this raise (Ctrl-C, an on_tick/on_result error).

        `more(timeout_s)`: shards that became ready since the last call (pipelined staging),
        waiting up to `timeout_s` for some when nothing else is to be waited on; None once
        no more will come. The run ends when those are done too."""
        self.pending = deque((s, 1) for s in shards)  # `outcome`: so far, also if interrupted
        while self.pending or self.in_flight or more is not None:
            self._fill()
            if not self.in_flight and not self.starting and self.pending:  # no live actor
                self._fail_pending()
                break
            if self.in_flight or self.starting:
                for ref in self._finished():
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._collect(ref)
            if more is not None and (new := more(0.0 if self.in_flight else 1.0)) is not None:
                self.pending.extend((s, 1) for s in new)
            elif more is not None:
                more = None
            if self.on_tick:
                self.on_tick()
        return self.outcome

    def _finished(self) -> list[Any]:
        """The shard tasks that have ended: waits up to a second for one, then takes every
        other that has ended too without waiting (one round per burst of results)."""
        ready, rest = self.ray.wait([*self.in_flight, *self.starting], num_returns=1, timeout=1.0)
        if ready and rest:
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def _fill(self) -> None:
        """Give the free places of live slots pending shards, in `places` order."""
        while self.pending and self.places:
            slot = self.places.popleft()
            if not slot.alive or slot.in_flight >= self.max_in_flight:
                continue  # a place of a dead slot, or one counted again at its restart
            shard, attempt = self.pending.popleft()
            ref = self.submit(slot.handle, shard)
            self.in_flight[ref] = (slot, slot.handle, shard, attempt)
            slot.in_flight += 1

    def _collect(self, ref: Any) -> None:
        """One finished shard task: its result, its error (retried) or its actor's death."""
        from ray.exceptions import RayActorError, RayTaskError

        slot, handle, shard, attempt = self.in_flight.pop(ref)
        if handle is slot.handle:  # refs of a replaced handle no longer count
            slot.in_flight -= 1
            self.places.append(slot)
        try:
            result: ShardResult = self.ray.get(ref)
        except RayActorError as e:
            if not _death_of(e, handle):  # an actor whose answer the attempt waited on (the
                raise RuntimeError(  # commit gate's trust) is gone: no attempt can be trusted
                    f"shard {shard.id}: an actor it depends on died, not its own actor "
                    f"{slot.name}: {message_line(e, last=True) or type(e).__name__}"
                ) from None
            self._actor_died(slot, handle, shard, attempt, e)
        except RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            self._retry_or_fail(shard, attempt, describe(cause))
        else:
            self.outcome.results.append(result)
            if self.on_result:
                self.on_result(result, slot)

    def _actor_died(self, slot: Slot, handle: Any, shard: Any, attempt: int, e: Exception) -> None:
        if getattr(e, "actor_init_failed", False):
            # its __init__ raised: the shard never ran and spends no attempt
            why = message_line(e, last=True) or type(e).__name__
            self.death = f"actor {slot.name} could not start: {why}"
            self.pending.appendleft((shard, attempt))
        else:
            self.death = f"actor {slot.name} died: {type(e).__name__}"
            self._retry_or_fail(shard, attempt, self.death)
        if handle is not slot.handle or not slot.alive:  # not the first news of this death
            return
        self._restart(slot)

    def _restart(self, slot: Slot) -> None:
        """A new actor for a slot whose actor died, up to max_restarts; its places come once
        it answers `probe` (at once without a probe)."""
        slot.alive, slot.in_flight = False, 0
        self.places = deque(p for p in self.places if p is not slot)  # the dead actor's
        if slot.restarts >= self.max_restarts:
            log.error("%s; restarted %d times already: left out", self.death, slot.restarts)
            return
        slot.handle, slot.alive = self.restart(slot), True
        slot.restarts += 1
        self.outcome.actor_restarts += 1
        log.warning("%s; restarted (%d)", self.death, slot.restarts)
        if self.probe is None:
            self.places.extend([slot] * self.max_in_flight)
        else:
            self.starting[self.probe(slot.handle)] = (slot, slot.handle)

    def _started(self, ref: Any) -> None:
        """A restarted actor answered its probe: its slot takes shards; or it could not
        start: restarted again (up to max_restarts)."""
        from ray.exceptions import RayActorError

        slot, handle = self.starting.pop(ref)
        try:
            self.ray.get(ref)
        except RayActorError as e:
            if handle is slot.handle and slot.alive:
                why = message_line(e, last=True) or type(e).__name__
                self.death = f"actor {slot.name} could not start: {why}"
                self._restart(slot)
            return
        if handle is slot.handle:
            self.places.extend([slot] * self.max_in_flight)

    def _retry_or_fail(self, shard: Any, attempt: int, error: str) -> None:
        if attempt < self.max_attempts:
            self.outcome.retries += 1
            log.warning("shard %s of %s attempt %d failed (%s); re-queued",
                        shard.id, shard.source, attempt, error)  # fmt: skip
            self.pending.appendleft((shard, attempt + 1))
        else:
            self.outcome.failed.append(FailedShard.of(shard, attempt, error))
            log.error("%s failed after %d attempts: %s", self.outcome.failed[-1].where(),
                      attempt, error)  # fmt: skip

    def _fail_pending(self) -> None:
        """No live actor is left: every pending shard fails with the last death as reason."""
        death = self.death
        why = f"no live actor left (the last: {death})" if death else "no live actor left"
        log.error("%d shards not run: %s", len(self.pending), why)
        for shard, attempt in self.pending:
            self.outcome.failed.append(FailedShard.of(shard, attempt - 1, why))
        self.pending.clear()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Kill every actor and wait until each in-flight shard's task has ended (its result,
        or the actor's death): once this returns, no actor of this run can still commit."""
        for slot in self.slots:
            self.ray.kill(slot.handle)
        if self.in_flight:
            self.ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=timeout_s)


def _death_of(e: Exception, handle: Any) -> bool:
    """Whether the actor death `e` (RayActorError) is that of `handle`'s actor; True where
    either id is unknown (Ray names the dead actor; fakes in tests may not)."""
    dead = getattr(e, "actor_id", None)
    own = getattr(handle, "_actor_id", None)
    return dead is None or own is None or dead == own.hex()


class Progress:
    """Rows, tokens/s per pool and ETA: a tqdm bar on a terminal, else one line per interval."""

    def __init__(
        self,
        total_rows: int,
        interval_s: float = 10.0,
        stream: Any = None,
        total_shards: int = 0,
        poll: Callable[[], list[dict[str, Any]]] | None = None,
        staging: bool = False,
    ):
        """poll(): counts of the shards in progress (rows_in, rows_out, error_rows,
        filtered_rows), so the line moves inside long shards too. `staging`: the totals are
        what is staged so far, and grow (`grow`) until staging ends."""
        self.total, self.interval, self.total_shards = total_rows, interval_s, total_shards
        self.poll, self.staging = poll, staging
        self.partial: list[dict[str, Any]] = []
        self.stream = stream or sys.stderr
        self.rows = self.notes = self.errors = self.filtered = self.shards = 0
        self.tokens: dict[str, int] = {}
        self.pool_rows: dict[str, int] = {}
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_rows, unit="note", file=self.stream, dynamic_ncols=True,
                            desc="staging" if staging else None)  # fmt: skip

    def grow(self, rows: int, shards: int, staging: bool) -> None:
        """More rows and shards to run (a staged chunk's); `staging`: more may come."""
        self.total += rows
        self.total_shards += shards
        self.staging = staging
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.set_description("staging" if staging else None)
            self.bar.refresh()

    def update(self, result: ShardResult, slot: Slot | None = None) -> None:
        self.partial = []  # a committed shard's counts are in the totals now
        self.rows += result.rows_in
        self.notes += result.rows_out
        self.errors += result.error_rows
        self.filtered += result.filtered_rows
        self.shards += 1
        self.tokens[result.pool] = self.tokens.get(result.pool, 0) + result.tokens
        self.pool_rows[result.pool] = self.pool_rows.get(result.pool, 0) + result.rows_in
        if self.bar is not None:
            self.bar.update(result.rows_in)
            self.bar.set_postfix_str(self._rates())
        self.tick()

    def _rates(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return ", ".join(
            f"{p} {self.pool_rows[p]:,} rows {t / elapsed:,.0f} tok/s"
            for p, t in sorted(self.tokens.items())
        )

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        part = lambda key: sum(p.get(key, 0) for p in self.partial)  # noqa: E731
        rows = self.rows + part("rows_in")
        rate = rows / elapsed
        eta = (self.total - rows) / rate if rate > 0 else float("nan")
        pct = 100 * rows / self.total if self.total else 100.0
        more = "+" if self.staging else ""  # while staging: the totals staged so far
        left = fmt_duration(eta)
        left = f">{left}" if self.staging and left != "-" else left
        return (
            f"progress: {rows:,}/{self.total:,}{more} rows ({pct:.1f}%"
            f"{' of those staged so far; staging' if self.staging else ''}): "
            f"{self.notes + part('rows_out'):,} notes written, "
            f"{self.errors + part('error_rows'):,} error rows, "
            f"{self.filtered + part('filtered_rows'):,} filtered; shards "
            f"{self.shards:,}/{self.total_shards:,}; {rate:,.1f} rows/s; "
            f"{self._rates() or 'no shard done yet'}; elapsed {elapsed:,.0f}s, "
            f"ETA {left}"
        )

    def tick(self) -> None:
        if self.bar is not None:
            return
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self.partial = self.poll() if self.poll else []
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        self.partial = []
        if self.bar is not None:
            self.bar.close()
        print(self.line().replace("progress:", "done:"), file=self.stream, flush=True)


def fmt_duration(seconds: float | None) -> str:
    """Seconds as `1h02m` or `3m05s` (`-` when unknown: None or nan)."""
    if seconds is None or seconds != seconds:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
