"""Pipelined staging on Ray: one streaming task per source to stage commits its chunks and
streams each as it is committed (`corpus.arrivals`); the driver takes their shards into the
run while it dispatches (`StagingFeed`), so encoding starts within seconds, not once a large
CSV.gz is read to its end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

from .corpus import FORMATS, Shard, Source, list_sources, staging
from .corpus.arrivals import Arrival, Intake, arrivals
from .dispatch import fmt_duration
from .fs import current_umask
from .launch import ray_map, stop_tasks, task_setting
from .preflight import repeated_ids_problem
from .spec import JobSpec, SpecError
from .watch import LocalNode, NodeLost

log = logging.getLogger(__name__)


def start_feed(
    spec: JobSpec, staging_dir: str, committed: set[str], node: LocalNode
) -> StagingFeed | None:
    """Start staging the corpus's sources in streaming tasks; None where there is nothing to
    stage (a format read in place, every source staged whole before: the plan is then made
    whole, as its repeated-id verdict may be kept) or where the plan needs every shard
    before the first runs (`corpus.limit`)."""
    corpus, shard_rows = spec.corpus, spec.run.shard_rows
    if not FORMATS[corpus.format].STAGED or corpus.limit is not None:
        return None
    sources = list_sources(corpus, shard_rows)
    whole = partial(staging.staged_whole, corpus=corpus, staging_dir=staging_dir,
                    shard_rows=shard_rows, chunk_rows=staging.CHUNK_ROWS)  # fmt: skip
    if all(ray_map(whole, sources, node=node)):
        return None
    return StagingFeed(spec, sources, staging_dir, committed, node)


def _staged_stream(fn: Any, item: Any, umask: int) -> Iterator[Arrival]:
    """The streaming task: `fn(item)`'s arrivals (in `task_setting`: the driver's file modes,
    a cancel interrupts it)."""
    with task_setting(umask):
        yield from fn(item)


class StagingFeed:
    """The staging tasks of a run and what they streamed so far: `first` waits for each to
    report once, `poll` takes the shards of the chunks committed since; `done` once every
    task has ended. An input's error, a column type that drifts and (unless
    `run.allow_duplicate_ids`) an id on more than one row end the feed by raising."""

    def __init__(
        self,
        spec: JobSpec,
        sources: list[Source],
        staging_dir: str,
        committed: set[str],
        node: LocalNode,
    ):
        import ray

        run = spec.run
        check = not run.allow_duplicate_ids
        fn = partial(arrivals, corpus=spec.corpus, staging_dir=staging_dir,
                     shard_rows=run.shard_rows, chunk_rows=staging.CHUNK_ROWS, hash_ids=check)  # fmt: skip
        task = ray.remote(num_cpus=1)(_staged_stream)
        umask = current_umask()
        self.tasks = [task.remote(fn, (i, source), umask) for i, source in enumerate(sources)]
        self.live = list(self.tasks)
        self.heard: set[int] = set()  # the tasks that streamed a chunk or ended
        self.cancelled = False
        self.intake = Intake(spec.corpus, run.shard_rows, committed, check_ids=check)
        self.spec, self.node, self.every_s = spec, node, run.progress_interval_s

    @property
    def done(self) -> bool:
        """Every task has staged its source to the end."""
        return not self.live and not self.cancelled

    @property
    def staged(self) -> list[str]:
        """Every chunk file streamed so far (to remove when the job is done)."""
        return self.intake.staged

    def first(self) -> list[Shard]:
        """Wait until every task has committed a chunk (its column types are known) or ended;
        the shards so far. Each task then holds its CPU: actors started now can never take
        every CPU a staging task would wait for."""
        shards: list[Shard] = []
        t0 = last = time.monotonic()
        try:
            while len(self.heard) < len(self.tasks):
                shards += self.poll(1.0)
                if time.monotonic() - last >= self.every_s:
                    last = time.monotonic()
                    log.info("planning: %d of %d inputs staging, %d shards staged, elapsed %s",
                             len(self.heard), len(self.tasks), len(self.intake.shards()),
                             fmt_duration(last - t0))  # fmt: skip
        except BaseException as e:
            self.close(lost=isinstance(e, NodeLost))
            raise
        return shards

    def poll(self, timeout_s: float) -> list[Shard]:
        """The shards of the chunks committed since the last call, waiting up to `timeout_s`
        for one; the driver's node is checked (NodeLost)."""
        import ray

        shards: list[Shard] = []
        if self.live:
            ready, rest = ray.wait(self.live, num_returns=1, timeout=timeout_s)
            if ready and rest:
                more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
                ready += more
            for gen in ready:
                shards += self._next(gen)
        self.node.check()
        if (repeated := self.intake.repeated()) is not None:
            raise SpecError([repeated_ids_problem(self.spec, repeated)])
        return shards

    def _next(self, gen: Any) -> list[Shard]:
        """The shards of the next chunk `gen` streamed ([] when it has ended)."""
        import ray

        self.heard.add(next(i for i, task in enumerate(self.tasks) if task is gen))
        try:
            ref = next(gen)
        except StopIteration:
            self.live.remove(gen)
            return []
        try:
            return self.intake.take(ray.get(ref))
        except ray.exceptions.RayTaskError as e:  # the input's own error, in one line
            raise e.cause from None

    def close(self, lost: bool = False) -> None:
        """Stop the tasks still staging, returning once they have ended (their committed
        chunks are kept for the next run; a temporary file is removed as the task stops, or
        by the next run's clean-up). With the driver's node `lost`, they went with it."""
        if not lost:
            stop_tasks(self.live)
        self.cancelled = self.cancelled or bool(self.live)
        self.live = []
