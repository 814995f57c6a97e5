"""Output dir: schemas, atomic commits, resume state, spec checks, report counts. No Ray."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import tomllib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import output, parts
from jobs.output import OutputDir, package_version, should_resume
from jobs.parts import PartWriter
from jobs.reasons import ReasonCode
from jobs.report import Report
from jobs.rows import errors_schema, output_schema

HIDDEN = 4
META = {
    "variant": "bio_clinicalbert", "weights_sha256": "ab" * 32, "casing": "cased",
    "pooling": "cls", "precision": "bf16", "max_seq": "512",
    "long_notes": "windows/stride=128/aggregate=mean", "spec_hash": "f00d" * 16,
}  # fmt: skip
BASE = ["id", "subject_id", "n_tokens", "n_windows", "truncated"]
WINDOW = ["window_index", "char_start", "char_end"]
MLM = ["mlm_window", "mlm_position", "mlm_char_start", "mlm_top_ids", "mlm_top_tokens",
       "mlm_top_logprobs"]  # fmt: skip


def schema(**over) -> pa.Schema:
    args = dict(
        id_type=pa.string(), keep_fields=[pa.field("subject_id", pa.int32())], hidden=HIDDEN,
        vector_dtype="float32", embeddings=True, windows=False, mlm=False,
    )  # fmt: skip
    return output_schema(**(args | over))


def part(ids: list[str], **over) -> pa.Table:
    n = len(ids)
    vectors = pa.array([float(i) for i in range(n * HIDDEN)], pa.float32())
    return pa.table(
        {
            "id": ids,
            "subject_id": pa.array(range(n), pa.int32()),
            "embedding": pa.FixedSizeListArray.from_arrays(vectors, HIDDEN),
            "n_tokens": pa.array([10] * n, pa.int64()),
            "n_windows": pa.array([1] * n, pa.int32()),
            "truncated": [False] * n,
        },
        schema=schema(**over),
    )


def errors(shard: str, ids: list[str | None], reason: ReasonCode) -> pa.Table:
    return pa.table(
        {"id": ids, "shard": [shard] * len(ids), "row_index": range(len(ids)),
         "reason": [reason.value] * len(ids), "column": [None] * len(ids)},
        schema=errors_schema(pa.string()),
    )  # fmt: skip


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "embeddings,windows,mlm,dtype",
    itertools.product([True, False], [True, False], [True, False], ["float32", "float16"]),
)
def test_schema_columns_for_every_combination(embeddings, windows, mlm, dtype):
    s = schema(
        id_type=pa.int64(), embeddings=embeddings, windows=windows, mlm=mlm, vector_dtype=dtype
    )
    expected = BASE[:2] + (["embedding"] if embeddings else []) + BASE[2:]
    expected += (WINDOW if windows else []) + (MLM if mlm else [])
    assert s.names == expected
    assert s.field("id").type == pa.int64() and s.field("subject_id").type == pa.int32()
    assert s.field("n_tokens").type == pa.int64() and s.field("n_windows").type == pa.int32()
    assert s.field("truncated").type == pa.bool_()
    if embeddings:
        value = pa.float16() if dtype == "float16" else pa.float32()
        assert s.field("embedding").type == pa.list_(value, HIDDEN)
    if windows:
        assert [s.field(c).type for c in WINDOW] == [pa.int32(), pa.int64(), pa.int64()]
    if mlm:
        assert s.field("mlm_position").type == pa.list_(pa.int32())
        assert s.field("mlm_char_start").type == pa.list_(pa.int64())
        assert s.field("mlm_top_ids").type == pa.list_(pa.list_(pa.int32()))
        assert s.field("mlm_top_tokens").type == pa.list_(pa.list_(pa.string()))
        assert s.field("mlm_top_logprobs").type == pa.list_(pa.list_(pa.float32()))


def test_schema_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vector_dtype.*'bf16'"):
        schema(vector_dtype="bf16")
    with pytest.raises(ValueError, match=r"clash.*\['n_tokens'\]"):
        schema(keep_fields=[pa.field("n_tokens", pa.int64())])


def test_errors_schema_and_reason_codes():
    s = errors_schema(pa.int64())
    assert s.names == ["id", "shard", "row_index", "reason", "column"]
    assert s.field("id").type == pa.int64() and s.field("id").nullable
    assert s.field("row_index").type == pa.int64()
    assert {r.value for r in ReasonCode} == {
        "null", "empty", "not_text", "undecodable", "too_long", "null_id", "non_finite",
        "not_json", "not_csv", "undecodable_value",
    }  # fmt: skip
    assert ReasonCode.NULL_ID == "null_id"


def test_write_part_commits_atomically_with_metadata(tmp_path: Path):
    out = OutputDir(str(tmp_path / "out"))
    assert out.committed() == set() and out.read_table() is None and out.read_errors() is None
    out.write_part("s1", part(["a", "b"]), errors("s1", ["c", None], ReasonCode.EMPTY), META)
    out.write_part("s2", part(["d"]), None, META)
    assert files(tmp_path / "out") == [
        "_errors/part-s1.parquet",
        "part-s1.parquet",
        "part-s2.parquet",
    ]
    assert out.committed() == {"s1", "s2"}
    table = out.read_table()
    assert table.schema == schema() and table["id"].to_pylist() == ["a", "b", "d"]
    assert table["embedding"][1].as_py() == [4.0, 5.0, 6.0, 7.0]
    errs = out.read_errors()
    assert errs["id"].to_pylist() == ["c", None] and set(errs["reason"].to_pylist()) == {"empty"}
    meta = out.part_metadata("s1")
    assert meta == {**META, "version": package_version(), "shard": "s1"}
    on_disk = pq.read_schema(tmp_path / "out" / "part-s2.parquet").metadata
    assert on_disk[b"weights_sha256"] == META["weights_sha256"].encode()


def test_package_version_sources(tmp_path: Path, monkeypatch):
    assert package_version() == tomllib.loads(output._PYPROJECT.read_text())["project"]["version"]
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "something-else"\nversion = "9.9"\n')
    monkeypatch.setattr(output, "_PYPROJECT", other)  # not ours: the installed version
    monkeypatch.setattr(output.importlib_metadata, "version", lambda name: "1.2.3")
    assert package_version() == "1.2.3"

    def missing(name: str) -> str:
        raise output.importlib_metadata.PackageNotFoundError(name)

    monkeypatch.setattr(output, "_PYPROJECT", tmp_path / "absent.toml")
    monkeypatch.setattr(output.importlib_metadata, "version", missing)
    assert package_version() == "0+unknown"


def test_streamed_writer_records_stats(tmp_path: Path):
    out = OutputDir(str(tmp_path))
    with out.part_writer("s", schema(), META) as w:
        w.write(part(["a"]))
        w.write(part(["b", "c"]))
        w.commit(None, {"rows_in": 3, "rows_out": 3})
    assert out.read_table().num_rows == 3
    # counts written without the precision (older parts) take it from the part's metadata
    assert out.shard_stats("s") == {"rows_in": 3, "rows_out": 3, "precision": "bf16"}
    out.write_part("t", part(["d"]), None, META)
    assert out.shard_stats("t") == {}


def test_crashed_writer_is_not_committed_and_is_cleaned(tmp_path: Path):
    out = OutputDir(str(tmp_path))
    out.write_part("done", part(["a"]), None, META)
    w = PartWriter(out.fs, out.root, "crashed", schema(), META)  # the process dies before commit
    w.write(part(["b"]))
    w._close()
    leftover = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-part-crashed.")]
    assert len(leftover) == 1 and out.committed() == {"done"}
    out.clean_temp()
    assert files(tmp_path) == ["part-done.parquet"]


def test_failing_writer_leaves_nothing(tmp_path: Path):
    out = OutputDir(str(tmp_path))
    with pytest.raises(RuntimeError, match="boom"), out.part_writer("s", schema(), META) as w:
        w.write(part(["a"]))
        raise RuntimeError("boom")
    assert files(tmp_path) == []


def test_errors_part_is_written_before_the_part(tmp_path: Path, monkeypatch):
    out = OutputDir(str(tmp_path))
    real = parts.write_atomic

    def then_crash(fs, path, write):
        real(fs, path, write)
        raise OSError("killed between the errors part and the part")

    monkeypatch.setattr(parts, "write_atomic", then_crash)
    with pytest.raises(OSError, match="killed"):
        out.write_part("s", part(["a"]), errors("s", ["b"], ReasonCode.NULL), META)
    assert files(tmp_path) == ["_errors/part-s.parquet"]  # the errors part, no part, no temp
    assert out.committed() == set() and out.read_errors() is None  # not committed: not read

    monkeypatch.undo()
    out.write_part("t", part(["c"]), errors("t", ["d"], ReasonCode.NULL), META)
    out.clean_temp()  # as a resumed run starts: the orphan errors part goes, t's stays
    assert files(tmp_path) == ["_errors/part-t.parquet", "part-t.parquet"]

    monkeypatch.setattr(parts, "write_atomic", then_crash)
    with pytest.raises(OSError, match="killed"):
        out.write_part("s", part(["a"]), errors("s", ["b"], ReasonCode.NULL), META)
    monkeypatch.undo()
    out.write_part("s", part(["a"]), None, META)  # a retry without bad rows drops the stale one
    assert files(tmp_path) == ["_errors/part-t.parquet", "part-s.parquet", "part-t.parquet"]
    assert out.read_errors()["id"].to_pylist() == ["d"]


def test_file_uri_output_dir(tmp_path: Path):
    out = OutputDir(f"file://{tmp_path}/out/")
    assert out.uri == f"file://{tmp_path}/out"
    out.check_spec("h1", {"name": "t"}, overwrite=False)
    out.write_part("s", part(["a"]), errors("s", ["b"], ReasonCode.TOO_LONG), META)
    out.write_json("_report.json", {"rows_in": 2})
    out.mark_success()
    assert files(tmp_path / "out") == [
        "_SUCCESS", "_errors/part-s.parquet", "_job.json", "_report.json", "part-s.parquet",
    ]  # fmt: skip
    assert out.committed() == {"s"} and out.read_table()["id"].to_pylist() == ["a"]
    assert out.read_json("_report.json") == {"rows_in": 2}
    assert out.part_metadata("s")["casing"] == "cased"


def test_check_spec_resume_refuse_overwrite(tmp_path: Path):
    root = tmp_path / "out"
    out = OutputDir(str(root))
    resolved = {"name": "t", "model_identity": {"weights_sha256": "w1"}}
    out.check_spec("h1", resolved, overwrite=False)
    assert json.loads((root / "_job.json").read_text()) == {"spec_hash": "h1", "spec": resolved}
    out.write_part("s", part(["a"]), errors("s", ["b"], ReasonCode.NULL), META)
    (root / ".tmp-x-123.parquet").write_bytes(b"partial")

    out.check_spec("h1", resolved, overwrite=False)  # same spec: resume, temp files cleaned
    assert out.committed() == {"s"} and not (root / ".tmp-x-123.parquet").exists()

    with pytest.raises(ValueError) as e:
        out.check_spec("h2", resolved, overwrite=False)
    msg = str(e.value)
    assert all(s in msg for s in (str(root), "spec hash h1", "h2", "1 part files", "--overwrite"))
    assert "output.path" in msg and out.committed() == {"s"}  # refused: nothing deleted

    changed = {**resolved, "model_identity": {"weights_sha256": "w2"}}
    with pytest.raises(ValueError, match="weights sha256 w1; this run's model has w2.*--overwrite"):
        out.check_spec("h1", changed, overwrite=False)

    out.write_json("_report.json", {})
    out.mark_success()
    out.check_spec("h2", resolved, overwrite=True)
    assert files(root) == ["_job.json"]
    assert out.read_json("_job.json")["spec_hash"] == "h2"
    out.write_part("s", part(["a"]), None, META)
    out.check_spec("h2", changed, overwrite=True)  # same spec, new weights: cleared too
    assert out.committed() == set() and out.read_json("_job.json")["spec"] == changed


def test_should_resume_decides_without_touching_files():
    """The resume decision alone: resume, start over, or refuse with the message to act on."""
    job = {"spec_hash": "h1", "spec": {"model_identity": {"weights_sha256": "w1"}}}
    decide = lambda job, committed, spec_hash="h1", weights="w1", overwrite=False: should_resume(  # noqa: E731
        "out", job, committed, spec_hash, weights, overwrite
    )
    assert decide(job, {"s"}) is True  # same spec, same weights: resume
    assert decide(job, {"s"}, weights=None) is True  # weights unknown on one side: resume
    assert decide(job, {"s"}, overwrite=True) is False  # overwrite: start over
    assert decide(None, set()) is False and decide(job, set(), "h2") is False  # nothing to keep
    with pytest.raises(
        ValueError,
        match=r"^output dir out holds another job's output \(spec "
        r"hash h1, 1 part files\); this spec's hash is h2\. Use another",
    ):
        decide(job, {"s"}, "h2")
    with pytest.raises(ValueError, match=r"\(no _job.json, 2 part files\)"):
        decide(None, {"s", "t"})
    with pytest.raises(ValueError, match="weights sha256 w1; this run's model has w2"):
        decide(job, {"s"}, weights="w2")
    with pytest.raises(ValueError, match=r"^out/_job.json is not a JSON object; use another "):
        decide([1], set())
    assert decide([1], {"s"}, overwrite=True) is False


def test_check_spec_refuses_parts_without_job_json(tmp_path: Path):
    out = OutputDir(str(tmp_path))
    out.write_part("s", part(["a"]), None, META)
    with pytest.raises(ValueError, match="no _job.json.*this spec's hash is h1"):
        out.check_spec("h1", {}, overwrite=False)
    (tmp_path / "_job.json").write_text("{not json")
    with pytest.raises(ValueError, match="_job.json is not valid JSON.*--overwrite"):
        out.check_spec("h1", {}, overwrite=False)
    out.check_spec("h1", {}, overwrite=True)
    assert out.committed() == set() and out.read_json("_job.json")["spec_hash"] == "h1"


@pytest.mark.parametrize("name", ["notes.csv", "3f2a9c_000000_000000-0.parquet",
                                  "part-00000-6a1b-c000.snappy.parquet"])  # fmt: skip
def test_an_output_dir_holding_files_no_job_wrote_is_refused(tmp_path: Path, name: str):
    """Another tool's files (a Ray Data or Spark output, notes): a reader of the dir would mix
    them with the job's rows, so run (overwrite or not), validate and verify all name them, and
    nothing is deleted. Names readers skip ('_', '.') do not count."""
    from jobs.preflight import check_output
    from jobs.spec import parse_spec
    from jobs.verify import verify_output

    (tmp_path / name).write_text("id,text\n")
    (tmp_path / "_common_metadata").write_text("")
    out = OutputDir(str(tmp_path))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=rf"holds 1 file\(s\) no job of .* \(e.g. '{name}'\)"):
            out.check_spec("h1", {}, overwrite=overwrite)
    assert files(tmp_path) == sorted(["_common_metadata", name])
    spec = parse_spec({"name": "t", "corpus": {"format": "text", "paths": [str(tmp_path)]},
                       "model": {"variant": "custom", "path": str(tmp_path)},
                       "device_pool": [{"name": "cpu", "device": "cpu"}],
                       "output": {"path": str(tmp_path)}}, tmp_path)  # fmt: skip
    (problem,) = check_output(spec)
    assert problem.startswith(f"output.path: output dir {tmp_path} holds 1 file(s)")
    out.write_part("s1", part(["a"]), None, META)
    assert any(f.startswith("1 file(s) no job of ours wrote") for f in verify_output(str(tmp_path)))


def report(**over) -> Report:
    base = dict(
        name="t", spec_hash="h", rows_in=10, rows_out=6, error_rows=3, filtered_rows=1,
        errors_by_reason={"null": 1, "empty": 2}, nulled_values={}, windows=9, tokens=900, truncated_notes=0,
        shards={"total": 3, "committed_before": 1, "processed": 1,
                "failed": [{"shard_id": "s3", "attempts": 3, "error": "actor died"}]},
        retries=2, actor_restarts=1, stalls=[], interrupted=False, per_pool={}, per_actor={}, wall_s=1.5, tokens_per_s=600.0,
        started_at="2025-01-01T00:00:00+00:00", finished_at="2025-01-01T00:00:02+00:00",
    )  # fmt: skip
    return Report(**(base | over))


def test_report_counts_add_up_and_round_trip(tmp_path: Path):
    r = report(notes_by_precision={"bf16": 4, "fp32": 2})
    r.check()
    out = OutputDir(str(tmp_path))
    out.write_json("_report.json", r.to_json())
    back = Report.from_json(out.read_json("_report.json"))
    assert back == r
    back.check()


@pytest.mark.parametrize(
    "over,message",
    [
        ({"rows_out": 7}, "rows_in 10 != rows_out 7 \\+ error_rows 3 \\+ filtered_rows 1"),
        ({"errors_by_reason": {"null": 3, "empty": 1}}, "do not sum to error_rows 3"),
        ({"errors_by_reason": {"null": 1, "typo": 2}}, "unknown reason codes \\['typo'\\]"),
        ({"shards": {"total": 4, "committed_before": 1, "processed": 1, "failed": []}},
         "shards total 4 != committed_before 1 \\+ processed 1 \\+ failed 0"),
        ({"shards": {"total": 1}}, "shards lacks"),
        ({"notes_by_precision": {"fp32": 4, "int8": 1}},
         "notes_by_precision {'fp32': 4, 'int8': 1} do not sum to rows_out 6"),
    ],
)  # fmt: skip
def test_report_check_names_what_does_not_add_up(over, message):
    with pytest.raises(ValueError, match=message):
        report(**over).check()


def test_report_from_json_rejects_unknown_and_missing_keys():
    data = report().to_json()
    del data["wall_s"]
    with pytest.raises(ValueError, match=r"unknown \['walltime'\], missing \['wall_s'\]"):
        Report.from_json({**data, "walltime": 1.0})
    older = report().to_json()  # written before stop_reason existed: still a report
    del older["stop_reason"], older["notes_by_precision"]
    assert Report.from_json(older).stop_reason is None


def test_every_output_column_is_reserved_for_keep_columns():
    """keep_columns may not name any column a part file can have, for any heads."""
    from jobs.rows import PART_COLUMNS
    from jobs.spec import RESERVED_COLUMNS

    schema = output_schema(pa.int64(), [], 8, "float32", embeddings=True, windows=True, mlm=True)
    assert set(schema.names) <= set(PART_COLUMNS) <= set(RESERVED_COLUMNS)


def take_lock_over(out: Path, holder: dict, lock, then=lambda: None, timeout_s=10.0) -> None:
    """Write `holder` into out's lock the way a run taking it over does (whole, atomically),
    call `then` (the new holder's first writes), and wait until `lock`'s renewal has seen it.
    A renewal that read its own lock just before our write and rewrote it just after puts
    the lock back: take it over again then."""
    import time

    from jobs.output import LOCK_FILE

    path, tmp = out / LOCK_FILE, out / f".tmp-takeover-{holder['token']}"
    deadline, first = time.monotonic() + timeout_s, True
    while lock.lost is None and time.monotonic() < deadline:
        if json.loads(path.read_text()).get("token") != holder["token"]:
            tmp.write_text(json.dumps(holder))
            os.replace(tmp, path)
            if first:
                then()
                first = False
        time.sleep(0.05)


def test_one_run_per_output_dir_lock(tmp_path: Path):
    import subprocess
    import sys
    import time

    from jobs.lock import OutputLock
    from jobs.output import LOCK_FILE

    out = OutputDir(str(tmp_path / "out"))
    a = OutputLock(out, "job-a", lease_s=60)
    a.acquire()
    (tmp_path / "out" / ".tmp-a-1.parquet").write_bytes(b"a's part in progress")
    b = OutputLock(out, "job-b")
    with pytest.raises(RuntimeError) as e:
        b.acquire()
    assert "in use by another run" in str(e.value) and "job job-a" in str(e.value)
    assert f"pid {os.getpid()}" in str(e.value)
    assert (tmp_path / "out" / ".tmp-a-1.parquet").exists()  # nothing of a's removed
    a.release()
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    b.acquire()
    b.release()

    # a holder whose lease expired, and a dead process of this host, are taken over
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    for holder in (
        {"host": "elsewhere", "pid": 1, "job": "old", "renewed_at": time.time() - 120,
         "lease_s": 60},
        {"host": socket.gethostname(), "pid": int(gone.stdout), "job": "dead",
         "renewed_at": time.time(), "lease_s": 60},
    ):  # fmt: skip
        (tmp_path / "out" / LOCK_FILE).write_text(json.dumps(holder))
        c = OutputLock(out, "job-c")
        c.acquire()
        assert json.loads((tmp_path / "out" / LOCK_FILE).read_text())["job"] == "job-c"
        c.release()

    # a run whose lock was taken over after its lease lapsed learns it at the next renewal
    d = OutputLock(out, "job-d", lease_s=0.3)
    d.acquire()
    take_lock_over(tmp_path / "out", {"token": "x", "job": "job-e"}, d)
    assert d.lost is not None and "job job-e" in d.lost
    d.release()
    assert (tmp_path / "out" / LOCK_FILE).exists()  # not d's to remove


def test_a_lock_is_never_seen_half_written(tmp_path: Path):
    """A reader (another run's acquire, the holder's renewal) must never find the lock empty
    or partial: it would take it for a crashed holder's. Created with O_EXCL and then
    written, the lock was found empty 269 times by a reader racing 300 acquisitions."""
    import threading

    from jobs.lock import OutputLock
    from jobs.output import LOCK_FILE

    out = OutputDir(str(tmp_path / "out"))
    path, torn, stop = tmp_path / "out" / LOCK_FILE, [], threading.Event()

    def read():
        while not stop.is_set():
            with contextlib.suppress(FileNotFoundError):
                data = path.read_bytes()
                try:
                    json.loads(data)
                except ValueError:
                    torn.append(len(data))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(100):
            lock = OutputLock(out, "job-g")
            lock.acquire()
            lock.release()
    finally:
        stop.set()
        reader.join()
    assert torn == []


def test_lock_lease_survives_renewals_that_cannot_be_written(tmp_path: Path, monkeypatch):
    """A full disk (or a storage hiccup) during a renewal: the lease thread keeps going and
    renews again once writing works, instead of dying and letting the lease lapse."""
    import time

    from jobs.lock import OutputLock
    from jobs.output import LOCK_FILE

    out = OutputDir(str(tmp_path / "out"))
    lock = OutputLock(out, "job-f", lease_s=0.3)
    lock.acquire()
    real, failures = lock._write, []

    def full_disk(exclusive: bool) -> None:
        if len(failures) < 3:
            failures.append(exclusive)
            raise OSError(28, "No space left on device")
        real(exclusive)

    monkeypatch.setattr(lock, "_write", full_disk)
    first = json.loads((tmp_path / "out" / LOCK_FILE).read_text())["renewed_at"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        renewed = json.loads((tmp_path / "out" / LOCK_FILE).read_text())["renewed_at"]
        if len(failures) == 3 and renewed > first:
            break
        time.sleep(0.05)
    assert len(failures) == 3 and renewed > first and lock._thread.is_alive()
    assert lock.lost is None
    lock.release()


def test_commit_gate_fences_stale_attempts(tmp_path: Path):
    from jobs.parts import CommitGate, StaleAttempt

    gate = CommitGate()
    gate.trust("s", "a1")
    gate.trust("s", "a2")  # a1 was declared stalled; a2 is the attempt the driver trusts
    assert not gate.claim("s", "a1") and gate.claim("s", "a2") and not gate.claim("s", "a2")
    gate.trust("s", "a3")  # a2 died after claiming, before its rename: a3 may commit
    assert gate.claim("s", "a3")
    gate.trust("t", "b1")
    gate.close()  # the run was interrupted: nothing starts or commits any more
    assert not gate.may_start("t", "b1") and not gate.claim("t", "b1")

    out = OutputDir(str(tmp_path / "out"))
    with (
        pytest.raises(StaleAttempt, match="no longer the one the driver trusts"),
        out.part_writer("s", schema(), META) as writer,
    ):
        writer.write(part(["a"]))
        writer.commit(errors("s", ["b"], ReasonCode.NULL), {"rows_in": 2}, lambda: False)
    assert files(tmp_path / "out") == []  # no part, no errors part, no temp file


def test_validate_sees_what_run_would_refuse_about_the_output_dir(tmp_path: Path):
    """validate reads the output dir as run would take it: another spec's committed output,
    an unreadable _job.json, a lock another live run holds; nothing is written."""
    from jobs.lock import OutputLock
    from jobs.preflight import output_state_problems
    from jobs.spec import parse_spec

    (tmp_path / "model").mkdir()
    (tmp_path / "notes.txt").write_text("a note")
    spec = parse_spec({"name": "t", "corpus": {"format": "text", "paths": ["notes.txt"]},
                       "model": {"variant": "custom", "path": "model"},
                       "device_pool": [{"name": "cpu", "device": "cpu"}],
                       "output": {"path": "out"}}, tmp_path)  # fmt: skip
    assert output_state_problems(spec) == []  # no dir yet
    out = OutputDir(str(tmp_path / "out"))
    out.check_spec("another-hash", {}, overwrite=False)
    assert output_state_problems(spec) == []  # a start that committed nothing blocks nothing
    out.write_part("s1", part(["a"]), None, META)
    (problem,) = output_state_problems(spec)
    assert problem.startswith("output.path: output dir") and "holds another job's output" in problem
    (tmp_path / "out" / "_job.json").write_text("[1]")
    (problem,) = output_state_problems(spec)
    assert "_job.json is not a JSON object" in problem
    out.check_spec(spec.spec_hash(), {}, overwrite=True)  # now this spec's own output
    assert output_state_problems(spec) == []
    lock = OutputLock(out, "other")
    lock.acquire()
    try:
        (problem,) = output_state_problems(spec)
        assert "is in use by another run" in problem
    finally:
        lock.release()
    assert output_state_problems(spec) == [] and sorted(files(tmp_path / "out")) == ["_job.json"]


def test_the_errors_reader_works_on_an_output_without_errors(tmp_path: Path):
    """The README's `pd.read_parquet(f"{OUT}/_errors")` on a job none of whose rows failed:
    no rows, not an exception; with an errors part, its rows."""
    import pandas as pd

    out = OutputDir(str(tmp_path / "out"))
    out.check_spec("h1", {}, overwrite=False)
    out.write_part("s1", part(["a"]), None, META)
    assert len(pd.read_parquet(tmp_path / "out" / "_errors")) == 0
    assert len(pd.read_parquet(tmp_path / "out")) == 1
    out.write_part("s2", part(["b"]), errors("s2", ["c"], ReasonCode.EMPTY), META)
    assert pd.read_parquet(tmp_path / "out" / "_errors")["id"].tolist() == ["c"]
