"""The driver: plan a job, start one actor per device slot, dispatch shards, report.

spec -> ModelBundle (resolved once, shipped through the object store)
     -> shards (non-splittable inputs staged in parallel Ray tasks) minus committed ones
     -> Dispatcher over the pools' actors -> part files -> _report.json -> _SUCCESS
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import asdict
from datetime import UTC, datetime
from functools import partial
from typing import Any

import numpy as np

from clinicalbert_core.errors import describe
from clinicalbert_core.hub import ModelBundle

from .corpus import RepeatedIds, Shard, clean_staging, plan_shards, remove_staged, repeated_ids
from .dispatch import Dispatcher, DispatchOutcome, Progress, ShardResult, Slot, fmt_duration
from .output import CommitGate, OutputDir, OutputLock, Report
from .preflight import (
    check_corpus,
    check_output,
    model_fit_problems,
    pool_problems,
    repeated_ids_problem,
    where_warnings,
)
from .spec import JobSpec, PoolSpec, SpecError

log = logging.getLogger(__name__)
NODE_LOST_WAIT_S = 5.0  # the most each step of stopping waits once the driver's node is gone


def model_source(spec: JobSpec) -> tuple[str, str | None]:
    """(source, revision): model.path, model.hub, or the variant's own hub repo."""
    m = spec.model
    if m.path is not None:
        return m.path, None
    if m.hub is not None:
        return m.hub.repo, m.hub.revision
    from clinicalbert_core.variants import get_variant

    v = get_variant(m.variant)  # validated to have a hub id
    assert v.hub_id is not None
    return v.hub_id, v.revision


def load_bundle(spec: JobSpec) -> ModelBundle:
    source, revision = model_source(spec)
    m = spec.model
    return ModelBundle.load(source, variant=m.variant, lowercase=m.lowercase, revision=revision)


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


def _apply(fn: Any, item: Any) -> Any:
    return fn(item)


def _ray_map(
    fn: Any, items: Any, node: LocalNode | None = None, every_s: float | None = None
) -> list[Any]:
    """map() over Ray tasks, results in order (staging inputs in parallel). With `node`, the
    driver's own raylet is watched while it waits (NodeLost once it is gone); with `every_s`,
    a line every `every_s` seconds says how many inputs are done (staging a large CSV takes
    minutes)."""
    import ray

    task = ray.remote(num_cpus=1)(_apply)
    refs = [task.remote(fn, x) for x in items]
    pending = refs
    t0 = last = time.monotonic()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            ray.get(done)  # an input's error as soon as its task ends
            if node is not None:
                node.check()
            if every_s is not None and pending and time.monotonic() - last >= every_s:
                last = time.monotonic()
                log.info("planning: %d of %d inputs read or staged, elapsed %s",
                         len(refs) - len(pending), len(refs), fmt_duration(last - t0))  # fmt: skip
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:  # the input error itself, without Ray's traceback
        raise e.cause from None


GPU_CPUS = 4  # CPUs a cuda actor tokenizes on when its pool leaves cpus_per_actor unset


