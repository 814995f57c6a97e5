"""Watching a running job from the driver: stalled actors and the driver's own Ray node.

`Monitor` asks the busy actors for their counts (the progress line moves inside long shards)
and kills an actor whose counts stopped moving; `LocalNode` notices within a second that the
raylet of the driver's node is gone (`NodeLost`), before Ray's health checks end the driver.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
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

    def __init__(
        self,
        slots: list[Slot],
        timeout_s: float | None,
        every_s: float,
        ray_api: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """`ray_api`: what it waits, gets and kills through: the `ray` module (default), or a
        fake with the same wait, get and kill (as for Dispatcher: no cluster needed); `clock`:
        its time in seconds."""
        if ray_api is None:
            import ray as ray_api
        self.ray, self.clock = ray_api, clock
        self.slots, self.fixed, self.every = slots, timeout_s, every_s
        self.slowest_batch_s = 0.0
        self.live: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, Any] = {}
        self.changed: dict[str, float] = {}
        self.last = 0.0
        self.stalls: list[dict[str, Any]] = []
        self.probes: dict[str, tuple[Any, Any]] = {}  # slot -> (handle, its describe() ref)
        self.constructed: dict[str, Any] = {}  # slot -> the handle whose describe() answered
        self.asked: dict[str, tuple[Any, Any]] = {}  # slot -> (handle, its progress() ref)
        for slot in slots:  # asked as the actors start: answered once each has constructed,
            self._probe(slot)  # whatever happens to it later (a hang right after included)

    def _probe(self, slot: Slot) -> Any:
        """The describe() ref of this slot's current actor, asked once per actor."""
        handle, ref = self.probes.get(slot.name, (None, None))
        if handle is not slot.handle:
            ref = slot.handle.describe.options(concurrency_group="monitor").remote()
            self.probes[slot.name] = (slot.handle, ref)
        return ref

    def _ready_now(self, refs: list[Any]) -> list[Any]:
        """Those of `refs` that are ready, without waiting."""
        return self.ray.wait(refs, num_returns=len(refs), timeout=0)[0] if refs else []

    def _note_constructed(self, slots: list[Slot], now: float) -> None:
        """Which of `slots`' current actors finished constructing (model loaded), in one
        wait that never blocks: only then does an actor's silence count as a stall."""
        waiting = {self._probe(s): s for s in slots if self.constructed.get(s.name) is not s.handle}
        done = set(self._ready_now(list(waiting)))
        for ref, slot in waiting.items():
            if ref in done:
                self.constructed[slot.name] = slot.handle
            else:  # loading: its clock starts after
                self.changed[slot.name] = now

    def timeout(self) -> float:
        if self.fixed is not None:
            return self.fixed
        return max(120.0, 10 * self.slowest_batch_s) if self.slowest_batch_s else 600.0

    def done(self, result: ShardResult, slot: Slot) -> None:
        self.slowest_batch_s = max(self.slowest_batch_s, result.seconds / max(result.batches, 1))
        self.changed[slot.name] = self.clock()
        self.live.pop(slot.name, None)

    def partials(self) -> list[dict[str, Any]]:
        return list(self.live.values())

    def _answers(self) -> dict[str, dict[str, Any] | None]:
        """The progress() answers that have come since the last call, by slot, without
        waiting (an actor that has not answered yet keeps its question; an answer that is an
        error is None). Questions to replaced actors are dropped."""
        from ray.exceptions import RayError

        current = {s.name: s.handle for s in self.slots}
        for name, (handle, _) in list(self.asked.items()):
            if current.get(name) is not handle:
                del self.asked[name]
        by_ref = {ref: name for name, (_, ref) in self.asked.items()}
        ready = self._ready_now(list(by_ref))
        try:
            values = self.ray.get(ready)  # all at once: they are here already
        except RayError:  # one of them failed: each on its own
            values = [self._answer(ref) for ref in ready]
        for ref in ready:
            del self.asked[by_ref[ref]]
        return {by_ref[ref]: value for ref, value in zip(ready, values)}

    def _answer(self, ref: Any) -> dict[str, Any] | None:
        from ray.exceptions import RayError

        try:
            return self.ray.get(ref)
        except RayError:
            return None

    def check(self, in_flight: dict[Any, tuple[Slot, Any, Any, int]]) -> None:
        """Every `every_s`: take the answers that have come, ask the busy actors that have no
        question pending, and kill those whose counts stopped moving. Never waits."""
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        working = [s for s in self.slots if s.alive and s.in_flight]
        self._note_constructed(working, now)
        answers = self._answers()
        for slot in working:
            if self.constructed.get(slot.name) is not slot.handle:
                continue
            if slot.name not in self.asked:
                ref = slot.handle.progress.options(concurrency_group="monitor").remote()
                self.asked[slot.name] = (slot.handle, ref)
            live = answers.get(slot.name)
            key = None if live is None else (live.get("shard"), live.get("batches"))
            if live is not None and key != self.seen.get(slot.name):
                self.seen[slot.name], self.changed[slot.name] = key, now
                self.live[slot.name] = live
                continue
            quiet = now - self.changed.setdefault(slot.name, now)
            if quiet > self.timeout():
                self._kill_stalled(slot, quiet, in_flight, now)

    def _kill_stalled(
        self, slot: Slot, quiet: float, in_flight: dict[Any, tuple[Slot, Any, Any, int]], now: float
    ) -> None:
        stuck = [sh.id for sl, h, sh, _ in in_flight.values() if h is slot.handle]
        log.warning("actor %s made no progress for %.0fs (shards %s): killed and replaced, "
                    "its shards re-queued", slot.name, quiet, stuck)  # fmt: skip
        self.stalls.append({"actor": slot.name, "shards": stuck, "quiet_s": round(quiet, 1)})
        self.live.pop(slot.name, None)
        self.changed[slot.name] = now
        self.ray.kill(slot.handle)


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
