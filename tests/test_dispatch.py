"""The dispatcher's scheduling without Ray: fake actors on a virtual clock (no wall time, no
race). Each fake shard task finishes `seconds` after its actor is free; `wait` returns the task
that finishes first and moves the clock there."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from ray.exceptions import RayActorError, RayTaskError

from jobs.dispatch import Dispatcher, Slot
from jobs.parts import ShardResult
from jobs.watch import Monitor


@dataclass(frozen=True)
class FakeShard:
    id: str
    source: str = "in.parquet"
    row_groups: tuple[int, ...] = (0,)
    num_rows: int = 5


@dataclass(eq=False)
class FakeActor:
    pool: str
    seconds: float  # per shard
    dies_after: int | None = None  # shards it finishes before its process dies
    cannot_start: bool = False  # its __init__ raised
    free_at: float = 0.0
    done: int = 0
    killed: bool = False


@dataclass(eq=False)
class FakeTask:
    actor: FakeActor
    shard: FakeShard
    finish: float


@dataclass
class FakeRay:
    """wait/get/kill as the dispatcher uses them; `errors[shard id]` fails a shard's tasks."""

    now: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # shard id -> attempts that fail
    tasks: int = 0
    waits: int = 0

    def submit(self, actor: FakeActor, shard: FakeShard) -> FakeTask:
        self.tasks += 1
        actor.free_at = max(self.now, actor.free_at) + actor.seconds
        return FakeTask(actor, shard, actor.free_at)

    def wait(self, refs, num_returns=1, timeout=None):
        self.waits += 1
        if timeout == 0:  # what has finished by now, the clock unmoved
            done = [r for r in refs if r.finish <= self.now][:num_returns]
            taken = set(map(id, done))
            return done, [r for r in refs if id(r) not in taken]
        first = min(refs, key=lambda t: t.finish)
        self.now = max(self.now, first.finish)
        return [first], [r for r in refs if r is not first]

    def get(self, task: FakeTask) -> ShardResult:
        actor = task.actor
        if actor.cannot_start:
            raise RayActorError(actor_init_failed=True, error_msg="ValueError: no mps device")
        if actor.killed or (actor.dies_after is not None and actor.done >= actor.dies_after):
            actor.killed = True
            raise RayActorError()
        if self.errors.get(task.shard.id, 0) > 0:
            self.errors[task.shard.id] -= 1
            raise RayTaskError("process", "traceback", ValueError("a corrupt page"))
        actor.done += 1
        return ShardResult(task.shard.id, actor.pool, f"{actor.pool}-0", rows_in=5, rows_out=5)

    def kill(self, actor: FakeActor) -> None:
        actor.killed = True


def dispatch(actors: list[FakeActor], shards: int, fake: FakeRay | None = None, **kw):
    fake = fake or FakeRay()
    slots = [Slot(a.pool, 0, a) for a in actors]
    spares = iter(kw.pop("spares", []))
    dispatcher = Dispatcher(
        slots, submit=fake.submit, restart=lambda slot: next(spares), ray_api=fake, **kw
    )
    outcome = dispatcher.run([FakeShard(f"s{i:03d}") for i in range(shards)])
    return outcome, dispatcher, fake


def by_pool(outcome) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in outcome.results:
        counts[r.pool] = counts.get(r.pool, 0) + 1
    return counts


def test_a_faster_actor_pulls_proportionally_more_shards():
    outcome, _, fake = dispatch([FakeActor("fast", 1.0), FakeActor("slow", 4.0)], 20)
    # 4x as fast: 4x the shards but for the one the slow actor holds queued (2 in flight)
    assert by_pool(outcome) == {"fast": 15, "slow": 5}
    assert sorted(r.shard_id for r in outcome.results) == [f"s{i:03d}" for i in range(20)]
    assert not outcome.failed and outcome.retries == 0 and fake.tasks == 20