def actor_cpus(pool: PoolSpec, nodes: list[dict[str, Any]]) -> int:
    """CPUs one actor of `pool` asks Ray for: cpus_per_actor when the spec sets it. A cuda
    pool that leaves it unset gets GPU_CPUS, at most the CPUs per GPU of its smallest alive
    GPU node (so every GPU there can still get an actor), at least 1."""
    if pool.device != "cuda" or "cpus_per_actor" in pool.model_fields_set:
        return pool.cpus_per_actor
    shares = [
        int(res.get("CPU", 0) // res["GPU"])
        for res in (n.get("Resources", {}) for n in nodes if n.get("Alive", True))
        if res.get("GPU")
    ]
    return max(1, min([GPU_CPUS, *shares]))


def actor_env(pool: PoolSpec, cpus: int) -> dict[str, str]:
    """The environment an actor's process starts with (the libraries read it once).

    Threads: torch gets `cpus` (OMP_NUM_THREADS). A cuda actor tokenizes on its `cpus`
    CPUs (`tokenizers`' pool: TOKENIZERS_PARALLELISM on, RAYON_NUM_THREADS; unset, rayon
    would take every CPU of the node); a CPU actor's CPUs run torch, and it tokenizes on
    one thread ahead of the encoder.

    torch's oneDNN caches off (`ops.ONEDNN_CACHE_ENV` explains them): an actor's batches fill
    its token budget, each with its own token count, so a cached kernel is rarely met again
    while its buffers (~10 MiB each at BERT-base width) stay; off, memory is flat at the same
    speed (README: what bounds an actor's memory).
    """
    env = {
        "OMP_NUM_THREADS": str(cpus),
        "TOKENIZERS_PARALLELISM": "false",
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0",
        "LRU_CACHE_CAPACITY": "1",  # ideep's own cache (torch's oneDNN layer); 0 crashes torch
    }
    if pool.device == "cuda":
        env |= {"TOKENIZERS_PARALLELISM": "true", "RAYON_NUM_THREADS": str(cpus)}
    if pool.device == "mps":  # an operator MPS lacks runs on the CPU instead of failing
        env["PYTORCH_ENABLE_MPS_FALLBACK"] = "1"
    return env


def _start_actor(pool: PoolSpec, index: int, bundle_ref: Any, spec: JobSpec, lengths: bool) -> Any:
    import ray

    from .actor import EncoderActor

    cpus = actor_cpus(pool, ray.nodes())
    options: dict[str, Any] = {"num_cpus": cpus}
    if pool.device == "cuda":
        options["num_gpus"] = 1
        if pool.accelerator_type:
            options["accelerator_type"] = pool.accelerator_type
    env = actor_env(pool, cpus)
    cls = ray.remote(concurrency_groups={"monitor": 1})(EncoderActor)  # progress() answers
    cls = cls.options(**options, runtime_env={"env_vars": env})  # while process() runs
    return cls.remote(bundle_ref, spec, pool.name, f"{pool.name}-{index}", lengths, cpus)


def run_job(
    spec: JobSpec,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    address: str | None = None,
    on_result: Any = None,
) -> dict[str, Any]:
    """Run (or dry-run) a job to completion; returns the report. Raises on setup errors, and
    NodeLost when the driver's own Ray node dies mid-run (Ray is shut down by then)."""
    # the real job's staging dir (outside any output): a dry run's staging is reused later
    staging = spec.staging_dir()
    full = spec
    if dry_run:
        scratch = tempfile.mkdtemp(prefix=f"clinicalbert-dry-run-{spec.name}-")
        spec = spec.model_copy(
            update={
                "output": spec.output.model_copy(update={"path": scratch}),
                "corpus": spec.corpus.model_copy(update={"limit": spec.run.dry_run_notes}),
            }
        )
    if problems := check_corpus(spec) + check_output(spec):
        raise SpecError(problems)
    for warning in where_warnings(spec):
        log.warning("%s", warning)
    log.info("resolving model %s", spec.model.variant)
    bundle = load_bundle(spec)
    check_model_fit(spec, bundle)
    out = OutputDir(spec.output.path)
    lock = OutputLock(out, spec.name)
    lock.acquire()  # one run per output dir; released when this run ends, however it ends
    try:
        return _run_locked(spec, full, bundle, out, lock, staging, dry_run=dry_run,
                           overwrite=overwrite, address=address, on_result=on_result)  # fmt: skip
    finally:
        lock.release()


def _run_locked(
    spec: JobSpec,
    full: JobSpec,
    bundle: ModelBundle,
    out: OutputDir,
    lock: OutputLock,
    staging: str,
    *,
    dry_run: bool,
    overwrite: bool,
    address: str | None,
    on_result: Any,
) -> dict[str, Any]:
    import ray

    started = datetime.now(UTC)
    t0 = time.monotonic()
    out.check_spec(
        spec.spec_hash(), {**spec.resolved_json(), "model_identity": bundle.identity()}, overwrite
    )

    if not ray.is_initialized():
        if dry_run:
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    log.info("%s", cluster_line())
    pools = spec.device_pool
    if dry_run:
        res = ray.cluster_resources()
        import torch

        mps = torch.backends.mps.is_available()
        pools = scale_pools(pools, int(res.get("CPU", 1)), int(res.get("GPU", 0)), mps)
        if not pools:
            raise RuntimeError("dry run: no pool of the spec can run on this machine")
        kept = {p.name for p in pools}
        for pool in spec.device_pool:
            if pool.name not in kept:
                what = "Apple GPU (mps)" if pool.device == "mps" else "GPU"
                log.warning("dry run: pool %s skipped (no %s on this machine)", pool.name, what)
    _check_resources(pools, dry_run)

    node = LocalNode()
    ray_map = partial(_ray_map, node=node, every_s=spec.run.progress_interval_s)
    log.info("planning shards")
    clean_staging(staging)  # what a killed staging run left
    committed = out.committed()
    try:
        shards = plan_shards(spec.corpus, staging, spec.run.shard_rows, map_fn=ray_map)
    except NodeLost as e:  # nothing dispatched yet: Ray goes before its health check ends us
        ray.shutdown()
        e.shards = (len(committed), None)
        raise
    repeated = refuse_repeated_ids(spec, shards)
    todo = [s for s in shards if s.id not in committed]
    log.info("%d shards (%d rows), %d already committed, %d to run",
             len(shards), sum(s.num_rows for s in shards), len(shards) - len(todo), len(todo))  # fmt: skip

    bundle_ref = ray.put(bundle)
    slots = [
        Slot(p.name, i, _start_actor(p, i, bundle_ref, spec, dry_run))
        for p in pools
        for i in range(p.actors)
        if todo  # nothing left to run: no actors to start
    ]
    pool_of = {p.name: p for p in pools}

    monitor = Monitor(slots, spec.run.stall_timeout_s, min(spec.run.progress_interval_s, 5.0))
    progress = Progress(
        sum(s.num_rows for s in todo), spec.run.progress_interval_s, total_shards=len(todo),
        poll=monitor.partials,
    )  # fmt: skip
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    gate = ray.remote(num_cpus=0)(CommitGate).options(scheduling_strategy=here).remote()  # on
    # the driver's node: it lives exactly as long as the driver, whatever node is lost

    def submit(handle: Any, shard: Shard) -> Any:
        attempt = uuid.uuid4().hex[:16]
        ray.get(gate.trust.remote(shard.id, attempt))  # the previous attempt has ended
        return handle.process.remote(shard, attempt, gate)

    def tick() -> None:
        if lock.lost:  # our lease lapsed and another run took the dir: stop writing now
            raise RuntimeError(lock.lost)
        node.check()
        monitor.check(dispatcher.in_flight)
        progress.tick()

    def result_hook(result: ShardResult, slot: Slot) -> None:
        monitor.done(result, slot)
        progress.update(result, slot)
        if on_result is not None:
            on_result(result, slot, slots)

    dispatcher = Dispatcher(
        slots,
        submit=submit,
        restart=lambda slot: _start_actor(
            pool_of[slot.pool], slot.index, bundle_ref, spec, dry_run
        ),
        max_attempts=spec.run.max_shard_attempts,
        on_result=result_hook,
        on_tick=tick,
    )
    stopped: BaseException | None = None  # what ended the run before its shards were done
    try:
        outcome = dispatcher.run(todo)
    except BaseException as e:  # Ctrl-C, SIGTERM (the CLI turns it into Ctrl-C), a lost node
        stopped = e  # or output lock, an error of the driver's own
        # from now on no attempt starts or commits. After a lost node the gate's process
        # outlives its raylet: closed, it grants nothing; unanswered, there is no gate either
        wait = NODE_LOST_WAIT_S if isinstance(e, NodeLost) else None  # else until it answers
        done, _ = ray.wait([gate.close.remote()], timeout=wait)
        if not done:
            log.warning("the commit gate did not answer within %.0fs", NODE_LOST_WAIT_S)
        raise
    finally:  # also when stopped: no actor of this run may go on writing
        progress.close()
        lost = isinstance(stopped, NodeLost)
        dispatcher.stop(timeout_s=NODE_LOST_WAIT_S if lost else 60.0)
        if lost:  # before Ray's health check declares the node dead and ends this process
            ray.shutdown()  # a local cluster's processes go too: its actors exit with them
        mine = not lock.lost  # a run that lost its lock touches nothing of the new holder's
        if mine:  # what killed attempts left; every actor of this run has stopped
            out.clean_temp()
        if stopped is not None and mine:  # what was committed so far, said to be partial
            _write_report(out, spec, shards, committed, dispatcher.outcome, pools, started, t0,
                          monitor.stalls, repeated, stop_reason(stopped))  # fmt: skip
        if isinstance(stopped, NodeLost):  # what is on disk, whatever reached the driver
            stopped.shards = (len(out.committed() & {s.id for s in shards}), len(shards))
    if lock.lost:  # lost after the last shard: the output is the new holder's now
        raise RuntimeError(lock.lost)
    report = _write_report(out, spec, shards, committed, outcome, pools, started, t0,
                           monitor.stalls, repeated)  # fmt: skip
    wrote_nothing = report["rows_in"] and not (report["rows_out"] or report["error_rows"])
    if wrote_nothing and not spec.run.allow_empty:
        report["empty"] = (
            f"wrote no note: {report['rows_in']:,} rows read, {report['filtered_rows']:,} "
            "dropped by corpus.where (check its values; run.allow_empty accepts this)"
        )
    if not outcome.failed and "empty" not in report:
        out.mark_success()
        if not (dry_run or spec.run.keep_staged):
            remove_staged(staging, shards)
    report["output"] = spec.output.path
    if dry_run:
        full_shards = plan_shards(full.corpus, staging, spec.run.shard_rows, map_fn=ray_map)
        report["dry_run"] = dry_run_summary(full, full_shards, report, outcome)
        shutil.rmtree(spec.output.path, ignore_errors=True)  # the sample's scratch output
    return report


class Monitor:
    """Watches the actors while shards run: their counts for the progress line, and stalls.

    Every `every_s` it asks each busy actor for its shard's counts (the actor answers from its
    `monitor` concurrency group while it encodes). An actor whose counts have not moved for the
    stall timeout (a hung process does not even answer) is killed: the dispatcher sees it die,
    re-queues its shards and starts a replacement, and the commit gate keeps the hung attempt
    from ever committing. Timeout: `run.stall_timeout_s`, else 10x the slowest record batch
    seen so far (at least 120 s; 600 s before any shard is done). An actor still loading its
    model is not stalled: its clock starts once its constructor has returned."""

    def __init__(self, slots: list[Slot], timeout_s: float | None, every_s: float):
        self.slots, self.fixed, self.every = slots, timeout_s, every_s
        self.slowest_batch_s = 0.0
        self.live: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, Any] = {}
        self.changed: dict[str, float] = {}
        self.last = 0.0
        self.stalls: list[dict[str, Any]] = []
        self.ready: dict[str, tuple[Any, Any]] = {}  # slot -> (handle, its describe() ref)

    def _ready(self, slot: Slot) -> bool:
        """Whether this slot's current actor finished constructing (model loaded): only then
        does its silence count as a stall."""
        import ray

        handle, ref = self.ready.get(slot.name, (None, None))
        if handle is not slot.handle:
            ref = slot.handle.describe.options(concurrency_group="monitor").remote()
            self.ready[slot.name] = (slot.handle, ref)
        done, _ = ray.wait([ref], timeout=0)
        if not done:
            self.changed[slot.name] = time.monotonic()  # loading: the clock starts after
        return bool(done)

    def timeout(self) -> float:
        if self.fixed is not None:
            return self.fixed
        return max(120.0, 10 * self.slowest_batch_s) if self.slowest_batch_s else 600.0

    def done(self, result: ShardResult, slot: Slot) -> None:
        self.slowest_batch_s = max(self.slowest_batch_s, result.seconds / max(result.batches, 1))
        self.changed[slot.name] = time.monotonic()
        self.live.pop(slot.name, None)

    def partials(self) -> list[dict[str, Any]]:
        return list(self.live.values())

    def check(self, in_flight: dict[Any, tuple[Slot, Any, Any, int]]) -> None:
        import ray

        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        busy = [s for s in self.slots if s.alive and s.in_flight and self._ready(s)]
        refs = {s.name: s.handle.progress.options(concurrency_group="monitor").remote()
                for s in busy}  # fmt: skip
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=0.5)
        answered = set(ready)
        for slot in busy:
            live = None
            if refs[slot.name] in answered:
                with contextlib.suppress(ray.exceptions.RayError):
                    live = ray.get(refs[slot.name])
            key = None if live is None else (live.get("shard"), live.get("batches"))
            if live is not None and key != self.seen.get(slot.name):
                self.seen[slot.name], self.changed[slot.name] = key, now
                self.live[slot.name] = live
                continue
            quiet = now - self.changed.setdefault(slot.name, now)
            if quiet > self.timeout():
                stuck = [sh.id for sl, h, sh, _ in in_flight.values() if h is slot.handle]
                log.warning("actor %s made no progress for %.0fs (shards %s): killed and "
                            "replaced, its shards re-queued", slot.name, quiet, stuck)  # fmt: skip
                self.stalls.append(
                    {"actor": slot.name, "shards": stuck, "quiet_s": round(quiet, 1)}
                )
                self.live.pop(slot.name, None)
                self.changed[slot.name] = now
                ray.kill(slot.handle)


