"""Row groups larger than `shard_rows` cut into row ranges: balanced ranges, every row read
once, whole-group ids as before, 1,000 actors filled, and a resume over an older plan's part."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_jobs import assert_equals_clean_run, check_exactly_once, job, notes_table, read_out
from test_jobs import run as run_job

import jobs.driver
from jobs.corpus import Shard, idle_actors_warning, list_sources, plan_shards, stage_source
from jobs.spec import CorpusSpec


def spec(**kw) -> CorpusSpec:
    return CorpusSpec.model_validate({"format": "parquet", **kw})


def write_groups(path: Path, groups: list[int], first_id: int = 0) -> list[int]:
    """A Parquet file with one row group per entry of `groups` (that many rows); its ids."""
    ids, start = [], first_id
    with pq.ParquetWriter(path, pa.schema([("id", pa.int64()), ("text", pa.string())])) as w:
        for n in groups:
            chunk = list(range(start, start + n))
            w.write_table(pa.table({"id": pa.array(chunk, pa.int64()),
                                    "text": [f"note {i}" for i in chunk]}), row_group_size=n)  # fmt: skip
            ids, start = ids + chunk, start + n
    meta = pq.ParquetFile(path).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == groups
    return ids


def read_rows(shards: list[Shard], corpus: CorpusSpec, batch_rows: int) -> list[tuple]:
    """(shard, id, row_index) of every row read, checking each reader's counts."""
    from jobs.corpus import read_shard

    rows = []
    for shard in shards:
        reader = read_shard(shard, corpus, batch_rows)
        for batch in reader:
            assert 0 < batch.num_rows <= batch_rows
            rows += [(shard, r["id"], r["row_index"]) for r in batch.to_pylist()]
        assert reader.rows_in == shard.num_rows
    return rows


