"""Starting things on the Ray cluster: the connection, actors (their CPUs, environment and
options), the commit gate, and parallel planning tasks. The driver decides what runs; this
module knows how Ray starts it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from .dispatch import fmt_duration
from .fs import current_umask
from .preflight import pool_problems
from .spec import JobSpec, PoolSpec, SpecError
from .watch import LocalNode, NodeLost

log = logging.getLogger(__name__)


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (default RAY_ADDRESS, else a cluster `ray start` left
    on this host, else a new local one); "local" starts a private one (dry runs). A process
    that is already connected stays as it is."""
    import ray

    if not ray.is_initialized():
        if address == "local":
            ray.init(address="local", include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    log.info("%s", cluster_line())


@contextlib.contextmanager
def task_setting(umask: int) -> Iterator[None]:
    """How a planning or staging task runs in its Ray worker: the files it writes get the
    driver's modes (private_files), and a cancel interrupts it. Ray's cancel raises
    KeyboardInterrupt through Python's SIGINT handler, which a worker lacks where the process
    that started Ray ignored SIGINT (`nohup clinicalbert run ... &`: the raylet and every
    worker inherit SIG_IGN): there the cancel did nothing. The worker's own settings are
    restored after the task."""
    old_umask = os.umask(umask)
    old_handler = None
    if threading.current_thread() is threading.main_thread():  # where Ray runs a task
        handler = signal.getsignal(signal.SIGINT)
        if handler in (signal.SIG_IGN, signal.SIG_DFL, None):
            old_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        os.umask(old_umask)
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)


def _apply(fn: Any, item: Any, umask: int) -> Any:
    with task_setting(umask):
        return fn(item)


def ray_map(
    fn: Any, items: Any, node: LocalNode | None = None, every_s: float | None = None
) -> list[Any]:
    """map() over Ray tasks, results in order (staging inputs in parallel). With `node`, the
    driver's own raylet is watched while it waits (NodeLost once it is gone); with `every_s`,
    a line every `every_s` seconds says how many inputs are done (staging a large CSV takes
    minutes)."""
    import ray

    task = ray.remote(num_cpus=1)(_apply)
    umask = current_umask()
    refs = [task.remote(fn, x, umask) for x in items]
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
    except NodeLost:  # the tasks went with the node
        raise
    except BaseException as e:  # an input refused, Ctrl-C: the other inputs' tasks end here
        stop_tasks(pending)
        if isinstance(e, ray.exceptions.RayTaskError):  # the input's error, without Ray's traceback
            raise e.cause from None
        raise


STOP_GRACE_S = 2.0  # how long a cancelled task may take to stop before its worker is killed


def stop_tasks(tasks: list[Any], grace_s: float = STOP_GRACE_S) -> None:
    """Cancel Ray tasks (object refs or streaming generators) and return once each has ended.
    A cancel interrupts the task's Python code (a KeyboardInterrupt in its worker's main
    thread, see `task_setting`), not a blocking call it is in; a task still running `grace_s`
    later is cancelled with force: its worker is killed. A task left running would hold its
    CPU (the next run's tasks wait for it) and go on writing what a later run writes again."""
    import ray

    if not tasks:
        return
    ends = [t.completed() if isinstance(t, ray.ObjectRefGenerator) else t for t in tasks]
    for end in ends:
        ray.cancel(end)
    _, running = ray.wait(ends, num_returns=len(ends), timeout=grace_s, fetch_local=False)
    if not running:
        return
    log.warning("%d task(s) still running %.0f s after they were cancelled: their workers are "
                "killed", len(running), grace_s)  # fmt: skip
    for end in running:
        ray.cancel(end, force=True)
    ray.wait(running, num_returns=len(running), timeout=10.0, fetch_local=False)


GPU_CPUS = 4  # CPUs a cuda actor tokenizes on when its pool leaves cpus_per_actor unset


def actor_cpus(pools: tuple[PoolSpec, ...], nodes: list[dict[str, Any]]) -> dict[str, int]:
    """CPUs one actor of each pool asks Ray for, by pool name: cpus_per_actor when the spec
    sets it. A cuda pool that leaves it unset gets GPU_CPUS, at most the CPUs per GPU of the
    smallest alive GPU node of `nodes` (so every GPU there can still get an actor), at least 1."""
    shares = [
        int(res.get("CPU", 0) // res["GPU"])
        for res in (n.get("Resources", {}) for n in nodes if n.get("Alive", True))
        if res.get("GPU")
    ]
    return {
        pool.name: pool.cpus_per_actor
        if pool.device != "cuda" or "cpus_per_actor" in pool.model_fields_set
        else max(1, min([GPU_CPUS, *shares]))
        for pool in pools
    }


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


def start_actor(
    pool: PoolSpec, index: int, bundle_ref: Any, spec: JobSpec, spec_hash: str, cpus: dict[str, int]
) -> Any:
    """One EncoderActor of `pool` (its CPUs as `cpus` says by pool, GPU, accelerator type and
    environment), given the shipped model, the spec, its own pool and the spec hash."""
    import ray

    from .actor import EncoderActor

    cpus = cpus[pool.name]
    options: dict[str, Any] = {"num_cpus": cpus}
    if pool.device == "cuda":
        options["num_gpus"] = 1
        if pool.accelerator_type:
            options["accelerator_type"] = pool.accelerator_type
    env = actor_env(pool, cpus)
    cls = ray.remote(concurrency_groups={"monitor": 1})(EncoderActor)  # progress() answers
    cls = cls.options(**options, runtime_env={"env_vars": env})  # while process() runs
    return cls.remote(bundle_ref, spec, pool, f"{pool.name}-{index}", spec_hash, cpus)


def start_gate() -> Any:
    """The run's CommitGate actor, on the driver's node: it lives exactly as long as the
    driver, whatever node is lost."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .parts import CommitGate

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(CommitGate).options(scheduling_strategy=here).remote()


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


def check_resources(pools: tuple[PoolSpec, ...]) -> None:
    """The pools fit this cluster: GPU pools need GPUs, every actor a node it fits on; every
    pool that does not is named in one SpecError, one line each."""
    import ray

    if problems := pool_problems(pools, ray.nodes()):
        raise SpecError(problems)
