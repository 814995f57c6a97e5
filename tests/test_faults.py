"""Faults at cluster scale on a local Ray: a hung actor, a second run into the same output.

Each asserts exactly-once output (ids and vectors equal to a clean run) and the report's counts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from test_jobs import (
    assert_equals_clean_run,
    check_exactly_once,
    job,
    parquet_corpus,
    read_out,
    run,
)
from test_output import take_lock_over

from jobs.spec import parse_spec
from jobs.synthetic import make_notes

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def vectors(path: Path):
    table, errors = read_out(path)
    table = table.sort_by("id")
    return table["id"].to_pylist(), np.stack(table["embedding"].to_numpy(zero_copy_only=False))


def test_hung_actor_is_replaced_and_its_late_commit_never_lands(tmp_path, model_dir, ray_local):
    import ray

    table, corpus = parquet_corpus(tmp_path, 60)
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5,
                                                 "stall_timeout_s": 3})  # fmt: skip
    stopped: list[int] = []

    def hang_one(result, slot, slots):
        if stopped:
            return
        victim = next(s for s in slots if s is not slot)
        info = ray.get(victim.handle.describe.options(concurrency_group="monitor").remote())
        os.kill(info["pid"], signal.SIGSTOP)  # hung: alive to the OS, silent to everyone
        stopped.append(info["pid"])

    t0 = time.monotonic()
    report = run(spec, tmp_path, on_result=hang_one)
    elapsed = time.monotonic() - t0
    assert stopped and report["stalls"] and report["actor_restarts"] >= 1
    assert report["stalls"][0]["quiet_s"] >= 3 and report["stalls"][0]["shards"]
    with pytest.raises(ProcessLookupError):  # killed (SIGKILL reaches a stopped process)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            os.kill(stopped[0], signal.SIGCONT)
            time.sleep(0.2)
    assert report["rows_out"] == 60 and not report["shards"]["failed"]
    clean = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
    out = assert_equals_clean_run(tmp_path / "out", clean, tmp_path)
    check_exactly_once(table["note_id"].to_pylist(), out, None)  # none lost, none twice
    assert not list((tmp_path / "out").glob(".tmp-*"))
    print(f"hung actor: killed after {report['stalls'][0]['quiet_s']:.1f}s without progress "
          f"(stall timeout 3s), its shards re-queued; job finished in {elapsed:.1f}s")  # fmt: skip


def test_second_run_into_the_same_output_is_refused(tmp_path, model_dir, ray_local):
    from jobs.lock import OutputLock
    from jobs.output import OutputDir

    table, corpus = parquet_corpus(tmp_path, 20)
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
    holder = OutputLock(OutputDir(str(tmp_path / "out")), "other-job")
    holder.acquire()  # another driver (here: this process) holds the dir
    try:
        with pytest.raises(RuntimeError, match=r"in use by another run \(host .*job other-job"):
            run(spec, tmp_path)
    finally:
        holder.release()
    report = run(spec, tmp_path)  # the holder is gone: this run goes ahead
    assert report["rows_out"] == 20
    ids, _ = vectors(tmp_path / "out")
    assert ids == sorted(table["note_id"].to_pylist())


def test_a_run_whose_lock_is_taken_over_stops_and_touches_nothing(
    tmp_path, model_dir, ray_local, monkeypatch
):
    """Its lease lapsed and another run took the dir: this run stops at its next renewal
    without removing the new holder's temp files or lock, and writes no report or _SUCCESS."""
    import json

    import pyarrow.parquet as pq

    from jobs import driver
    from jobs.lock import OutputLock
    from jobs.output import LOCK_FILE

    table, corpus = parquet_corpus(tmp_path, 40)
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
    locks: list[OutputLock] = []
    monkeypatch.setattr(driver, "OutputLock", lambda *a: locks.append(OutputLock(*a, lease_s=0.6))
                        or locks[-1])  # fmt: skip
    out = tmp_path / "out"
    theirs = {"token": "theirs", "host": "elsewhere", "pid": 1, "job": "new-holder",
              "renewed_at": time.time() + 3600, "lease_s": 60}  # fmt: skip

    def take_over(result, slot, slots):
        if not (out / ".tmp-theirs.parquet").exists():
            part = out / ".tmp-theirs.parquet"
            take_lock_over(out, theirs, locks[0],
                           then=lambda: part.write_bytes(b"the new holder's part in progress"))  # fmt: skip

    with pytest.raises(RuntimeError, match="another run took over the lock.*job new-holder"):
        run(spec, tmp_path, on_result=take_over)
    assert (out / ".tmp-theirs.parquet").exists()
    assert json.loads((out / LOCK_FILE).read_text())["job"] == "new-holder"
    assert not (out / "_report.json").exists() and not (out / "_SUCCESS").exists()
    for part in out.glob("part-*.parquet"):  # what this run committed before it stopped
        assert pq.read_metadata(part).num_rows == 5