class NodeLost(RuntimeError):
    """The driver's own Ray node died (its raylet): nothing can be scheduled or fetched any
    more. The run stops like an interrupted one (partial report, interrupted: true); `shards`
    is (committed, total) once it has stopped, total None when it died while planning."""

    def __init__(self, message: str):
        super().__init__(message)
        self.shards: tuple[int, int | None] | None = None


def cluster_line() -> str:
    """Which Ray cluster this run uses and what it has: without --address or RAY_ADDRESS,
    Ray joins a cluster `ray start` left running on this host rather than starting one."""
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return (
        f"Ray cluster at {ray.get_runtime_context().gcs_address}: {nodes} node(s), "
        f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
    )


class LocalNode:
    """Watches the raylet of the driver's own node from the dispatch loop.

    Once it is gone the driver's Ray connection is broken for good, but Ray only notices when
    its health checks declare the node dead (15 s or more later), and then ends the driver
    from a background thread (exit 1, "The connection to the plasma store is failed"),
    whatever it is doing. A refused connection to the raylet's port says it within a
    second, while the actors' processes still answer, so the run can stop cleanly."""

    def __init__(self, every_s: float = 1.0):
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        me = next(n for n in ray.nodes() if n["NodeID"] == node_id)
        self.address = (me["NodeManagerAddress"], int(me["NodeManagerPort"]))
        self.every, self.last = every_s, 0.0

    def alive(self) -> bool:
        try:
            with socket.create_connection(self.address, timeout=self.every):
                return True
        except ConnectionRefusedError:  # nothing listens on the raylet's port
            return False
        except TimeoutError:  # a busy host, not a verdict: asked again next time
            return True

    def check(self) -> None:
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last = now
        if not self.alive():
            host, port = self.address
            raise NodeLost(f"the local Ray node (raylet at {host}:{port}) died")