def test_each_slot_holds_at_most_max_in_flight():
    seen = []
    fake = FakeRay()

    def submit(actor, shard):
        seen.append(sum(1 for t in dispatcher.in_flight if t.actor is actor) + 1)
        return fake.submit(actor, shard)

    slots = [Slot("cpu", 0, FakeActor("cpu", 1.0))]
    dispatcher = Dispatcher(slots, submit=submit, restart=lambda s: None, ray_api=fake)
    dispatcher.run([FakeShard(f"s{i}") for i in range(7)])
    assert max(seen) == 2 and len(seen) == 7


def test_a_failing_shard_is_retried_then_recorded_and_the_rest_goes_on():
    fake = FakeRay(errors={"s001": 1, "s002": 5})
    outcome, _, _ = dispatch([FakeActor("cpu", 1.0)], 4, fake, max_attempts=3)
    assert sorted(r.shard_id for r in outcome.results) == ["s000", "s001", "s003"]
    (failed,) = outcome.failed
    assert (failed.shard_id, failed.attempts) == ("s002", 3)
    assert failed.error == "ValueError: a corrupt page"
    assert outcome.retries == 1 + 2


def test_a_dead_actor_is_restarted_and_its_shards_rerun_once():
    spare = FakeActor("cpu", 1.0)
    outcome, dispatcher, _ = dispatch(
        [FakeActor("cpu", 1.0, dies_after=2)], 8, spares=[spare], max_attempts=3
    )
    assert sorted(r.shard_id for r in outcome.results) == [f"s{i:03d}" for i in range(8)]
    assert outcome.actor_restarts == 1 and dispatcher.slots[0].handle is spare
    assert outcome.retries == 2  # the two shards in flight when it died


def test_an_actor_that_cannot_start_costs_no_attempt():
    broken = FakeActor("mac", 1.0, cannot_start=True)
    outcome, dispatcher, _ = dispatch(
        [broken, FakeActor("cpu", 1.0)], 6, spares=[broken, broken], max_attempts=1
    )
    assert by_pool(outcome) == {"cpu": 6} and not outcome.failed and outcome.retries == 0
    assert outcome.actor_restarts == 2 and not dispatcher.slots[0].alive


def test_no_live_actor_left_fails_the_rest_naming_the_last_death():
    outcome, _, _ = dispatch([FakeActor("cpu", 1.0, dies_after=1)], 5, max_restarts=0)
    assert len(outcome.results) == 1 and len(outcome.failed) == 4
    assert all(f.error.startswith("no live actor left (the last: actor cpu-0 died") or
               f.error == "actor cpu-0 died: RayActorError" for f in outcome.failed)  # fmt: skip


def test_the_death_of_an_actor_a_shard_waited_on_stops_the_run_not_its_actor():
    """A shard task fails with another actor's death (the commit gate's, whose trust() answer
    is an argument of every attempt): no restart, no retry; the run stops naming it."""

    class Id:
        def __init__(self, name):
            self.name = name

        def hex(self):
            return self.name

    actor = FakeActor("cpu", 1.0)
    actor._actor_id = Id("encoder")
    fake = FakeRay()
    get = fake.get

    def gate_dies(task):
        if task.shard.id == "s001":
            raise RayActorError(actor_id="gate")
        return get(task)

    fake.get = gate_dies
    with pytest.raises(RuntimeError, match="shard s001: an actor it depends on died, not its own"):
        dispatch([actor], 4, fake)
    assert not actor.killed and actor.done == 1


def test_stop_kills_every_actor_and_an_interrupt_keeps_the_results_so_far():
    actors = [FakeActor("a", 1.0), FakeActor("b", 1.0)]
    fake = FakeRay()
    slots = [Slot(a.pool, 0, a) for a in actors]

    def interrupt(result, slot):
        if len(dispatcher.outcome.results) == 3:
            raise KeyboardInterrupt

    dispatcher = Dispatcher(slots, fake.submit, lambda s: None, on_result=interrupt, ray_api=fake)
    with pytest.raises(KeyboardInterrupt):
        dispatcher.run([FakeShard(f"s{i}") for i in range(10)])
    dispatcher.stop(timeout_s=0)
    assert len(dispatcher.outcome.results) == 3 and all(a.killed for a in actors)


