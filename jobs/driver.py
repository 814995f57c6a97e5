"""The driver: `run_job` = plan -> execute -> finish.

    open_job  preflight checks, the model resolved once (ModelBundle), the output dir locked
              and claimed (resume, refuse or overwrite)
    plan      shards of the corpus (non-splittable inputs staged in parallel Ray tasks), ids
              checked for repeats, shards committed by earlier runs set aside
    execute   one actor per device slot, the Dispatcher over them, the commit gate, progress
              and stall/node watching; a run stopped midway writes a partial report
    finish    `_report.json` (built once, written once), `_SUCCESS`, staged copies removed

A dry run (dry_run.py) is the same steps over a sample, with its own finish.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

from clinicalbert_core.hub import ModelBundle

from .corpus import (
    MapFn,
    RepeatedIds,
    Shard,
    cached_verdict,
    clean_staging,
    idle_actors_warning,
    plan_shards,
    remove_staged,
    repeated_ids,
    verdict_json,
    verdict_key,
)
from .dispatch import Dispatcher, DispatchOutcome, Progress, Slot
from .fs import private_files
from .launch import actor_cpus, check_resources, connect, ray_map, start_actor, start_gate
from .lock import OutputLock
from .model import load_bundle
from .output import OutputDir
from .parts import ShardResult
from .pipeline import StagingFeed, start_feed
from .preflight import (
    check_corpus,
    check_output,
    corpus_warnings,
    model_fit_problems,
    repeated_ids_problem,
)
from .report import Report, RunFacts, build_report, empty_reason, stop_reason
from .spec import JobSpec, PoolSpec, SpecError
from .watch import NODE_LOST_WAIT_S, LocalNode, Monitor, NodeLost

log = logging.getLogger(__name__)
OnResult = Callable[[ShardResult, Slot, list[Slot]], None]
IDS_FILE = "_ids.json"  # the corpus's repeated-id verdict (corpus.verdict_key), kept for resumes


@dataclass
class Job:
    """A job whose output dir this process holds: what every step works from."""

    spec: JobSpec
    spec_hash: str
    bundle: ModelBundle
    out: OutputDir
    lock: OutputLock
    staging: str  # where non-splittable inputs are staged (outside the output dir)
    started: datetime
    t0: float


@dataclass
class Plan:
    """The shards of a job, and the pools that run them."""

    job: Job
    pools: tuple[PoolSpec, ...]
    shards: list[Shard]
    committed: set[str]  # shard ids committed by earlier runs
    repeated: RepeatedIds | None  # ids on several rows (run.allow_duplicate_ids)
    node: LocalNode  # the driver's own Ray node, watched while the job runs
    staged: list[str] = field(default_factory=list)  # staged chunk files, removed when done
    feed: StagingFeed | None = None  # inputs still staging: their shards join while it runs

    @property
    def todo(self) -> list[Shard]:
        return [s for s in self.shards if s.id not in self.committed]


def run_job(
    spec: JobSpec,
    *,
    overwrite: bool = False,
    address: str | None = None,
    on_result: OnResult | None = None,
) -> dict[str, Any]:
    """Run a job to completion; returns `_report.json`'s content. Raises on setup errors, and
    NodeLost when the driver's own Ray node dies mid-run (Ray is shut down by then)."""
    with open_job(spec, overwrite) as job:
        connect(address)
        plan = plan_job(job, spec.device_pool)
        outcome = execute(plan, on_result)
        return finish(plan, outcome).to_json()


@contextmanager
def open_job(spec: JobSpec, overwrite: bool = False, staging: str | None = None) -> Iterator[Job]:
    """Check the spec against its corpus, output and model before any Ray work (SpecError,
    one line per problem), then hold the output dir (one run per dir; released when the
    run ends, however it ends) and claim it: resume, refuse another spec's output, or with
    `overwrite` start over. `staging`: where inputs are staged (default the spec's)."""
    with private_files(spec.output.dir_mode):
        yield from _open_job(spec, overwrite, staging)