def stop_reason(stopped: BaseException) -> str:
    """What ended a run before its shards were done, in one line for `_report.json`."""
    if isinstance(stopped, KeyboardInterrupt):  # the CLI raises it for SIGTERM: "signal 15"
        return f"interrupted ({str(stopped) or 'Ctrl-C'})"
    return describe(stopped)


def _write_report(
    out: OutputDir,
    spec: JobSpec,
    shards: list[Shard],
    committed: set[str],
    outcome: DispatchOutcome,
    pools: tuple[PoolSpec, ...],
    started: datetime,
    t0: float,
    stalls: list[dict[str, Any]],
    repeated: RepeatedIds | None = None,
    stop_reason: str | None = None,
) -> dict[str, Any]:
    earlier = [ShardResult(**out.shard_stats(s.id)) for s in shards if s.id in committed]
    report = build_report(spec, shards, earlier, outcome, pools, started, t0, stalls, stop_reason)
    if repeated is not None:
        report["repeated_ids"] = {"ids": repeated.ids, "extra_rows": repeated.extra_rows}
    out.write_json("_report.json", report)
    return report


def refuse_repeated_ids(spec: JobSpec, shards: list[Shard]) -> RepeatedIds | None:
    """The input's ids, each on one row: an id on several rows is refused (SpecError), unless
    run.allow_duplicate_ids, which logs and returns them for the report."""
    t0 = time.monotonic()
    repeated = repeated_ids(shards, spec.corpus)
    log.info("ids checked for repeats (%.1fs)", time.monotonic() - t0)
    if repeated is None:
        return None
    if not spec.run.allow_duplicate_ids:
        raise SpecError([repeated_ids_problem(spec, repeated)])
    log.warning("%s; run.allow_duplicate_ids: every row is written",
                repeated_ids_problem(spec, repeated, hint=False))  # fmt: skip
    return repeated