def test_a_thousand_actors_and_fifty_thousand_shards_keep_every_actor_busy():
    """At cluster scale the dispatcher's own work stays per shard, not per shard x actor: every
    actor is kept busy in proportion to its speed, never holds more than max_in_flight, and
    results are collected in bursts (one round of waits per moment some shards end)."""
    actors = [FakeActor(f"p{i % 4}", 1.0 + (i % 4) * 0.5) for i in range(1000)]
    slots = [Slot(a.pool, i, a) for i, a in enumerate(actors)]
    fake = FakeRay()
    held: dict[int, int] = {}  # actor -> its tasks not yet collected
    finishes: set[float] = set()
    get = fake.get

    def submit(actor, shard):
        held[id(actor)] = held.get(id(actor), 0) + 1
        assert held[id(actor)] <= 2  # max_in_flight
        task = fake.submit(actor, shard)
        finishes.add(task.finish)
        return task

    def collect(task):
        held[id(task.actor)] -= 1
        return get(task)

    fake.get = collect
    dispatcher = Dispatcher(slots, submit=submit, restart=lambda s: None, ray_api=fake)
    outcome = dispatcher.run([FakeShard(f"s{i:05d}") for i in range(50_000)])
    assert len(outcome.results) == 50_000 and not outcome.failed
    assert len({r.shard_id for r in outcome.results}) == 50_000  # each shard once
    busy = [a.done * a.seconds for a in actors]  # each actor's busy time, virtual seconds
    assert min(busy) >= max(busy) - 2 * 2.5  # every one busy until the queue ran dry
    assert fake.waits <= 2 * len(finishes)


# ---- the monitor without Ray: fake handles whose answers come when the test says ---------------
@dataclass(eq=False)
class FakeRef:
    value: object = None
    ready: bool = False


class FakeMethod:
    def __init__(self, log: list):
        self.log = log

    def options(self, **_):
        return self

    def remote(self):
        self.log.append(FakeRef())
        return self.log[-1]


class FakeHandle:
    def __init__(self):
        self.describes: list[FakeRef] = []
        self.questions: list[FakeRef] = []
        self.describe, self.progress = FakeMethod(self.describes), FakeMethod(self.questions)
        self.killed = False


class MonitorRay:
    """wait (never blocking: the monitor must not), get and kill over FakeRefs."""

    def wait(self, refs, num_returns=1, timeout=None):
        assert timeout == 0, "the monitor waited"
        done = [r for r in refs if r.ready]
        return done, [r for r in refs if not r.ready]

    def get(self, refs):
        return [r.value for r in refs] if isinstance(refs, list) else refs.value

    def kill(self, handle):
        handle.killed = True


def test_the_monitor_never_waits_asks_each_actor_once_at_a_time_and_kills_only_the_stalled():
    clock = [0.0]
    working, hung, loading = (Slot("cpu", i, FakeHandle(), in_flight=1) for i in range(3))
    monitor = Monitor([working, hung, loading], timeout_s=3, every_s=1, ray_api=MonitorRay(),
                      clock=lambda: clock[0])  # fmt: skip
    for slot in (working, hung):  # constructed; `loading` is still loading its model
        slot.handle.describes[0].ready = True
    for t in range(1, 9):
        clock[0] = float(t)
        for question in working.handle.questions:  # answers each question by the next round
            question.value, question.ready = {"shard": "s1", "batches": t}, True
        monitor.check({})
    assert hung.handle.killed and not working.handle.killed and not loading.handle.killed
    assert [s["actor"] for s in monitor.stalls] == ["cpu-1"] and monitor.stalls[0]["quiet_s"] > 3
    assert len(hung.handle.questions) == 1  # never answered: never asked again
    assert len(working.handle.questions) == 8 and not loading.handle.questions
    assert monitor.partials() == [{"shard": "s1", "batches": 8}]
