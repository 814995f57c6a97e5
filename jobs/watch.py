"""Watching a running job from the driver: stalled actors and the driver's own Ray node.

`Monitor` asks the busy actors for their counts (the progress line moves inside long shards)
and kills an actor whose counts stopped moving; `LocalNode` notices within a second that the
raylet of the driver's node is gone (`NodeLost`), before Ray's health checks end the driver.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from typing import Any

from .dispatch import Slot
from .parts import ShardResult

log = logging.getLogger(__name__)
NODE_LOST_WAIT_S = 5.0  # the most each step of stopping waits once the driver's node is gone


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
        for slot in slots:  # asked as the actors start: answered once each has constructed,
            self._probe(slot)  # whatever happens to it later (a hang right after included)

    def _probe(self, slot: Slot) -> Any:
        """The describe() ref of this slot's current actor, asked once per actor."""
        handle, ref = self.ready.get(slot.name, (None, None))
        if handle is not slot.handle:
            ref = slot.handle.describe.options(concurrency_group="monitor").remote()
            self.ready[slot.name] = (slot.handle, ref)
        return ref

    def _ready(self, slot: Slot) -> bool:
        """Whether this slot's current actor finished constructing (model loaded): only then
        does its silence count as a stall."""
        import ray

        done, _ = ray.wait([self._probe(slot)], timeout=0)
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
