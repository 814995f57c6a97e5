"""Ids at scale: the repeated-id check and `verify` compare 64-bit hashes and confirm the few
that repeat by the ids themselves; the verdict is kept for resumes; parts are read batch by
batch. No Ray."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import driver, verify
from jobs.corpus import RepeatedIds, ids, idscan, plan_shards, repeated_ids
from jobs.corpus.idscan import hash_values, picked, repeated_hashes
from jobs.output import OutputDir
from jobs.parts import READ_BATCH_ROWS, STATS_KEY, part_name
from jobs.report import Report
from jobs.spec import CorpusSpec, SpecError, parse_spec


def tiny_hash(values: pa.Array) -> np.ndarray:
    """Three hash values for every id: nearly every two ids share one."""
    return hash_values(values) % np.uint64(3)


def colliding(a, b):
    """The real hash, but id `b` hashes as id `a` does."""

    def hashed(values: pa.Array) -> np.ndarray:
        real = hash_values(values)
        real[np.array(values.to_pylist(), dtype=object) == b] = hash_values(pa.array([a]))[0]
        return real

    return hashed


# ---- the hashing scan ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values",
    [
        pa.array([3, -1, 3, None, 2**62], pa.int64()),
        pa.array(["n01", "", "n01", None, "a longer id than the rest"]),
        pa.array([b"\x00", b"\x00\x00", b"\x00", None, b"x"], pa.large_binary()),
        pa.array([1.5, 0.1, 1.5, None, 2.0]),
        pa.array([1, 7, 1, None, 9], pa.int8()).dictionary_encode(),
        pa.array([10**20, 1, 10**20, None, 5], pa.decimal128(25, 0)),
    ],
    ids=["int64", "string", "binary", "float", "dictionary", "decimal"],
)
def test_equal_values_hash_equal_and_distinct_ones_differ(values: pa.Array):
    h = hash_values(values)
    assert h.dtype == np.uint64 and len(h) == 5
    assert h[0] == h[2] and len({int(x) for x in h[[0, 1, 3, 4]]}) == 4
    assert (hash_values(values.slice(2)) == h[2:]).all()  # an array's offset is honoured
    chunked = pa.chunked_array([values.slice(0, 2), values.slice(2)]).combine_chunks()
    assert (hash_values(chunked) == h).all()


def test_string_hashes_are_the_same_in_chunks_and_differ_by_position():
    many = pa.array([f"id{i:07d}" for i in range(3 * idscan.CHUNK_ROWS + 5)])
    h = hash_values(many)
    assert len(np.unique(h)) == len(many)
    assert (
        h[idscan.CHUNK_ROWS - 2 :][:4] == hash_values(many.slice(idscan.CHUNK_ROWS - 2, 4))
    ).all()
    assert len(set(hash_values(pa.array(["ab", "ba", "a", "a\x00", "\x00a"])).tolist())) == 5


@pytest.mark.parametrize("bucket", [4, 1 << 21])
def test_repeated_hashes_names_each_source_holding_one(monkeypatch, bucket: int):
    """Whatever the bucket, every hash held twice (in one source or two) is named for each
    source holding it, and no other."""
    monkeypatch.setattr(idscan, "BUCKET", bucket)
    rng = np.random.default_rng(0)
    sources = [np.sort(rng.integers(0, 2**64, 50, dtype=np.uint64)) for _ in range(4)]
    sources[1][7] = sources[3][20]  # across sources
    sources[2][5] = sources[2][6]  # within one
    sources[0] = np.array([], np.uint64)
    sources = [np.sort(s) for s in sources]
    found = repeated_hashes(sources)
    every = Counter(int(x) for s in sources for x in s)
    want = {
        i: sorted(int(x) for x in set(s.tolist()) if every[int(x)] > 1)
        for i, s in enumerate(sources)
    }
    assert {i: sorted(int(x) for x in h) for i, h in found.items()} == {
        i: w for i, w in want.items() if w
    }
    assert list(picked(sources[1], found[1])).count(True) == 1


# ---- the repeated-id check -------------------------------------------------------------------
def two_files(tmp_path: Path, ids_list: list, kind: str = "int") -> CorpusSpec:
    values = ids_list if kind == "int" else [f"N{i:013d}" for i in ids_list]
    table = pa.table({"id": values, "text": [f"n{i}" for i in range(len(values))]})
    half = len(values) // 2
    pq.write_table(table.slice(0, half), tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(half), tmp_path / "b.parquet", row_group_size=10)
    return CorpusSpec.model_validate(
        {"format": "parquet", "paths": [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]}
    )


@pytest.mark.parametrize("kind", ["int", "str"])
def test_a_hash_collision_is_read_again_and_is_no_repeat(tmp_path: Path, monkeypatch, kind: str):
    """Two ids sharing a hash, in two files: both files' ids behind that hash are read again
    and compared, and distinct ids are no repeat; with three hash values for 100 ids, none."""
    corpus = two_files(tmp_path, list(range(100)), kind)
    shards = plan_shards(corpus, str(tmp_path / "staging"), 20)
    a, b = (3, 77) if kind == "int" else ("N0000000000003", "N0000000000077")
    monkeypatch.setattr(ids, "hash_values", colliding(a, b))
    again = []
    real_counts = ids.file_counts
    monkeypatch.setattr(
        ids, "file_counts", lambda item, corpus: again.append(item) or real_counts(item, corpus)
    )
    assert repeated_ids(shards, corpus) is None
    assert [Path(shards_[0].path).name for shards_, _ in again] == ["a.parquet", "b.parquet"]
    assert all(len(wanted) == 1 for _, wanted in again)  # only the shared hash
    monkeypatch.setattr(ids, "hash_values", tiny_hash)
    assert repeated_ids(shards, corpus) is None


@pytest.mark.parametrize("hashing", ["real", "tiny"])
def test_a_true_repeat_across_two_files_is_named_with_one_file(
    tmp_path: Path, monkeypatch, hashing
):
    """An id in both files (and one twice in one file): counted exactly, named with the first
    file holding the most repeated one, one task per file as the driver's map runs them."""
    values = list(range(100))
    values[60] = 7  # in b, first in a
    values[80] = values[90] = 85  # twice in b
    values[95] = 85
    corpus = two_files(tmp_path, values)
    shards = plan_shards(corpus, str(tmp_path / "staging"), 20)
    if hashing == "tiny":
        monkeypatch.setattr(ids, "hash_values", tiny_hash)
    tasks = []

    def map_fn(fn, items):
        items = list(items)
        tasks.append(len(items))
        return [fn(x) for x in items]

    found = repeated_ids(shards, corpus, map_fn=map_fn)
    assert found == RepeatedIds(2, 4, 85, str(tmp_path / "b.parquet"))  # 85 four times, 7 twice
    assert tasks[0] == 2  # one per file
    values[80] = values[90] = values[95] = 1
    corpus = two_files(tmp_path, values)
    found = repeated_ids(plan_shards(corpus, str(tmp_path / "staging"), 20), corpus)
    assert found == RepeatedIds(2, 4, 1, str(tmp_path / "a.parquet"))


