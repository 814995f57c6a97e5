"""Pipelined staging: a staged source is committed chunk by chunk and its shards run while
later chunks are being staged; chunks are deterministic, so a run stopped mid-staging resumes
to the same output; ids and types are checked as chunks arrive; no staged file outlives a
successful job, `corpus.limit`'s left-out inputs included."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from test_dispatch import FakeActor, FakeRay, FakeShard
from test_jobs import (
    assert_equals_clean_run,
    check_exactly_once,
    interrupt_after,
    job,
    notes_table,
    read_out,
    run,
)

from jobs.corpus import list_sources, plan_shards, read_shard, remove_staged, staging
from jobs.corpus.arrivals import Intake, SeenHashes, arrivals
from jobs.dispatch import Dispatcher, Progress, Slot
from jobs.spec import CorpusSpec


def write_csv_gz(path: Path, ids: list[int], seed: int = 0) -> pa.Table:
    """A CSV.gz of synthetic notes (multi-line, quoted) with these ids; its table."""
    table = notes_table(len(ids), seed).set_column(0, "note_id", pa.array(ids, pa.int64()))
    lines = ["note_id,subject_id,text"] + [
        f'{i},{s},"{t.replace(chr(34), chr(34) * 2)}"'
        for i, s, t in zip(*(table[c].to_pylist() for c in table.column_names))
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    return table


def csv_corpus(*paths: Path) -> dict:
    return {"format": "csv", "paths": [str(p) for p in paths], "id_column": "note_id"}


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch):
    """Chunks of 10 rows (2 row groups at shard_rows 5): many chunks from a small file. The
    driver reads the size when it plans, and hands it to the staging tasks."""
    monkeypatch.setattr(staging, "CHUNK_ROWS", 10)


def test_staged_chunks_are_deterministic_and_a_restage_keeps_the_committed_ones(
    tmp_path: Path, small_chunks
):
    """A source staged whole is reused from its completion marker; one whose staging
    stopped midway (no marker, its last chunk missing) is staged again into the same
    chunks, the committed ones kept as they are, and plans the same shards."""
    write_csv_gz(tmp_path / "n.csv.gz", list(range(35)))
    corpus = CorpusSpec.model_validate(csv_corpus(tmp_path / "n.csv.gz"))
    root = tmp_path / "staging"
    staged: list[str] = []
    shards = plan_shards(corpus, str(root), 5, staged=staged)
    chunks = sorted(root.glob("*.parquet"))
    assert [s.num_rows for s in shards] == [5] * 7 and len(chunks) == 4 == len(staged)
    ids = [i for s in shards for b in read_shard(s, corpus, 3) for i in b["id"].to_pylist()]
    assert ids == list(range(35))
    assert plan_shards(corpus, str(root), 5) == shards  # reused from the marker
    (marker,) = root.glob("*.done.json")
    marker.unlink()
    chunks[-1].unlink()
    kept = {p: p.stat().st_mtime_ns for p in chunks[:-1]}
    assert plan_shards(corpus, str(root), 5) == shards
    assert {p: p.stat().st_mtime_ns for p in chunks[:-1]} == kept and chunks[-1].exists()
    remove_staged(str(root), staged)
    assert not root.exists()


def test_a_source_refused_midway_keeps_none_of_its_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A .gz cut short after several chunks were committed is refused whole, by name, and
    none of its chunks stays behind."""
    from jobs.corpus import textfile

    monkeypatch.setattr(textfile, "INFER_BLOCK_BYTES", 4096)  # many blocks, small file
    write_csv_gz(tmp_path / "n.csv.gz", list(range(3000)))
    data = (tmp_path / "n.csv.gz").read_bytes()
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) * 3 // 4])
    corpus = CorpusSpec.model_validate(csv_corpus(tmp_path / "cut.csv.gz"))
    (source,) = list_sources(corpus, 100)
    committed = []
    with pytest.raises(ValueError, match=r"cut\.csv\.gz: cannot read as csv"):
        for parquet in staging.stage_source(source, corpus, str(tmp_path / "st"), 100, 500):
            committed.append(Path(parquet.path).exists())
    assert committed and all(committed)  # chunks were there before the cut was met
    assert not list((tmp_path / "st").glob("*.parquet"))