def check_model_fit(spec: JobSpec, bundle: ModelBundle) -> None:
    """What the spec asks of the model, checked against the checkpoint before any Ray work:
    SpecError with one line per problem, naming the field."""
    positions = bundle.config["max_position_embeddings"]
    mask = bundle.specials["mask"]
    if problems := model_fit_problems(spec, positions, bundle.heads, mask, bundle.variant):
        raise SpecError(problems)


def _check_resources(pools: tuple[PoolSpec, ...], dry_run: bool) -> None:
    import ray

    res = ray.cluster_resources()
    need_gpu = sum(p.actors for p in pools if p.device == "cuda")
    if need_gpu and not res.get("GPU"):
        raise RuntimeError(
            f"the spec's GPU pools need {need_gpu} GPU(s) but this Ray cluster has none; "
            "run on a cluster with GPU workers, or use --dry-run to test on this machine"
        )
    if problems := pool_problems(pools, ray.nodes()):
        raise SpecError(problems)


def build_report(
    spec: JobSpec,
    shards: list[Shard],
    earlier: list[ShardResult],
    outcome: DispatchOutcome,
    pools: tuple[PoolSpec, ...],
    started: datetime,
    t0: float,
    stalls: list[dict[str, Any]] | None = None,
    stop_reason: str | None = None,
) -> dict[str, Any]:
    """Counts cover the whole output (shards committed by earlier runs included); throughput
    and per-pool/per-actor figures cover this run."""
    results = outcome.results
    wall = time.monotonic() - t0
    everything = earlier + results
    total = lambda key: sum(getattr(r, key) for r in everything)  # noqa: E731
    reasons: dict[str, int] = {}
    nulled: dict[str, int] = {}
    for r in everything:
        for k, v in r.reasons.items():
            reasons[k] = reasons.get(k, 0) + v
        for k, v in r.nulled.items():
            nulled[k] = nulled.get(k, 0) + v
    per_pool: dict[str, Any] = {}
    per_actor: dict[str, Any] = {}
    for p in pools:
        mine = [r for r in results if r.pool == p.name]
        busy = sum(r.seconds for r in mine)
        tokens = sum(r.tokens for r in mine)
        per_pool[p.name] = {
            "device": p.device, "actors": p.actors, "shards": len(mine),
            "rows": sum(r.rows_in for r in mine), "tokens": tokens, "busy_s": round(busy, 3),
            "tokens_per_s": round(tokens / wall, 1) if wall else 0.0,
            "precisions": sorted({r.precision for r in mine}),
        }  # fmt: skip
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
    by_precision: dict[str, int] = {}  # the whole output's notes, earlier runs' parts too
    for r in everything:
        by_precision[r.precision] = by_precision.get(r.precision, 0) + r.rows_out
    for a in per_actor.values():
        a["tokens_per_busy_s"] = round(a["tokens"] / a["busy_s"], 1) if a["busy_s"] else 0.0
    rows_in, rows_out, errors, filtered = (
        total(k) for k in ("rows_in", "rows_out", "error_rows", "filtered_rows")
    )
    report = {
        "name": spec.name,
        "spec_hash": spec.spec_hash(),
        "rows_in": rows_in, "rows_out": rows_out, "error_rows": errors, "filtered_rows": filtered,
        "errors_by_reason": reasons, "nulled_values": nulled,
        "windows": total("windows"), "tokens": total("tokens"), "truncated_notes": total("truncated"),
        "shards": {
            "total": len(shards), "committed_before": len(earlier), "processed": len(results),
            "failed": [asdict(f) for f in outcome.failed],
        },
        "retries": outcome.retries, "actor_restarts": outcome.actor_restarts,
        "stalls": stalls or [], "interrupted": stop_reason is not None, "stop_reason": stop_reason,
        "per_pool": per_pool, "per_actor": per_actor, "notes_by_precision": by_precision,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(sum(r.tokens for r in results) / wall, 1) if wall else 0.0,
        "started_at": started.isoformat(), "finished_at": datetime.now(UTC).isoformat(),
    }  # fmt: skip
    Report.from_json(report).check()  # every row and shard accounted for once, or an error
    return report