def test_the_row_ranges_of_a_large_row_group_are_read_once_each_row_once(
    tmp_path: Path, monkeypatch
):
    """A row group cut into row ranges: its ids are read in one pass (a range decodes the
    group's rows before it), every row once: a repeat within it is counted exactly."""
    values = list(range(100))
    values[93] = 12
    table = pa.table({"id": values, "text": ["t"] * 100})
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=100)
    corpus = CorpusSpec.model_validate(
        {"format": "parquet", "paths": [str(tmp_path / "big.parquet")]}
    )
    shards = plan_shards(corpus, str(tmp_path / "st"), 20)
    assert len(shards) == 5 and {s.row_groups for s in shards} == {(0,)}
    reads = []
    real = ids._shard_ids
    monkeypatch.setattr(ids, "_shard_ids", lambda s, c: reads.append(s.num_rows) or real(s, c))
    assert repeated_ids(shards, corpus) == RepeatedIds(1, 1, 12, str(tmp_path / "big.parquet"))
    assert reads == [100, 100]  # the hashes, then the ids behind the one that repeats
    assert repeated_ids(shards[1:4], corpus) is None and reads[2:] == [60]


def test_null_ids_and_where_are_as_before(tmp_path: Path):
    """Null and blank ids are error rows, never repeats; rows failing `where` are not read."""
    table = pa.table({"id": ["a", None, " ", None, "b", "a", " "],
                      "ward": ["x", "x", "x", "x", "x", "y", "x"],
                      "text": ["t"] * 7})  # fmt: skip
    pq.write_table(table, tmp_path / "n.parquet")
    corpus = CorpusSpec.model_validate(
        {"format": "parquet", "paths": [str(tmp_path / "n.parquet")]}
    )
    shards = plan_shards(corpus, str(tmp_path / "st"), 20)
    assert repeated_ids(shards, corpus) == RepeatedIds(1, 1, "a", str(tmp_path / "n.parquet"))
    where = corpus.model_copy(update={"where": {"ward": "x"}})
    assert repeated_ids(plan_shards(where, str(tmp_path / "st"), 20), where) is None


