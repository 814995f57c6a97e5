"""`clinicalbert bench --dispatch`: the driver's own cost per dispatched shard, and per progress
round, with as many actors as a large cluster has.

The real Dispatcher and Monitor run against fake actors (no Ray, no model): each fake shard
task ends `seconds` after its actor is free, on a virtual clock, and every actor answers its
progress questions at once. What is timed is therefore the driver's bookkeeping alone: what
it costs to hand out one shard and collect its result (`dispatch_us_per_shard`, the wait
rounds it took) and one round of the stall/progress watch over every busy actor
(`monitor_ms_per_round`). With Ray, each wait and each question is also a call into Ray's
core worker; the counts printed (wait rounds, questions per round) say how many there are.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass
from typing import Any

from ..dispatch import Dispatcher, Slot
from ..parts import ShardResult
from ..watch import Monitor


@dataclass(frozen=True)
class Shard:
    id: str
    source: str = "bench.parquet"
    row_groups: tuple[int, ...] = (0,)
    num_rows: int = 1


@dataclass(eq=False)
class Task:
    actor: Actor
    shard: Shard
    finish: float
    value: Any = None  # what get() returns (a progress answer is ready at once)


class Method:
    """`actor.method.options(...).remote()`: a task that is ready at once with `answer`."""

    def __init__(self, actor: Actor, answer: Any):
        self.actor, self.answer = actor, answer

    def options(self, **_: Any) -> Method:
        return self

    def remote(self) -> Task:
        self.actor.questions += 1
        return Task(self.actor, Shard("-"), 0.0, self.answer)


class Actor:
    def __init__(self, name: str, seconds: float):
        self.name, self.seconds, self.free_at, self.questions = name, seconds, 0.0, 0
        self.describe = Method(self, {})
        self.progress = Method(self, {"shard": "s", "batches": 1})


class VirtualRay:
    """wait/get/kill over fake tasks on a virtual clock; pending shard tasks in a heap, so the
    fake's own cost stays small next to the dispatcher's."""

    def __init__(self) -> None:
        self.now, self.waits = 0.0, 0
        self.heap: list[tuple[float, int, Task]] = []
        self.seq = itertools.count()

    def submit(self, actor: Actor, shard: Shard) -> Task:
        actor.free_at = max(self.now, actor.free_at) + actor.seconds
        task = Task(actor, shard, actor.free_at)
        heapq.heappush(self.heap, (task.finish, next(self.seq), task))
        return task

    def wait(self, refs: list[Task], num_returns: int = 1, timeout: float | None = None) -> Any:
        self.waits += 1
        if refs and refs[0].shard.id == "-":  # monitor questions: answered at once
            return refs, []
        if timeout != 0 and self.heap:
            self.now = max(self.now, self.heap[0][0])
        done = []
        while self.heap and self.heap[0][0] <= self.now and len(done) < num_returns:
            done.append(heapq.heappop(self.heap)[2])
        taken = set(map(id, done))
        return done, [r for r in refs if id(r) not in taken]  # both lists, as Ray's

    def get(self, ref: Any) -> Any:
        if isinstance(ref, list):
            return [self.get(r) for r in ref]
        if ref.value is not None:
            return ref.value
        return ShardResult(ref.shard.id, "bench", ref.actor.name, rows_in=1, rows_out=1)

    def kill(self, actor: Actor) -> None:
        pass


def dispatch_bench(actors: int, shards: int) -> dict[str, Any]:
    """Figures of one run of `shards` shards over `actors` fake actors of four speeds."""
    fake = VirtualRay()
    slots = [Slot("bench", i, Actor(f"a{i}", 1.0 + (i % 4) * 0.5)) for i in range(actors)]
    dispatcher = Dispatcher(slots, submit=fake.submit, restart=lambda s: None, ray_api=fake)
    t0 = time.perf_counter()
    outcome = dispatcher.run([Shard(f"s{i}") for i in range(shards)])
    dispatch_s = time.perf_counter() - t0
    assert len(outcome.results) == shards and not outcome.failed

    for slot in slots:  # every actor busy: the monitor's round at its largest
        slot.in_flight = 1
    monitor = Monitor(slots, timeout_s=None, every_s=0.0, ray_api=fake)
    asked_at_start = sum(s.handle.questions for s in slots)  # each actor's describe()
    rounds = 20
    t0 = time.perf_counter()
    for _ in range(rounds):
        monitor.check({})
    monitor_s = (time.perf_counter() - t0) / rounds
    questions = (sum(s.handle.questions for s in slots) - asked_at_start) / rounds
    return {
        "actors": actors,
        "shards": shards,
        "dispatch_s": round(dispatch_s, 3),
        "dispatch_us_per_shard": round(dispatch_s / shards * 1e6, 1),
        "wait_calls_per_shard": round(fake.waits / shards, 4),
        "monitor_ms_per_round": round(monitor_s * 1e3, 2),
        "monitor_questions_per_round": round(questions, 1),
    }


def print_dispatch(result: dict[str, Any]) -> None:
    r = result
    print(f"dispatch: {r['shards']:,} shards over {r['actors']:,} fake actors in "
          f"{r['dispatch_s']:.2f}s of driver time = {r['dispatch_us_per_shard']:.1f} us per "
          f"shard ({r['wait_calls_per_shard']:.3f} wait calls per shard)")  # fmt: skip
    print(f"monitor: {r['monitor_ms_per_round']:.2f} ms per progress round over every busy "
          f"actor, {r['monitor_questions_per_round']:.0f} questions per round, never waiting")  # fmt: skip