def dry_run_summary(
    spec: JobSpec, full_shards: list[Shard], report: dict[str, Any], outcome: DispatchOutcome
) -> dict[str, Any]:
    """Rates of the sample, token lengths, and the projected wall time of the whole corpus."""
    results = outcome.results
    lengths = np.array([n for r in results for n in r.token_lengths], dtype=np.int64)
    notes, rows_in = report["rows_out"], report["rows_in"]
    tokens = report["tokens"]
    body = spec.model.max_seq - 2
    corpus_rows = sum(s.num_rows for s in full_shards)
    kept = (notes / rows_in) if rows_in else 0.0  # share of rows that become notes
    corpus_tokens = corpus_rows * kept * (tokens / notes if notes else 0.0)
    # one throughput figure: the sample's actors together, per second of their busy time
    # (Ray and model start-up excluded), the same rates the projections scale from
    rate = sum(a["tokens_per_busy_s"] for a in report["per_actor"].values())
    tokens_per_note = tokens / notes if notes else 0.0
    summary: dict[str, Any] = {
        "sampled_rows": rows_in,
        "sampled_notes": notes,
        "notes_per_s": rate / tokens_per_note if tokens_per_note else 0.0,
        "tokens_per_s": rate,
        "windows_per_note": report["windows"] / notes if notes else 0.0,
        "corpus_rows": corpus_rows,
        "corpus_tokens_estimate": int(corpus_tokens),
        "projection": {},
    }
    if len(lengths):
        summary["token_length"] = {
            "p50": float(np.percentile(lengths, 50)), "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()), "share_over_max_seq": float((lengths > body).mean()),
        }  # fmt: skip
    # per pool of the *spec* (full size): measured tokens per busy second of one actor of the
    # same device, times the spec's actor count
    per_actor_rate: dict[str, list[float]] = {}
    precisions: dict[str, set[str]] = {}
    for a in report["per_actor"].values():
        per_actor_rate.setdefault(a["pool"], []).append(a["tokens_per_busy_s"])
        precisions.setdefault(a["pool"], set()).add(a["precision"])
    total_rate = 0.0
    for pool in spec.device_pool:
        rates = per_actor_rate.get(pool.name)
        if not rates:
            summary["projection"][pool.name] = {"measured": False}
            continue
        rate = float(np.mean(rates)) * pool.actors
        total_rate += rate
        summary["projection"][pool.name] = {
            "measured": True, "tokens_per_s": rate,
            "precisions": sorted(precisions[pool.name]),
            "hours_alone": corpus_tokens / rate / 3600 if rate else None,
        }  # fmt: skip
    summary["projected_hours_all_measured_pools"] = (
        corpus_tokens / total_rate / 3600 if total_rate else None
    )
    return summary


def print_dry_run(report: dict[str, Any]) -> None:
    d = report["dry_run"]
    print(f"dry run sample: {d['sampled_notes']:,} notes ({d['sampled_rows']:,} rows), "
          f"{d['notes_per_s']:.1f} notes/s = {d['tokens_per_s']:,.0f} tokens/s (its actors "
          f"together, start-up excluded), {d['windows_per_note']:.2f} windows/note")  # fmt: skip
    if "token_length" in d:
        t = d["token_length"]
        print(f"token length per note: p50 {t['p50']:.0f}, p95 {t['p95']:.0f}, max {t['max']}, "
              f"{100 * t['share_over_max_seq']:.1f}% over max_seq")  # fmt: skip
    print(f"full corpus: {d['corpus_rows']:,} rows, ~{d['corpus_tokens_estimate']:,} tokens")
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