# ---- the verdict kept for resumes ------------------------------------------------------------
def job_spec(tmp_path: Path, where: dict | None = None, **run) -> object:
    return parse_spec({
        "name": "t",
        "corpus": {"format": "parquet", "paths": [str(tmp_path / "in")], "where": where},
        "model": {"variant": "custom", "path": str(tmp_path)},
        "device_pool": [{"name": "cpu", "device": "cpu"}],
        "output": {"path": str(tmp_path / "out")},
        "run": {"shard_rows": 10, **run},
    }, tmp_path)  # fmt: skip


def write_in(tmp_path: Path, name: str, values: list) -> None:
    (tmp_path / "in").mkdir(exist_ok=True)
    table = pa.table({"id": pa.array(values, pa.int64()), "text": ["t"] * len(values)})
    pq.write_table(table, tmp_path / "in" / name, row_group_size=10)


def test_a_resume_over_an_unchanged_corpus_skips_the_scan(tmp_path: Path, monkeypatch):
    """The verdict is kept in the output dir, keyed by the shards' ids and the id settings: the
    same corpus is not read again; a changed file, or another `where`, is."""
    write_in(tmp_path, "a.parquet", list(range(30)))
    write_in(tmp_path, "b.parquet", list(range(30, 60)))
    spec = job_spec(tmp_path)
    out = OutputDir(str(tmp_path / "out"))
    out.fs.create_dir(out.root)
    scans = []
    real = driver.repeated_ids
    monkeypatch.setattr(driver, "repeated_ids", lambda *a, **k: scans.append(1) or real(*a, **k))

    def check(spec):
        shards = plan_shards(spec.corpus, str(tmp_path / "st"), spec.run.shard_rows)
        return driver.refuse_repeated_ids(spec, shards, out)

    assert check(spec) is None and len(scans) == 1
    assert check(spec) is None and len(scans) == 1  # the resume: no id read
    assert json.loads((tmp_path / "out" / driver.IDS_FILE).read_text())["repeated"] is None
    write_in(tmp_path, "b.parquet", list(range(30, 59)) + [4])  # a repeat now
    with pytest.raises(SpecError, match=r"1 id is on more than one row \(1 extra rows; e.g. 4 in "):
        check(spec)
    assert len(scans) == 2
    with pytest.raises(SpecError, match=r"e\.g\. 4 in .*a\.parquet"):  # the kept refusal
        check(spec)
    assert len(scans) == 2
    allowed = job_spec(tmp_path, allow_duplicate_ids=True)
    assert check(allowed) == RepeatedIds(1, 1, 4, str(tmp_path / "in" / "a.parquet"))
    assert len(scans) == 2  # allow_duplicate_ids is no part of the verdict
    assert check(job_spec(tmp_path, where={"id": 5})) is None and len(scans) == 3
    (tmp_path / "out" / driver.IDS_FILE).write_text("{not json")
    with pytest.raises(SpecError):
        check(spec)
    assert len(scans) == 4


# ---- verify ----------------------------------------------------------------------------------
def write_part(out: Path, shard: str, ids_: list, windows: list | None = None,
               lost: list | None = None, vectors: np.ndarray | None = None) -> None:  # fmt: skip
    """A part as a job writes it (the columns verify reads), and its errors part."""
    n, lost = len(ids_), lost or []
    vectors = np.ones((n, 2), np.float32) if vectors is None else vectors
    columns = {
        "id": ids_,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 2),
    }
    if windows is not None:
        columns["window_index"] = pa.array(windows, pa.int32())
    stats = {"rows_in": n + len(lost), "rows_out": n, "output_rows": n, "error_rows": len(lost),
             "filtered_rows": 0}  # fmt: skip
    meta = {"shard": shard, STATS_KEY: json.dumps(stats), "spec_hash": "h"}
    pq.write_table(pa.table(columns).replace_schema_metadata(meta), out / part_name(shard))
    if lost:
        errors = pa.table({"id": lost, "reason": ["empty"] * len(lost)})
        pq.write_table(errors, out / "_errors" / part_name(shard))


def id_findings(findings: list[str]) -> list[str]:
    keys = ("written more than once", "both written", "repeat an id")
    return [f for f in findings if any(k in f for k in keys)]