def test_arrivals_and_intake_check_types_and_ids_as_chunks_come(tmp_path: Path):
    """Each chunk's shards as it arrives; a column whose type differs from an earlier
    chunk's is refused as a plan refuses it; an id met again in a later chunk (of another
    source here) is found and named, a hash alone never is."""
    write_csv_gz(tmp_path / "a.csv.gz", list(range(20)))
    write_csv_gz(tmp_path / "b.csv.gz", [100, 101, 7, 102])  # 7: a's
    (tmp_path / "c.csv").write_text("note_id,subject_id,text\nx1,1,a\n")  # a string id
    corpus = CorpusSpec.model_validate(csv_corpus(tmp_path / "a.csv.gz", tmp_path / "b.csv.gz",
                                                  tmp_path / "c.csv"))  # fmt: skip
    a, b, c = list_sources(corpus, 5)
    st = str(tmp_path / "st")
    intake = Intake(corpus, 5)
    for arrival in arrivals((1, b), corpus, st, 5, 10):  # in any order
        assert len(intake.take(arrival)) == 1
    assert intake.repeated() is None
    taken = [len(intake.take(x)) for x in arrivals((0, a), corpus, st, 5, 10)]
    assert taken == [2, 2] and intake.met
    found = intake.repeated()
    assert (found.ids, found.extra_rows, found.example) == (1, 1, 7)
    assert found.source == str(tmp_path / "a.csv.gz")
    assert [s.source for s in intake.shards()] == [a.path] * 4 + [b.path]
    with pytest.raises(ValueError, match=r"column 'note_id' is int64 in .*b\.csv\.gz but string"):
        intake.take(next(arrivals((2, c), corpus, st, 5, 10)))


def test_the_dry_run_reports_staging_rates_and_the_corpus_staging_time(
    tmp_path: Path, small_chunks
):
    """Each staged input's completion marker records what its staging took; the dry run
    turns that into MB/s per staging task and the corpus's staging time: with a task per
    input (the slowest input's), and in one task (the sum)."""
    from jobs.corpus.staging import staging_times
    from jobs.dry_run import staging_summary

    write_csv_gz(tmp_path / "a.csv.gz", list(range(30)))
    write_csv_gz(tmp_path / "b.csv.gz", list(range(100, 110)), seed=1)
    corpus = CorpusSpec.model_validate(csv_corpus(tmp_path / "a.csv.gz", tmp_path / "b.csv.gz"))
    staged: list[str] = []
    plan_shards(corpus, str(tmp_path / "st"), 5, staged=staged)
    times = staging_times(staged)
    sizes = [(tmp_path / n).stat().st_size for n in ("a.csv.gz", "b.csv.gz")]
    assert [t["input_bytes"] for t in times] == sizes
    assert all(t["seconds"] > 0 and t["data_bytes"] > t["input_bytes"] for t in times)
    got = staging_summary(times)
    seconds = [t["seconds"] for t in times]
    assert got["inputs"] == 2 and got["input_mb"] == sum(sizes) / 1e6
    assert got["projected_s_task_per_input"] == max(seconds)
    assert got["projected_s_one_task"] == pytest.approx(sum(seconds))
    assert got["input_mb_per_s"] == pytest.approx(sum(sizes) / 1e6 / sum(seconds))
    assert staging_summary(staging_times([])) is None


def test_seen_hashes_meet_exactly_where_a_hash_repeats():
    rng = np.random.default_rng(0)
    seen, every = SeenHashes(), []
    for _ in range(40):
        new = np.sort(rng.integers(0, 5000, 60, dtype=np.uint64))
        before = set(np.concatenate(every).tolist()) if every else set()
        repeats = len(set(new.tolist())) < len(new) or bool(before & set(new.tolist()))
        assert seen.add(new) == repeats
        every.append(new)
    assert len(seen.runs) <= 7  # merged as they grow: O(log n) runs
    assert np.array_equal(np.sort(np.concatenate(seen.runs)), np.sort(np.concatenate(every)))