def test_corrupt_inputs_are_named_and_empty_files_are_zero_rows(tmp_path, model_dir, ray_local):
    import gzip
    import json

    from test_jobs import notes_table

    from jobs.spec import SpecError

    good = notes_table(8)
    rows = [{"id": i, "text": t} for i, t in zip(good["note_id"].to_pylist(),
                                                good["text"].to_pylist())]  # fmt: skip
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "b.jsonl").write_bytes(b"")  # an empty export: zero rows, not an error
    corpus = {"format": "jsonl", "paths": [str(tmp_path / "*.jsonl*")]}
    report = run(job(tmp_path, model_dir, corpus), tmp_path)
    assert report["rows_in"] == 8 == report["rows_out"]

    data = (tmp_path / "a.jsonl.gz").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(data[: len(data) // 2])  # truncated early: the
    with pytest.raises(SpecError, match=r"c.jsonl.gz: cannot read its columns: Truncated"):
        run(job(tmp_path, model_dir, corpus, output={"path": str(tmp_path / "out2")}), tmp_path)
    many = [{"id": 1000 + i, "text": t} for i, t in enumerate(make_notes(300, seed=4))]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:  # header check passes, staging fails
        f.writelines(json.dumps(r) + "\n" for r in many)
    data = (tmp_path / "c.jsonl.gz").read_bytes()
    (tmp_path / "c.jsonl.gz").write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(ValueError) as e:
        run(job(tmp_path, model_dir, corpus, output={"path": str(tmp_path / "out2")}), tmp_path)
    msg = str(e.value)
    assert "c.jsonl.gz: cannot read as jsonl" in msg and "\n" not in msg
    assert "Traceback" not in msg and "ray::" not in msg

    import pyarrow.parquet as pq

    pq.write_table(good, tmp_path / "p1.parquet")
    (tmp_path / "p2.parquet").write_bytes(b"not parquet at all, just bytes")
    pcorpus = {"format": "parquet", "paths": [str(tmp_path / "p*.parquet")],
               "id_column": "note_id"}  # fmt: skip
    with pytest.raises(SpecError, match=r"corpus.paths: .*p2.parquet: cannot read its columns"):
        run(job(tmp_path, model_dir, pcorpus, output={"path": str(tmp_path / "out3")}), tmp_path)


@pytest.mark.parametrize("column", [0, 2], ids=["id", "text"])
def test_a_corrupt_data_page_behind_a_good_footer_fails_its_shard_by_name(
    tmp_path, model_dir, ray_local, column
):
    """Only reading the data finds this, in the text column or in the ids the planning reads
    (one rule: the page fails only its shard): that shard fails (named: file, row group,
    rows), the rest completes exactly as a clean run of the good file, nothing is written
    for it, and `validate` names the file and row group of a corrupt id page."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_jobs import notes_table

    from jobs.preflight import check_plan

    good, bad = notes_table(10), notes_table(10, seed=1)
    bad = bad.set_column(0, "note_id", pa.array(range(500, 510), pa.int64()))
    (tmp_path / "in").mkdir()
    pq.write_table(good, tmp_path / "in" / "a.parquet")
    pq.write_table(bad, tmp_path / "in" / "b.parquet", compression="snappy")
    data = bytearray((tmp_path / "in" / "b.parquet").read_bytes())
    footer = pq.ParquetFile(tmp_path / "in" / "b.parquet").metadata.row_group(0).column(column)
    start = footer.data_page_offset + min(64, footer.total_compressed_size // 2)
    size = min(256, footer.total_compressed_size // 2)  # inside the column's first data page
    data[start : start + size] = bytes(b ^ 0x5A for b in data[start : start + size])
    (tmp_path / "in" / "b.parquet").write_bytes(bytes(data))
    corpus = {"format": "parquet", "paths": [str(tmp_path / "in")], "id_column": "note_id"}
    spec = job(tmp_path, model_dir, corpus, run={"max_shard_attempts": 2})
    planned = check_plan(parse_spec(spec, tmp_path))
    if column == 0:
        (line,) = planned
        assert line.startswith(f"corpus: {tmp_path / 'in' / 'b.parquet'}: row groups 0: cannot")
    else:
        assert planned == []
    report = run(spec, tmp_path)
    (failed,) = report["shards"]["failed"]
    assert failed["source"].endswith("b.parquet") and failed["rows"] == 10
    assert failed["row_groups"] == [0] and failed["attempts"] == 2
    assert report["rows_out"] == 10 and not (tmp_path / "out" / "_SUCCESS").exists()
    out, _ = read_out(tmp_path / "out")
    assert sorted(out["id"].to_pylist()) == good["note_id"].to_pylist()
    (tmp_path / "in" / "b.parquet").unlink()  # the good file alone, run clean
    assert_equals_clean_run(tmp_path / "out", spec, tmp_path)


def test_a_lost_worker_node_and_the_job_completes_exactly_once(tmp_path, model_dir, own_ray):
    """A 3-node cluster on this machine (Ray's cluster_utils); a worker node is removed while
    its actor works: the shards re-run on the other nodes, nothing lost or written twice."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # actors on workers
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    extra = cluster.add_node(num_cpus=1)  # room for a replacement actor
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    try:
        table, corpus = parquet_corpus(tmp_path, 60)
        spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
        removed: list[str] = []

        def lose_a_node(result, slot, slots):
            if removed:
                return
            victim = next(s for s in slots if s is not slot)
            node_id = ray.get(victim.handle.describe.options(concurrency_group="monitor")
                              .remote())["node_id"]  # fmt: skip
            node = next(w for w in [*workers, extra] if w.node_id == node_id)
            cluster.remove_node(node)
            removed.append(node_id)

        report = run(spec, tmp_path, on_result=lose_a_node)
        assert removed and report["actor_restarts"] >= 1 and not report["shards"]["failed"]
        assert report["rows_out"] == 60
        ids, _ = vectors(tmp_path / "out")
        assert ids == sorted(table["note_id"].to_pylist())
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_undecodable_ids_and_kept_values_keep_the_column_types(tmp_path, model_dir, ray_local):
    import gzip

    import pyarrow as pa

    from jobs.verify import verify_output

    good = b"".join(b"n%d,h%d,pt was seen on day %d\n" % (i, i, i) for i in range(40))
    with gzip.open(tmp_path / "notes.csv.gz", "wb") as f:
        f.write(b"ROW_ID,HADM,TEXT\n" + good + b"n\xff901,h901,a note\nn902,h\xfe902,another\n")
    corpus = {"format": "csv", "paths": [str(tmp_path / "notes.csv.gz")], "id_column": "ROW_ID",
              "text_column": "TEXT", "keep_columns": ["HADM"]}  # fmt: skip
    report = run(job(tmp_path, model_dir, corpus), tmp_path)
    assert report["errors_by_reason"] == {"undecodable": 1} and report["rows_out"] == 41
    assert report["nulled_values"] == {"HADM": 1}
    out, errors = read_out(tmp_path / "out")
    assert out.schema.field("id").type == pa.string() == out.schema.field("HADM").type
    row = next(r for r in out.to_pylist() if r["id"] == "n902")
    assert row["HADM"] is None and row["embedding"] is not None
    assert sorted(errors.select(["id", "reason", "column"]).to_pylist(), key=str) == sorted([
        {"id": None, "reason": "undecodable", "column": None},
        {"id": "n902", "reason": "undecodable_value", "column": "HADM"},
    ], key=str)  # fmt: skip
    assert verify_output(str(tmp_path / "out")) == []


class CliDriver:
    """The CLI (`python -m jobs run`) on `spec` in its own processes, each driver with its own
    local Ray (RAY_TMPDIR per driver, short AF_UNIX paths). close() ends whatever a started
    driver left running, and only that: its process tree, its Ray's processes and temp dir."""

    def __init__(self, tmp_path: Path, spec: dict):
        import sys

        import yaml

        (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
        # the CLI (python -m jobs run) with its Ray's workers slowed as self.slowdown_file says
        script = Path(__file__).resolve().parent / "slowdown.py"
        self.cmd = [sys.executable, str(script), "run", str(tmp_path / "job.yaml")]
        self.slowdown_file = tmp_path / "slowdown.json"
        self.repo = Path(__file__).resolve().parents[1]
        self.temps: list[str] = []
        self.procs: list = []
        self.tree: dict[int, tuple[str, str]] = {}  # a started driver's processes, once seen

    def env(self, slowdown: dict) -> dict:
        import json
        import tempfile

        from slowdown import ENV

        self.temps.append(tempfile.mkdtemp(prefix="rayf-", dir="/tmp"))
        self.slowdown_file.write_text(json.dumps(slowdown))
        return {**os.environ, "RAY_TMPDIR": self.temps[-1], ENV: str(self.slowdown_file)}

    def start(self, slowdown: dict | None = None):
        """A driver in the background, stdout and stderr piped; SIGINT's default action back
        (a test run started in the background, `make test &`, has it ignored, and an ignored
        SIGINT is inherited across exec)."""
        import subprocess

        default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(self.cmd, env=self.env(slowdown or {}), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=self.repo,
                                preexec_fn=default_sigint)  # fmt: skip
        self.procs.append(proc)
        return proc

    def run(self):
        """A driver to its end: the CompletedProcess."""
        import subprocess

        return subprocess.run(self.cmd, env=self.env({}), capture_output=True, text=True,
                              timeout=300, cwd=self.repo)  # fmt: skip

    def raylet(self, proc) -> int:
        """The pid of `proc`'s own raylet (recording its process tree for close())."""
        self.tree.update(_tree(proc.pid))
        raylets = [pid for pid, (_, name) in self.tree.items() if name == "raylet"]
        assert len(raylets) == 1, self.tree  # this driver's own local Ray: one node
        return raylets[0]

    def close(self) -> None:
        import shutil

        from test_submit import stop_head

        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for pid in _still_running(self.tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for temp in self.temps:
            stop_head(temp)
            shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def cli(tmp_path):
    drivers: list[CliDriver] = []
    yield lambda spec: drivers.append(CliDriver(tmp_path, spec)) or drivers[-1]
    for d in drivers:
        d.close()


def test_driver_interrupted_then_killed_then_resumed(tmp_path, model_dir, own_ray, cli):
    """The CLI driver in its own process (its own local Ray), stopped twice on one output:
    SIGINT stops its actors and writes a partial report (exit 130, no lock left); the resumed
    run, SIGKILLed, leaves a stale lock the next run takes over. That run completes and its
    output equals a clean run, each row written once."""
    import json

    from test_submit import stop_head

    table, corpus = parquet_corpus(tmp_path, 60)
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5,
                                                 "progress_interval_s": 0.2})  # fmt: skip
    driver = cli(spec)
    out = tmp_path / "out"

    def stop_after_parts(count: int, sig: signal.Signals) -> tuple[int, str]:
        proc = driver.start({"cpu": 0.3})
        deadline = time.monotonic() + 120
        while len(list(out.glob("part-*.parquet"))) < count and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        assert len(list(out.glob("part-*.parquet"))) >= count, "no new shard was committed"
        driver.tree.update(_tree(proc.pid))  # its Ray's processes, actors included
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        return proc.returncode, err

    code, err = stop_after_parts(2, signal.SIGINT)
    assert code == 130 and "interrupted" in err.splitlines()[-1]
    partial = json.loads((out / "_report.json").read_text())
    assert partial["interrupted"] is True and partial["stop_reason"] == "interrupted (Ctrl-C)"
    assert not (out / "_lock.json").exists() and not (out / "_SUCCESS").exists()
    after_sigint = len(list(out.glob("part-*.parquet")))

    code, _ = stop_after_parts(after_sigint + 1, signal.SIGKILL)
    assert code == -signal.SIGKILL and (out / "_lock.json").exists()
    deadline = time.monotonic() + 30  # a machine that went down with its driver: its actors
    while (left := _still_running(driver.tree)) and time.monotonic() < deadline:  # too
        for pid in left:  # (they outlive their raylet a while, committing shards)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    stop_head(driver.temps[-1])
    assert not _still_running(driver.tree) and not (out / "_SUCCESS").exists()
    kept = len(list(out.glob("part-*.parquet")))

    done = driver.run()
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(out.glob(".tmp-*"))  # what the stopped attempts left is gone
    report = json.loads((out / "_report.json").read_text())
    assert report["shards"]["committed_before"] == kept > after_sigint >= 2
    assert report["rows_out"] == 60 and report["stop_reason"] is None
    result = assert_equals_clean_run(out, spec, tmp_path)
    check_exactly_once(table["note_id"].to_pylist(), result, None)


def test_full_disk_loses_nothing_and_resumes(tmp_path, model_dir, ray_local):
    """The output on a tiny tmpfs (skipped where mounting is not allowed): shards that cannot
    be written fail cleanly (no partial part, no temp file, no _SUCCESS); with room again the
    same spec resumes to exactly the clean run's output."""
    import subprocess

    import pyarrow.parquet as pq

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(mnt)],
                      capture_output=True).returncode:  # fmt: skip
        pytest.skip("cannot mount a tmpfs here")
    try:
        table, corpus = parquet_corpus(tmp_path, 60)
        spec = job(tmp_path, model_dir, corpus, output={"path": str(mnt / "out")},
                   run={"shard_rows": 5, "batch_rows": 5, "max_shard_attempts": 2})  # fmt: skip
        try:
            report = run(spec, tmp_path)
            assert report["shards"]["failed"], "the disk never filled up"
        except OSError:
            pass  # full before the first part: refused at the start
        out = mnt / "out"
        assert not (out / "_SUCCESS").exists() and not list(out.glob(".tmp-*"))
        for part in out.glob("part-*.parquet"):  # whatever landed is whole
            assert pq.read_metadata(part).num_rows > 0
        subprocess.run(["mount", "-o", "remount,size=20m", str(mnt)], check=True)
        report = run(spec, tmp_path)
        assert report["rows_out"] == 60 and not report["shards"]["failed"]
        result = assert_equals_clean_run(out, spec, tmp_path)
        check_exactly_once(table["note_id"].to_pylist(), result, None)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _processes() -> dict[int, tuple[int, str, str, str]]:
    """pid -> (parent pid, state, start time, command name) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :]
        fields = rest.split()  # from field 3 (state) on: 1 = parent pid, 19 = start time
        table[int(entry.name)] = (int(fields[1]), fields[0], fields[19], name)
    return table


def _tree(root: int) -> dict[int, tuple[str, str]]:
    """root's descendants now: pid -> (start time, command name); the start time tells a
    process from a later one given the same pid."""
    table, found, todo = _processes(), {}, [root]
    while todo:
        parent = todo.pop()
        for pid, (ppid, _, start, name) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = (start, name)
                todo.append(pid)
    return found


def _still_running(tree: dict[int, tuple[str, str]]) -> list[int]:
    """The processes of `tree` that still run (the same start time, not a zombie)."""
    table = _processes()
    return [pid for pid, (start, _) in tree.items()
            if pid in table and table[pid][2] == start and table[pid][1] != "Z"]  # fmt: skip


def _assert_one_error_line(stdout: str, err: str) -> str:
    """No traceback, and no error of Python's or Ray's on stderr (an ERROR log, a C++ E/F log
    line) but the CLI's own last line, which is returned."""
    import re

    assert "Traceback" not in stdout + err, err[-3000:]
    lines = err.splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], err[-3000:]
    noise = re.compile(r"\bERROR\b|^\[[^]]* [EF] \d+ \d+\]|plasma store")
    assert not [line for line in lines if noise.search(line)], err[-3000:]
    return lines[-1]