def test_verify_reads_a_part_batch_by_batch_and_finds_a_bad_vector_in_its_second_batch(
    tmp_path: Path, monkeypatch
):
    n = READ_BATCH_ROWS + 100
    vectors = np.ones((n, 2), np.float32)
    vectors[READ_BATCH_ROWS + 7, 1] = np.inf
    (tmp_path / "_errors").mkdir()
    write_part(tmp_path, "s1", list(range(n)), vectors=vectors)
    seen = []
    real = verify._not_finite
    monkeypatch.setattr(verify, "_not_finite", lambda v, d: seen.append(len(v)) or real(v, d))
    findings = verify.verify_output(str(tmp_path))
    assert (
        f"part-s1.parquet: 1 rows with null, NaN or inf in embedding, e.g. id {READ_BATCH_ROWS + 7}"
        in findings
    )
    assert seen == [READ_BATCH_ROWS, 100]  # never the whole part at once


def reference(parts: list[tuple[str, list, list | None, list]], report: Report | None) -> list[str]:
    """What verify found across parts before ids were hashed: every key and lost id held."""
    seen = verify.Seen()
    for _, ids_, windows, lost in sorted(parts, key=lambda p: p[0]):
        seen.ids.update(list(zip(ids_, windows)) if windows is not None else ids_)
        seen.error_ids += lost
    return verify._check_ids(seen, report)


def random_output(rng: random.Random, windowed: bool) -> list[tuple[str, list, list | None, list]]:
    """Parts whose notes now and then repeat across parts, lose their window 0, or are also
    error rows."""
    parts, note = [], 0
    for p in range(rng.randint(2, 5)):
        ids_, windows, lost = [], [], []
        for _ in range(rng.randint(1, 12)):
            note = note + 1 if rng.random() < 0.8 else rng.randint(0, note)
            spans = rng.randint(1, 3) if windowed else 1
            first = 0 if rng.random() < 0.9 else 1
            ids_ += [f"n{note}"] * spans
            windows += list(range(first, first + spans))
            if rng.random() < 0.1:
                lost.append(f"n{rng.randint(0, note)}")
        parts.append((f"s{p}", ids_, windows if windowed else None, lost))
    return parts


@pytest.mark.parametrize("hashing", ["real", "tiny"])
@pytest.mark.parametrize("windowed", [False, True])
def test_verify_finds_what_it_found_before_ids_were_hashed(
    tmp_path: Path, monkeypatch, hashing, windowed
):
    """Random outputs (ids written twice, lost ids also written, windows without window 0,
    input repeats the report counts): the same findings, the same example, as when every
    id was held; with three hash values, every collision is told apart by the ids."""
    if hashing == "tiny":
        monkeypatch.setattr(verify, "hash_values", tiny_hash)
    rng = random.Random(7 + windowed)
    kinds = Counter()
    for case in range(12):
        out = tmp_path / f"{case}"
        (out / "_errors").mkdir(parents=True)
        parts = random_output(rng, windowed)
        for shard, ids_, windows, lost in parts:
            write_part(out, shard, ids_, windows, lost)
        report = None
        if case % 3 == 2:  # the input repeated ids: the report counts them
            report = Report.from_json(REPORT | {"repeated_ids": {"ids": 1, "extra_rows": 2}})
            OutputDir(str(out)).write_json("_report.json", report.to_json())
        found = id_findings(verify.verify_output(str(out)))
        assert found == reference(parts, report), case
        kinds.update(f.split(" ", 1)[1].split(",")[0] for f in found)
    assert len(kinds) == 3, kinds  # every kind of finding met


def test_verify_names_an_id_written_twice_and_one_lost_and_written(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(verify, "hash_values", tiny_hash)
    (tmp_path / "_errors").mkdir()
    write_part(tmp_path, "s1", ["a", "b", "c"], lost=["x"])
    write_part(tmp_path, "s2", ["d", "b", "e"], lost=["c", None])
    found = id_findings(verify.verify_output(str(tmp_path)))
    assert found == ["1 ids written more than once, e.g. 'b'",
                     "1 ids both written and in the errors, e.g. 'c'"]  # fmt: skip


REPORT = {
    "name": "t", "spec_hash": "h", "rows_in": 10, "rows_out": 6, "error_rows": 3, "filtered_rows": 1,
    "errors_by_reason": {"null": 1, "empty": 2}, "nulled_values": {}, "windows": 9, "tokens": 900,
    "truncated_notes": 0, "shards": {"total": 1, "committed_before": 0, "processed": 1, "failed": []},
    "retries": 0, "actor_restarts": 0, "stalls": [], "interrupted": False, "per_pool": {},
    "per_actor": {}, "wall_s": 1.5, "tokens_per_s": 600.0,
    "started_at": "2025-01-01T00:00:00+00:00", "finished_at": "2025-01-01T00:00:02+00:00",
}  # fmt: skip