def test_the_dispatcher_takes_shards_that_arrive_while_it_runs():
    """Shards staged at t=0, 3 and 10 (a virtual clock): the first run before the later ones
    exist, the dispatcher waits on staging while it has nothing to run, and ends once staging
    has ended and every shard ran exactly once."""
    fake = FakeRay()
    staged = [(0.0, ["s0", "s1", "s2"]), (3.0, ["s3"]), (10.0, ["s4", "s5"])]
    waits: list[float] = []  # the timeouts `more` was called with
    done_when_staged: dict[str, int] = {}  # shard -> shards done when it was staged

    def more(timeout_s: float) -> list[FakeShard] | None:
        waits.append(timeout_s)
        if not staged:
            return None
        if timeout_s and staged[0][0] > fake.now:  # nothing to wait on but staging
            fake.now = staged[0][0]
        ready = []
        while staged and staged[0][0] <= fake.now:
            ready += [FakeShard(s) for s in staged.pop(0)[1]]
        done_when_staged.update((s.id, len(dispatcher.outcome.results)) for s in ready)
        return ready

    slots = [Slot("cpu", 0, FakeActor("cpu", 1.0))]
    dispatcher = Dispatcher(slots, submit=fake.submit, restart=lambda s: None, ray_api=fake)
    outcome = dispatcher.run([], more)
    assert [r.shard_id for r in outcome.results] == [f"s{i}" for i in range(6)]
    assert not outcome.failed and fake.tasks == 6 and fake.now == 12.0
    assert done_when_staged == {"s0": 0, "s1": 0, "s2": 0, "s3": 3, "s4": 4, "s5": 4}
    assert waits[0] == 1.0 and 1.0 in waits[1:]  # idle at t=0 and t=4: it waited on staging


def test_progress_counts_a_total_that_grows_while_staging():
    class Stream:
        def __init__(self):
            self.lines: list[str] = []

        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> None:
            self.lines += [t for t in text.splitlines() if t]

        def flush(self) -> None:
            pass

    stream = Stream()
    progress = Progress(10, interval_s=1e9, stream=stream, total_shards=2, staging=True)
    assert "0/10+ rows (0.0% of those staged so far; staging)" in progress.line()
    progress.grow(15, 3, staging=False)
    assert "0/25 rows (0.0%): " in progress.line() and "shards 0/5" in progress.line()
    progress.close()
    assert stream.lines[-1].startswith("done: 0/25 rows")


on_ray = pytest.mark.ray


@on_ray
def test_a_csv_gz_job_encodes_while_it_is_staged_and_equals_a_clean_run(
    tmp_path, model_dir, ray_local, slowdown, small_chunks
):
    """Staging holds after its first chunk until a shard has been committed (a file the
    driver's result hook writes): the job ends only because encoding ran while the CSV.gz
    was still being staged; every row exactly once, as a clean run writes it."""
    table = write_csv_gz(tmp_path / "notes.csv.gz", list(range(100, 145)))
    spec = job(tmp_path, model_dir, csv_corpus(tmp_path / "notes.csv.gz"),
               run={"shard_rows": 5, "batch_rows": 4, "progress_interval_s": 0.5})  # fmt: skip
    gate = tmp_path / "gate"
    slowdown({"staging_gate": str(gate)})
    gate_shut_at_first_result = []

    def on_result(result, slot, slots):
        if not gate_shut_at_first_result:
            gate_shut_at_first_result.append(not gate.exists())
        gate.touch()

    report = run(spec, tmp_path, on_result=on_result)
    assert gate_shut_at_first_result == [True] and not Path(f"{gate}.timeout").exists()
    assert report["rows_in"] == 45 == report["rows_out"] and report["shards"]["total"] == 9
    result = assert_equals_clean_run(tmp_path / "out", spec, tmp_path)
    check_exactly_once(table["note_id"].to_pylist(), result, None)
    assert not (tmp_path / "out.staging").exists()  # every chunk removed on success