def old_id(corpus: CorpusSpec, staging: Path, row_groups: list[int]) -> str:
    """The id a shard of whole row groups had before row ranges, computed as that code did:
    sha256 of the sorted JSON [file identity, row groups, row_limit], 16 hex digits."""
    (source,) = list_sources(corpus, 10)
    identity = next(stage_source(source, corpus, str(staging), 10)).identity
    key = json.dumps([identity, row_groups, None], sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def test_a_large_row_group_is_cut_into_balanced_ranges_each_row_read_once(tmp_path: Path):
    ids = write_groups(tmp_path / "one.parquet", [25_000])
    corpus = spec(paths=[str(tmp_path / "one.parquet")])
    shards = plan_shards(corpus, str(tmp_path / "s"), shard_rows=10_000)
    assert [(s.row_groups, s.row_start, s.row_stop, s.num_rows) for s in shards] == [
        ((0,), 0, 8_334, 8_334), ((0,), 8_334, 16_667, 8_333), ((0,), 16_667, 25_000, 8_333)
    ]  # fmt: skip
    assert len({s.id for s in shards}) == 3
    assert plan_shards(corpus, str(tmp_path / "s"), shard_rows=10_000) == shards  # deterministic
    rows = read_rows(shards, corpus, batch_rows=3_000)  # batches that straddle the range ends
    assert sorted(i for _, i, _ in rows) == ids  # every row once
    # row_index: the row's position within its shard, as for whole row groups
    assert all(index == i - shard.row_start for shard, i, index in rows)


def test_whole_group_ids_are_unchanged_and_small_groups_still_combined(tmp_path: Path):
    path = tmp_path / "mixed.parquet"
    ids = write_groups(path, [3, 3, 25, 2, 4])
    corpus = spec(paths=[str(path)])
    shards = plan_shards(corpus, str(tmp_path / "s"), shard_rows=10)
    got = [(s.row_groups, s.row_start, s.row_stop) for s in shards]
    assert got == [((0, 1), None, None), ((2,), 0, 9), ((2,), 9, 17), ((2,), 17, 25),
                   ((3, 4), None, None)]  # fmt: skip
    assert shards[0].id == old_id(corpus, tmp_path / "s", [0, 1])
    assert shards[4].id == old_id(corpus, tmp_path / "s", [3, 4])
    assert shards[1].id != old_id(corpus, tmp_path / "s", [2])  # a range hashes its range too
    rows = read_rows(shards, corpus, batch_rows=4)
    assert [i for _, i, _ in rows] == ids
    assert [i for s, i, _ in rows if s is shards[2]] == list(range(15, 23))  # rows 9..16 of 2
    assert [x for s, _, x in rows if s is shards[2]] == list(range(8))
    assert [i for s, i, _ in rows if s is shards[4]] == [31, 32, 33, 34, 35, 36]


def test_limit_and_where_over_ranges(tmp_path: Path):
    path = tmp_path / "l.parquet"
    write_groups(path, [25])
    full = plan_shards(spec(paths=[str(path)]), str(tmp_path / "s"), 10)
    limited = spec(paths=[str(path)], limit=12)
    shards = plan_shards(limited, str(tmp_path / "s"), 10)
    assert shards[0] == full[0] and len(shards) == 2
    cut = shards[1]
    assert (cut.row_start, cut.row_stop, cut.num_rows, cut.row_limit) == (9, 17, 3, 3)
    assert cut.id not in {s.id for s in full}
    assert [i for _, i, _ in read_rows(shards, limited, 2)] == list(range(12))
    table = pq.read_table(path).append_column("even", pa.array([i % 2 == 0 for i in range(25)]))
    pq.write_table(table, path, row_group_size=25)
    filtered = spec(paths=[str(path)], where={"even": True}, limit=6)
    shards = plan_shards(filtered, str(tmp_path / "s"), 10)
    assert [(s.row_start, s.num_rows) for s in shards] == [(0, 9), (9, 2)]  # rows 9, 10 read
    rows = read_rows(shards, filtered, 3)
    assert [(i, x) for _, i, x in rows] == [(0, 0), (2, 2), (4, 4), (6, 6), (8, 8), (10, 1)]


def test_a_thousand_actors_each_get_a_shard_whatever_the_row_groups(tmp_path: Path):
    groups = [[5_003, 4_999], [6_100, 3_900]]  # two files, a few large row groups each
    for k, g in enumerate(groups):
        write_groups(tmp_path / f"f{k}.parquet", g, first_id=k * 20_000)
    corpus = spec(paths=[str(tmp_path / "*.parquet")])
    shards = plan_shards(corpus, str(tmp_path / "s"), shard_rows=6_100)
    assert len(shards) == 4  # a shard per row group: 996 of 1,000 actors would be idle
    line = idle_actors_warning(shards, 1_000)
    assert line is not None and line.startswith("the plan has 4 shards for 1,000 actors")
    suggested = int(re.search(r"run\.shard_rows ([\d,]+) gives", line)[1].replace(",", ""))
    assert suggested == 20_002 // 1_000
    shards = plan_shards(corpus, str(tmp_path / "s"), shard_rows=suggested)
    assert len(shards) >= 1_000 and idle_actors_warning(shards, 1_000) is None
    assert max(s.num_rows for s in shards) <= suggested
    for k, g in enumerate(groups):  # each group's ranges: contiguous, disjoint, covering it
        for group, n in enumerate(g):
            bounds = [(s.row_start, s.row_stop) for s in shards
                      if s.path.endswith(f"f{k}.parquet") and s.row_groups == (group,)]  # fmt: skip
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_a_group_an_older_plan_committed_whole_is_kept_whole(tmp_path: Path):
    path = tmp_path / "r.parquet"
    ids = write_groups(path, [4, 25, 30])
    corpus = spec(paths=[str(path)])
    new = plan_shards(corpus, str(tmp_path / "s"), 10)
    assert [s.row_groups for s in new] == [(0,)] + [(1,)] * 3 + [(2,)] * 3
    whole = old_id(corpus, tmp_path / "s", [1])  # the part an older plan committed
    resumed = plan_shards(corpus, str(tmp_path / "s"), 10, committed={whole, new[0].id})
    assert [(s.row_groups, s.row_start) for s in resumed] == [
        ((0,), None), ((1,), None), ((2,), 0), ((2,), 10), ((2,), 20)
    ]  # fmt: skip
    assert resumed[1].id == whole and resumed[1].num_rows == 25
    assert resumed[0] == new[0] and resumed[2:] == new[4:]  # the rest of the plan as new
    assert [i for _, i, _ in read_rows(resumed, corpus, 7)] == ids  # each row in one shard
    both = {whole, new[2].id}  # the whole group and a range of it: refused, naming both parts
    with pytest.raises(ValueError, match=f"row group 1: .* part {whole} .* part {new[2].id}"):
        plan_shards(corpus, str(tmp_path / "s"), 10, committed=both)


@pytest.mark.ray
def test_job_over_row_ranges_and_resume_over_an_older_plan(tmp_path, model_dir, ray_local,
                                                          monkeypatch):  # fmt: skip
    table = notes_table(40)
    pq.write_table(table, tmp_path / "notes.parquet", row_group_size=25)  # groups of 25, 15
    corpus = {"format": "parquet", "paths": [str(tmp_path / "notes.parquet")],
              "id_column": "note_id"}  # fmt: skip
    spec = job(tmp_path, model_dir, corpus)  # shard_rows 10: ranges of 9, 8, 8 and 8, 7
    report = run_job(spec, tmp_path)
    out, errors = read_out(tmp_path / "out")
    check_exactly_once(table["note_id"].to_pylist(), out, errors)
    assert report["shards"]["total"] == 5 == len(list((tmp_path / "out").glob("part-*")))
    assert report["rows_in"] == 40 == report["rows_out"]
    assert_equals_clean_run(tmp_path / "out", spec, tmp_path)

    # an older plan's output: each row group one shard; the second one's part never committed
    older = tmp_path / "older"
    spec = job(older, model_dir, corpus)
    plan, parsed = jobs.driver.plan_shards, CorpusSpec.model_validate(corpus)
    whole = [old_id(parsed, older / "staging", [g]) for g in (0, 1)]
    monkeypatch.setattr(jobs.driver, "plan_shards",
                        lambda *a, **k: plan(*a, **{**k, "committed": set(whole)}))  # fmt: skip
    assert run_job(spec, older)["shards"]["total"] == 2
    monkeypatch.setattr(jobs.driver, "plan_shards", plan)
    (older / "out" / f"part-{whole[1]}.parquet").unlink()
    (older / "out" / "_SUCCESS").unlink()
    report = run_job(spec, older)  # resumed: group 0 kept whole, group 1 cut into 2 ranges
    assert report["shards"] == {"total": 3, "committed_before": 1, "processed": 2, "failed": []}
    assert report["rows_in"] == 40 == report["rows_out"]
    out, errors = read_out(older / "out")
    check_exactly_once(table["note_id"].to_pylist(), out, errors)
    ranges = [s.id for s in plan(parsed, str(older / "staging"), 10) if s.row_groups == (1,)]
    parts = {p.stem for p in (older / "out").glob("part-*")}
    assert parts == {f"part-{i}" for i in [whole[0], *ranges]} and len(ranges) == 2