def _open_job(spec: JobSpec, overwrite: bool, staging: str | None) -> Iterator[Job]:
    if problems := check_corpus(spec) + check_output(spec):
        raise SpecError(problems)
    for warning in corpus_warnings(spec):
        log.warning("%s", warning)
    log.info("resolving model %s", spec.model.variant)
    bundle = load_bundle(spec)
    check_model_fit(spec, bundle)
    out = OutputDir(spec.output.path)
    lock = OutputLock(out, spec.name)
    lock.acquire()
    try:
        spec_hash = spec.spec_hash()
        job_json = {**spec.resolved_json(), "model_identity": bundle.identity()}
        started, t0 = datetime.now(UTC), time.monotonic()
        out.check_spec(spec_hash, job_json, overwrite)
        staging = staging or spec.staging_dir()
        yield Job(spec, spec_hash, bundle, out, lock, staging, started, t0)
    finally:
        lock.release()


def check_model_fit(spec: JobSpec, bundle: ModelBundle) -> None:
    """What the spec asks of the model, checked against the checkpoint before any Ray work:
    SpecError with one line per problem, naming the field."""
    b = bundle
    positions, mask = b.config["max_position_embeddings"], b.specials["mask"]
    if problems := model_fit_problems(spec, positions, b.heads, mask, b.variant, b.classifier):
        raise SpecError(problems)


def plan_job(
    job: Job, pools: tuple[PoolSpec, ...], limit: Callable[[list[Shard]], list[Shard]] | None = None
) -> Plan:
    """The job's shards (inputs staged in parallel tasks), checked for repeated ids, less
    those earlier runs committed; `limit` picks the shards to run from the whole corpus's
    (a dry run's sample). Needs a Ray connection."""
    import ray

    spec = job.spec
    check_resources(pools)
    node = LocalNode()
    log.info("planning shards")
    clean_staging(job.staging)  # what a killed staging run left
    committed = job.out.committed()
    map_fn = partial(ray_map, node=node, every_s=spec.run.progress_interval_s)
    staged: list[str] = []
    try:
        if limit is None and (feed := start_feed(spec, job.staging, committed, node)):
            plan = Plan(job, pools, feed.first(), committed, None, node, feed.staged, feed)
            log.info("%d shards staged so far, %d of them to run; the rest run as staging "
                     "commits them", len(plan.shards), len(plan.todo))  # fmt: skip
            return plan
        shards = plan_shards(spec.corpus, job.staging, spec.run.shard_rows, map_fn=map_fn,
                             committed=committed, staged=staged)  # fmt: skip
        if limit is None and (idle := idle_actors_warning(shards, sum(p.actors for p in pools))):
            log.warning("%s", idle)
        shards = limit(shards) if limit is not None else shards
        repeated = refuse_repeated_ids(spec, shards, job.out, map_fn)
    except NodeLost as e:  # nothing dispatched yet: Ray goes before its health check ends us
        ray.shutdown()
        e.shards = (len(committed), None)
        raise
    plan = Plan(job, pools, shards, committed, repeated, node, staged)
    log.info("%d shards (%d rows), %d already committed, %d to run", len(shards),
             sum(s.num_rows for s in shards), len(shards) - len(plan.todo), len(plan.todo))  # fmt: skip
    return plan


def refuse_repeated_ids(
    spec: JobSpec, shards: list[Shard], out: OutputDir, map_fn: MapFn = map
) -> RepeatedIds | None:
    """The input's ids, each on one row: an id on several rows is refused (SpecError), unless
    run.allow_duplicate_ids, which logs and returns them for the report. Each input file's ids
    are read in a task of `map_fn` (the driver's Ray tasks); the verdict is kept in `out`
    (IDS_FILE), so a resume over an unchanged corpus reads no id."""
    repeated = checked_ids(spec, shards, out, map_fn)
    if repeated is None:
        return None
    if not spec.run.allow_duplicate_ids:
        raise SpecError([repeated_ids_problem(spec, repeated)])
    log.warning("%s; run.allow_duplicate_ids: every row is written",
                repeated_ids_problem(spec, repeated, hint=False))  # fmt: skip
    return repeated