@on_ray
def test_a_pipelined_runs_id_verdict_is_kept_for_a_resume(
    tmp_path, model_dir, ray_local, small_chunks, caplog
):
    """Staging over, every chunk's ids checked as it came: the verdict is kept, so a run
    planned whole from the staged chunks (all of them complete) reads no id again."""
    import json
    import logging

    caplog.set_level(logging.INFO, logger="jobs")
    write_csv_gz(tmp_path / "notes.csv.gz", list(range(45)))
    spec = job(tmp_path, model_dir, csv_corpus(tmp_path / "notes.csv.gz"),
               run={"shard_rows": 5, "batch_rows": 4, "keep_staged": True})  # fmt: skip
    run(spec, tmp_path)
    assert "staging done: 9 shards" in caplog.text  # staged while it ran
    assert json.loads((tmp_path / "out" / "_ids.json").read_text())["repeated"] is None
    caplog.clear()
    report = run(spec, tmp_path)
    assert "staging done" not in caplog.text  # planned whole from the kept chunks
    assert "the corpus is unchanged since a run that checked them" in caplog.text
    assert "ids checked for repeats (" not in caplog.text
    assert report["shards"]["committed_before"] == 9


@on_ray
def test_a_run_stopped_mid_staging_resumes_to_a_clean_run(
    tmp_path, model_dir, ray_local, slowdown, small_chunks
):
    """Ctrl-C at the first committed shard, while staging holds after its first chunk: the
    rest of the source is never staged; the same job then stages it again into the same
    chunks (the committed one kept as it is) and ends equal to a clean run."""
    table = write_csv_gz(tmp_path / "notes.csv.gz", list(range(45)))
    spec = job(tmp_path, model_dir, csv_corpus(tmp_path / "notes.csv.gz"),
               run={"shard_rows": 5, "batch_rows": 4})  # fmt: skip
    slowdown({"staging_gate": str(tmp_path / "never")})
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path, on_result=interrupt_after(1))
    staged = tmp_path / "out.staging"
    (first,) = staged.glob("*-00000.parquet")
    assert not list(staged.glob("*.done.json")) and not list(staged.glob("*-00004.parquet"))
    mtime = first.stat().st_mtime_ns
    parts = len(list((tmp_path / "out").glob("part-*.parquet")))
    assert parts >= 1 and not (tmp_path / "out" / "_SUCCESS").exists()
    slowdown({})
    report = run({**spec, "run": spec["run"] | {"keep_staged": True}}, tmp_path)
    assert report["shards"]["committed_before"] == parts and first.stat().st_mtime_ns == mtime
    result = assert_equals_clean_run(tmp_path / "out", spec, tmp_path)
    check_exactly_once(table["note_id"].to_pylist(), result, None)
    # the first run's staging task ended with it: it never sat out its gate (GATE_S)
    assert not (tmp_path / "never.timeout").exists()


def _deaf(heard: str):
    """Arrivals that a cancel does not stop: the interrupt noted, and ignored."""
    import os
    import time

    yield os.getpid()
    for _ in range(1200):
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            Path(heard).write_text("interrupted")
    yield "never cancelled"


def _obedient(_):
    """Arrivals that a cancel stops: Python code running (a cancel sets Python's interrupt
    flag; one blocking call, e.g. a 60 s sleep, would not see it until it returns)."""
    import os
    import time

    yield os.getpid()
    for _ in range(1200):
        time.sleep(0.05)