def _kill_raylet_and_wait(driver: CliDriver, proc) -> tuple[str, str, float]:
    """SIGKILL `proc`'s raylet; the driver must exit 3 and every process of its run end
    within 30 s. Returns its stdout, stderr and the seconds it took to exit."""
    os.kill(driver.raylet(proc), signal.SIGKILL)
    killed = time.monotonic()
    stdout, err = proc.communicate(timeout=120)
    took = time.monotonic() - killed
    assert proc.returncode == 3, err[-3000:]
    deadline = time.monotonic() + 30  # no process of the killed run may go on writing
    while (left := _still_running(driver.tree)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, {pid: driver.tree[pid][1] for pid in left}
    return stdout, err, took


def test_local_raylet_killed_under_the_driver_then_resumed(tmp_path, model_dir, own_ray, cli):
    """The CLI driver in its own process and local Ray; once a shard is committed, that Ray's
    raylet (and only it) is SIGKILLed. The driver must end within seconds with one error line
    (exit 3), no traceback, a partial report, no _SUCCESS, and none of its Ray processes left
    to write; the same command then resumes to exactly a clean run's output."""
    import json
    import re

    table, corpus = parquet_corpus(tmp_path, 60)
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5,
                                                 "progress_interval_s": 0.2})  # fmt: skip
    driver = cli(spec)
    out = tmp_path / "out"
    # 2 s per shard: 12 shards on 2 actors last far longer than the driver takes to notice
    proc = driver.start({"cpu": 2})
    deadline = time.monotonic() + 180
    while not list(out.glob("part-*.parquet")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the job never committed a shard"
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[1][-3000:]  # still running
    stdout, err, took = _kill_raylet_and_wait(driver, proc)
    line = _assert_one_error_line(stdout, err)
    assert line.startswith("error: the local Ray node (raylet") and "run the same" in line
    parts = list(out.glob("part-*.parquet"))
    committed = re.search(r"; (\d+) of 12 shards are committed", line)
    assert committed and int(committed.group(1)) == len(parts) >= 1, line
    assert not (out / "_SUCCESS").exists() and not (out / "_lock.json").exists()
    assert not list(out.glob(".tmp-*"))
    partial = json.loads((out / "_report.json").read_text())
    assert partial["interrupted"] is True and partial["stop_reason"].startswith("NodeLost: ")
    shards = partial["shards"]
    assert shards["committed_before"] + shards["processed"] <= len(parts)  # what reached
    # the driver: a shard whose result was under way when it stopped is not counted

    done = driver.run()
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "_SUCCESS").exists() and not list(out.glob(".tmp-*"))
    report = json.loads((out / "_report.json").read_text())
    assert report["interrupted"] is False and report["rows_out"] == 60
    assert report["shards"]["committed_before"] == len(parts)
    result = assert_equals_clean_run(out, spec, tmp_path)
    ids = result["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 60  # none lost, none written twice
    check_exactly_once(table["note_id"].to_pylist(), result, None)
    print(f"raylet killed: the driver ended {took:.1f}s later; {len(parts)} of 12 shards kept")


def test_local_raylet_killed_while_planning(tmp_path, model_dir, own_ray, cli):
    """The raylet dies while the driver waits on its staging tasks (before any shard runs):
    the same one line (exit 3), no traceback, nothing left running or written; the same
    command then runs to a clean run's output."""
    table, corpus = parquet_corpus(tmp_path, 20)
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
    driver = cli(spec)
    out = tmp_path / "out"
    proc = driver.start({"staging": 60})  # the staging task sleeps: the driver waits on it
    deadline = time.monotonic() + 120
    while not _staging_task_running(proc.pid):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the staging task never started"
        time.sleep(0.1)
    stdout, err, took = _kill_raylet_and_wait(driver, proc)
    line = _assert_one_error_line(stdout, err)
    assert line.startswith("error: the local Ray node (raylet") and "while planning" in line
    assert took < 30, took  # not the staging task's 60 s, nor Ray's own health check
    assert not list(out.glob("part-*")) and not (out / "_lock.json").exists()
    assert not (out / "_report.json").exists() and not (out / "_SUCCESS").exists()

    done = driver.run()
    assert done.returncode == 0, done.stderr[-3000:]
    result = assert_equals_clean_run(out, spec, tmp_path)
    check_exactly_once(table["note_id"].to_pylist(), result, None)
    print(f"raylet killed while planning: the driver ended {took:.1f}s later")


def _staging_task_running(root: int) -> bool:
    """Whether a Ray worker under `root` runs the driver's staging task (its title)."""
    for pid in _tree(root):
        with contextlib.suppress(OSError):
            if b"ray::_apply" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
    return False


def test_an_actor_that_cannot_start_costs_no_attempt_and_says_why(
    tmp_path, model_dir, ray_local, caplog
):
    """A pool whose actors fail in __init__ (here `device: mps` on a machine without one)
    is restarted, then left out; its shards spend no attempt and run on the other pool. Left
    with no pool that starts, every shard fails naming the actor's own error, on one line."""
    import torch

    if torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device: its actors would start")
    table, corpus = parquet_corpus(tmp_path, 30)
    cpu = {"name": "cpu", "device": "cpu", "actors": 1, "cpus_per_actor": 1,
           "precision": "fp32", "batch_tokens": 1024}  # fmt: skip
    mac = {"name": "mac", "device": "mps", "actors": 1, "cpus_per_actor": 1, "precision": "fp32"}
    spec = job(tmp_path, model_dir, corpus, device_pool=[mac, cpu])
    with caplog.at_level(logging.WARNING, logger="jobs.dispatch"):
        report = run(spec, tmp_path)
    assert report["rows_out"] == 30 and not report["shards"]["failed"]
    # a replacement takes shards only once it has started: the cpu actor may finish every
    # shard before the mac slot's replacement has failed (restarted once) or after (twice)
    assert report["retries"] == 0 and 1 <= report["actor_restarts"] <= 2
    starts = [r.getMessage() for r in caplog.records if "could not start" in r.message]
    assert 1 <= len(starts) <= 3
    assert all(m.startswith("actor mac-0 could not start: ") for m in starts)
    assert_equals_clean_run(tmp_path / "out", spec, tmp_path)

    alone = job(tmp_path, model_dir, corpus, device_pool=[mac],
                output={"path": str(tmp_path / "out2")})  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jobs.dispatch"):
        report = run(alone, tmp_path)
    failed = report["shards"]["failed"]
    assert report["rows_out"] == 0 and len(failed) == 3 and report["retries"] == 0
    assert report["actor_restarts"] == 2  # with no other actor the run waits for each start
    starts = [m for r in caplog.records if (m := r.getMessage()).startswith("actor mac-0 could "
              "not start: ")]  # fmt: skip
    assert len(starts) == 3  # the first actor and its 2 replacements
    for f in failed:
        assert f["attempts"] == 0, f  # none of them ran
        assert f["error"].startswith("no live actor left (the last: actor mac-0 could not "
                                     "start: ") and "\n" not in f["error"], f  # fmt: skip
    assert not (tmp_path / "out2" / "_SUCCESS").exists()