def checked_ids(
    spec: JobSpec, shards: list[Shard], out: OutputDir, map_fn: MapFn = map
) -> RepeatedIds | None:
    """The corpus's repeated ids: the verdict `out` keeps for these shards and settings, or
    one reached now and kept (unless a shard could not be read: it is read again next time)."""
    key = verdict_key(shards, spec.corpus)
    try:
        found, repeated = cached_verdict(out.read_json(IDS_FILE), key, shards)
    except ValueError:  # not JSON: reached again and kept anew
        found, repeated = False, None
    if found:
        log.info("ids checked for repeats: the corpus is unchanged since a run that checked them")
        return repeated
    t0 = time.monotonic()
    unreadable: list[str] = []
    repeated = repeated_ids(shards, spec.corpus, unreadable, map_fn)
    log.info("ids checked for repeats (%.1fs)", time.monotonic() - t0)
    for line in unreadable:
        log.warning("corpus: %s", line)
    if not unreadable:
        keep_verdict(out, key, repeated, shards)
    return repeated


def keep_verdict(
    out: OutputDir, key: str, repeated: RepeatedIds | None, shards: list[Shard]
) -> None:
    """Keep the verdict on these shards' ids in `out` (IDS_FILE): a resume over the unchanged
    corpus reads no id."""
    if (verdict := verdict_json(key, repeated, shards)) is not None:
        out.write_json(IDS_FILE, verdict)


def execute(plan: Plan, on_result: OnResult | None = None) -> DispatchOutcome:
    """Start one actor per device slot and dispatch the shards left; every actor of this run
    is stopped when this returns. A run stopped midway (Ctrl-C, SIGTERM, a lost node, a lost
    output lock) writes its partial report and re-raises."""
    import ray

    job, todo = plan.job, plan.todo
    spec = job.spec
    cpus = actor_cpus(plan.pools, ray.nodes())  # the cluster's nodes read once, not per actor
    start = partial(start_actor, bundle_ref=ray.put(job.bundle), spec=spec,
                    spec_hash=job.spec_hash, cpus=cpus)  # fmt: skip
    work = todo or plan.feed is not None  # (shards of chunks still staging: actors wait for them)
    slots = [Slot(p.name, i, start(p, i)) for p in plan.pools for i in range(p.actors) if work]
    pool_of = {p.name: p for p in plan.pools}
    monitor = Monitor(slots, spec.run.stall_timeout_s, min(spec.run.progress_interval_s, 5.0))
    progress = Progress(sum(s.num_rows for s in todo), spec.run.progress_interval_s,
                        total_shards=len(todo), poll=monitor.partials,
                        staging=plan.feed is not None)  # fmt: skip
    gate = start_gate()

    def tick() -> None:
        if job.lock.lost:  # our lease lapsed and another run took the dir: stop writing now
            raise RuntimeError(job.lock.lost)
        plan.node.check()
        monitor.check(dispatcher.in_flight)
        progress.tick()

    def result_hook(result: ShardResult, slot: Slot) -> None:
        monitor.done(result, slot)
        progress.update(result, slot)
        if on_result is not None:
            on_result(result, slot, slots)

    dispatcher = Dispatcher(
        slots, submit=partial(_submit, gate),
        restart=lambda slot: start(pool_of[slot.pool], slot.index),
        max_attempts=spec.run.max_shard_attempts, on_result=result_hook, on_tick=tick,
        probe=lambda handle: handle.describe.remote(),
    )  # fmt: skip
    dispatcher.outcome.stalls = monitor.stalls  # the report's, also when stopped midway
    more = None if plan.feed is None else partial(_staged_more, plan, progress)
    try:
        outcome = dispatcher.run(todo, more)
    except BaseException as e:  # Ctrl-C, SIGTERM (the CLI turns it into Ctrl-C), a lost node
        _stop(plan, dispatcher, progress, gate, e)  # or output lock, a driver error
        raise
    _stop(plan, dispatcher, progress, gate, None)
    if job.lock.lost:  # lost after the last shard: the output is the new holder's now
        raise RuntimeError(job.lock.lost)
    return outcome


def _staged_more(plan: Plan, progress: Progress, timeout_s: float) -> list[Shard] | None:
    """The shards of chunks committed since (pipelined staging), joined to the plan and the
    progress; None once staging has ended. When it ends, the shards are put in plan order
    and, with run.allow_duplicate_ids, the repeated ids counted for the report."""
    feed = plan.feed
    assert feed is not None
    if feed.done:
        return None
    new = feed.poll(timeout_s)
    plan.shards += new
    todo = [s for s in new if s.id not in plan.committed]
    progress.grow(sum(s.num_rows for s in todo), len(todo), staging=not feed.done)
    if feed.done:
        plan.shards[:] = feed.intake.shards()
        spec = plan.job.spec
        log.info("staging done: %d shards (%d rows)", len(plan.shards),
                 sum(s.num_rows for s in plan.shards))  # fmt: skip
        if spec.run.allow_duplicate_ids:  # read in this process: the actors hold the CPUs
            plan.repeated = refuse_repeated_ids(spec, plan.shards, plan.job.out)
        else:  # every chunk's ids were checked as it came: none is repeated
            keep_verdict(plan.job.out, verdict_key(plan.shards, spec.corpus), None, plan.shards)
    return todo