@on_ray
def test_stopped_tasks_end_and_a_task_deaf_to_its_cancel_loses_its_worker(sigint_ignored, tmp_path):
    """`stop_tasks` returns once every task has ended: a staging task its cancel interrupts
    (in workers that inherited an ignored SIGINT too) ends so, its worker kept; one still
    running after the grace is cancelled with force, its worker killed."""
    import time

    from jobs.fs import current_umask
    from jobs.launch import stop_tasks
    from jobs.pipeline import _staged_stream

    ray, heard = sigint_ignored, tmp_path / "heard"
    task = ray.remote(num_cpus=1)(_staged_stream)
    deaf = task.remote(_deaf, str(heard), current_umask())
    obedient = task.remote(_obedient, None, current_umask())
    pids = [ray.get(next(gen)) for gen in (deaf, obedient)]
    t0 = time.monotonic()
    stop_tasks([deaf, obedient], grace_s=1.0)
    assert time.monotonic() - t0 < 20
    ends = [deaf.completed(), obedient.completed()]
    assert len(ray.wait(ends, num_returns=2, timeout=0)[0]) == 2  # both ended
    assert heard.read_text() == "interrupted"  # the cancel reached it, and was ignored
    for end in ends:
        with pytest.raises((ray.exceptions.TaskCancelledError, ray.exceptions.WorkerCrashedError)):
            ray.get(end)
    deadline = time.monotonic() + 10
    while _alive(pids[0]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pids[0]) and _alive(pids[1])  # only the deaf one's worker was killed


def _slow_or_refused(item: str, ended: str) -> None:
    import time

    if item == "refused":
        raise ValueError("input refused")
    try:
        for _ in range(1200):
            time.sleep(0.05)
    finally:
        Path(ended).write_text(item)


@on_ray
def test_an_input_refused_in_ray_map_stops_the_other_inputs_tasks(sigint_ignored, tmp_path, caplog):
    """The other inputs' tasks end before ray_map raises, their cancel enough (no worker
    killed), in workers that inherited an ignored SIGINT too."""
    from functools import partial

    from jobs.launch import ray_map

    ended = tmp_path / "ended"
    with pytest.raises(ValueError, match="input refused"):
        ray_map(partial(_slow_or_refused, ended=str(ended)), ["slow", "refused"])
    assert ended.read_text() == "slow"  # ended before ray_map raised, not a minute later
    assert "workers are killed" not in caplog.text


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@on_ray
def test_a_repeated_id_in_a_later_chunk_ends_the_run_naming_it(
    tmp_path, model_dir, ray_local, slowdown, small_chunks
):
    """Id 103 again in the last chunk, met while shards of the first run: the run ends with
    the line a plan's check gives (the id and its file); committed parts stay, no _SUCCESS."""
    from jobs.spec import SpecError

    ids = list(range(100, 140)) + [103]
    write_csv_gz(tmp_path / "notes.csv.gz", ids)
    spec = job(tmp_path, model_dir, csv_corpus(tmp_path / "notes.csv.gz"),
               run={"shard_rows": 5, "batch_rows": 4})  # fmt: skip
    gate = tmp_path / "gate"
    slowdown({"staging_gate": str(gate)})
    with pytest.raises(SpecError) as refused:
        run(spec, tmp_path, on_result=lambda *_: gate.touch())
    line = str(refused.value)
    assert "corpus.id_column: 'note_id' is not unique: 1 id is on more than one row" in line
    assert f"e.g. 103 in {tmp_path / 'notes.csv.gz'}" in line
    out = tmp_path / "out"
    assert list(out.glob("part-*.parquet")) and not (out / "_SUCCESS").exists()


@on_ray
def test_corpus_limit_leaves_no_staged_file_behind(tmp_path, model_dir, ray_local, small_chunks):
    """`corpus.limit` keeps the first rows of the first input; the inputs it leaves out were
    staged too (the plan needs them whole), and every chunk and marker goes on success."""
    write_csv_gz(tmp_path / "a.csv.gz", list(range(30)))
    write_csv_gz(tmp_path / "b.csv.gz", list(range(100, 130)), seed=1)
    corpus = csv_corpus(tmp_path / "a.csv.gz", tmp_path / "b.csv.gz") | {"limit": 12}
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 4})
    report = run(spec, tmp_path)
    assert report["rows_out"] == 12 and report["shards"]["total"] == 3
    assert sorted(read_out(tmp_path / "out")[0]["id"].to_pylist()) == list(range(12))
    assert (tmp_path / "out" / "_SUCCESS").exists() and not (tmp_path / "out.staging").exists()
    assert not [p for p in tmp_path.rglob("*.parquet") if "staging" in str(p)]