def _submit(gate: Any, handle: Any, shard: Shard) -> Any:
    """Dispatch one attempt of `shard`, trusted by the gate (the previous attempt has ended),
    so only this attempt may commit. Nothing waits here: the gate's answer is an argument of
    the attempt, so Ray starts the attempt only once the gate has trusted it."""
    attempt = uuid.uuid4().hex[:16]
    trusted = gate.trust.remote(shard.id, attempt)
    return handle.process.remote(shard, attempt, gate, trusted)


def _stop(
    plan: Plan, dispatcher: Dispatcher, progress: Progress, gate: Any, stopped: BaseException | None
) -> None:
    """Stop every actor of the run; a run `stopped` midway closes the gate first (no attempt
    starts or commits any more) and leaves a partial report of what was committed."""
    import ray

    lost = isinstance(stopped, NodeLost)
    if plan.feed is not None:  # no chunk is staged for a run that has stopped
        plan.feed.close(lost)
    if stopped is not None:  # after a lost node the gate's process outlives its raylet:
        # closed, it grants nothing; unanswered, there is no gate either
        done, _ = ray.wait([gate.close.remote()], timeout=NODE_LOST_WAIT_S if lost else None)
        if not done:
            log.warning("the commit gate did not answer within %.0fs", NODE_LOST_WAIT_S)
    progress.close()
    dispatcher.stop(timeout_s=NODE_LOST_WAIT_S if lost else 60.0)
    if lost:  # before Ray's health check declares the node dead and ends this process
        ray.shutdown()  # a local cluster's processes go too: its actors exit with them
    else:  # no attempt is left to ask it; its handle alone would keep it alive as long as
        ray.kill(gate)  # anything holds this frame (the traceback of a stopped run)
    job = plan.job
    if not job.lock.lost:  # a run that lost its lock touches nothing of the new holder's
        job.out.clean_temp()  # what killed attempts left; every actor of this run has stopped
        if stopped is not None:  # what was committed so far, said to be partial
            partial_report = report_of(plan, dispatcher.outcome, stop_reason(stopped))
            job.out.write_json("_report.json", partial_report.to_json())
    if isinstance(stopped, NodeLost):  # what is on disk, whatever reached the driver
        on_disk = job.out.committed() & {s.id for s in plan.shards}
        stopped.shards = (len(on_disk), len(plan.shards))


def report_of(plan: Plan, outcome: DispatchOutcome, stopped: str | None = None) -> Report:
    """The report of this run over the whole output: the counts of shards earlier runs
    committed come from their parts' footers."""
    job = plan.job
    earlier = [
        ShardResult(**job.out.shard_stats(s.id)) for s in plan.shards if s.id in plan.committed
    ]
    repeated = plan.repeated
    facts = RunFacts(job.spec.name, job.spec_hash, job.spec.output.path, plan.pools,
                     len(plan.shards), job.started, job.t0)  # fmt: skip
    counts = None if repeated is None else {"ids": repeated.ids, "extra_rows": repeated.extra_rows}
    return build_report(facts, earlier, outcome, stopped, counts)


def finish(plan: Plan, outcome: DispatchOutcome) -> Report:
    """Write `_report.json`; when every shard committed and some note was written, `_SUCCESS`
    and the staged copies removed (unless run.keep_staged)."""
    job = plan.job
    report = report_of(plan, outcome)
    report.empty = empty_reason(report, job.spec.run.allow_empty)
    job.out.write_json("_report.json", report.to_json())
    staged = plan.feed is None or plan.feed.done  # (a run left with no actor stops staging)
    if not outcome.failed and report.empty is None and staged:
        job.out.mark_success()
        if not job.spec.run.keep_staged:  # every staged file of the plan, the limit's too
            remove_staged(job.staging, plan.staged)
    return report
