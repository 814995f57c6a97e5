"""Corpus readers, staging and shards: every row exactly once, deterministic ids, filters."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import corpus as corpus_mod
from jobs.corpus import FORMATS, Shard, plan_shards, read_shard, textfile
from jobs.spec import CorpusSpec

TRICKY = [
    'Pt is a 67 yo M, "CHF" hx.\nDischarge:\n  lasix, "metoprolol", 25 mg',
    "single line",
    'quotes "" and commas,,, and\r\nCRLF lines',
    "[**2112-4-18**] seen by [**Known lastname 658**]\n\n\nend",
]


def spec(**kw) -> CorpusSpec:
    return CorpusSpec.model_validate(kw)


def read_all(
    shards: list[Shard], corpus: CorpusSpec, batch_rows: int = 4
) -> tuple[list[dict], int, int]:
    """(rows with their shard id, rows_in, rows_filtered) over all shards."""
    rows, rows_in, filtered = [], 0, 0
    for shard in shards:
        reader = read_shard(shard, corpus, batch_rows)
        for batch in reader:
            assert 0 < batch.num_rows <= batch_rows
            assert (
                batch.schema.names[:2] == ["id", "text"] and batch.schema.names[-1] == "row_index"
            )
            assert batch.schema.field("row_index").type == pa.int64()
            rows += [dict(r, shard=shard.id) for r in batch.to_pylist()]
        assert reader.rows_in == shard.num_rows
        rows_in, filtered = rows_in + reader.rows_in, filtered + reader.rows_filtered
    return rows, rows_in, filtered


def write_parquet_dir(
    root: Path, files: int = 3, rows: int = 25, group: int = 10
) -> dict[int, str]:
    root.mkdir(parents=True, exist_ok=True)
    expected, next_id = {}, 0
    for f in range(files):
        ids = list(range(next_id, next_id + rows))
        texts = [f"note {i} " + TRICKY[i % len(TRICKY)] for i in ids]
        table = pa.table({
            "note_id": pa.array(ids, pa.int64()),
            "TEXT": texts,
            "category": ["Discharge summary" if i % 3 else "Nursing" for i in ids],
            "subject": [1000 + i for i in ids],
        })  # fmt: skip
        pq.write_table(table, root / f"part-{f}.parquet", row_group_size=group)
        expected.update(zip(ids, texts))
        next_id += rows
    (root / "_SUCCESS").write_text("")  # skipped: names starting with '_' or '.'
    return expected


def test_parquet_every_row_once(tmp_path: Path):
    expected = write_parquet_dir(tmp_path / "pq")
    corpus = spec(format="parquet", paths=[str(tmp_path / "pq")], id_column="note_id",
                  text_column="TEXT", keep_columns=["subject"])  # fmt: skip
    shards = plan_shards(corpus, str(tmp_path / "staging"), shard_rows=20)
    # 3 files x row groups (10, 10, 5): groups of <= 20 rows -> (0, 1), (2,) per file
    assert [s.row_groups for s in shards] == [(0, 1), (2,)] * 3
    assert [s.num_rows for s in shards] == [20, 5] * 3
    assert not (tmp_path / "staging").exists()  # parquet is read in place
    rows, rows_in, filtered = read_all(shards, corpus)
    assert {r["id"]: r["text"] for r in rows} == expected and len(rows) == len(expected)
    assert (rows_in, filtered) == (75, 0)
    assert all(r["subject"] == 1000 + r["id"] for r in rows)
    first = [r for r in rows if r["shard"] == shards[1].id]
    assert [r["row_index"] for r in first] == list(range(5))
    assert [r["id"] for r in first] == list(range(20, 25))


def test_globs_dedupe_and_file_uris(tmp_path: Path):
    expected = write_parquet_dir(tmp_path / "pq", files=2, rows=6, group=3)
    corpus = spec(
        format="parquet",
        paths=[f"file://{tmp_path}/pq/part-1.parquet", str(tmp_path / "pq" / "*.parquet")],
        id_column="note_id", text_column="TEXT",
    )  # fmt: skip
    shards = plan_shards(corpus, str(tmp_path / "staging"), shard_rows=100)
    assert [s.path for s in shards] == [
        f"file://{tmp_path}/pq/part-1.parquet",
        str(tmp_path / "pq" / "part-0.parquet"),
    ]  # spec order first; part-1 is not read twice
    rows, _, _ = read_all(shards, corpus)
    assert sorted(r["id"] for r in rows) == sorted(expected)


def test_a_jobs_output_and_staging_inside_the_corpus_are_never_notes(tmp_path: Path):
    """`output.path: notes/embedded` beside the notes: its parts, a kept staging dir and an
    output whose first run has only its lock are left out of a dir or glob listing, so a
    resumed run plans the same shards; naming such a dir itself is a clear error."""
    from jobs.corpus import remove_staged
    from jobs.output import LOCK_FILE, META_FILES

    root = tmp_path / "notes"
    write_parquet_dir(root, files=2, rows=6, group=3)
    staging = str(root / "jsonl_out.staging")
    src = tmp_path / "n.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(4)))
    staged = plan_shards(spec(format="jsonl", paths=[str(src)]), staging, shard_rows=2)
    assert (root / "jsonl_out.staging" / "_staging").is_file()
    for name, marker in (("embedded", "_job.json"), ("starting", LOCK_FILE)):
        (root / name).mkdir()
        (root / name / marker).write_text("{}")
        pq.write_table(pa.table({"id": [1], "embedding": [[0.5]]}), root / name / "part-x.parquet")
    assert {"_job.json", LOCK_FILE} <= set(corpus_mod.OWN_DIR_MARKERS) and "_job.json" in META_FILES
    for paths in ([str(root)], [str(root / "**" / "*.parquet")]):
        corpus = spec(format="parquet", paths=paths, id_column="note_id", text_column="TEXT")
        shards = plan_shards(corpus, str(tmp_path / "staging"), shard_rows=100)
        assert sorted(Path(s.path).name for s in shards) == ["part-0.parquet", "part-1.parquet"]
    for own in ("embedded", "jsonl_out.staging"):
        corpus = spec(format="parquet", paths=[str(root / own)])
        with pytest.raises(ValueError, match="is an output or staging dir of a clinicalbert job"):
            plan_shards(corpus, str(tmp_path / "staging"), shard_rows=100)
    remove_staged(staging, [s.path for s in staged])  # the marker goes with the last staged file
    assert not (root / "jsonl_out.staging").exists()


def test_shard_ids_deterministic_and_change_with_the_file(tmp_path: Path):
    write_parquet_dir(tmp_path / "pq")
    corpus = spec(
        format="parquet", paths=[str(tmp_path / "pq")], id_column="note_id", text_column="TEXT"
    )
    plan = lambda: plan_shards(corpus, str(tmp_path / "staging"), shard_rows=20)  # noqa: E731
    first = plan()
    assert plan() == first
    assert len({s.id for s in first}) == len(first)
    path = tmp_path / "pq" / "part-1.parquet"
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 24), path, row_group_size=10)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    second = plan()
    changed = {s.id for s in first} ^ {s.id for s in second}
    assert {s.id for s in first if s.path == str(path)} <= changed
    assert [s.id for s in first if s.path != str(path)] == [
        s.id for s in second if s.path != str(path)
    ]


def test_jsonl_gz_staged_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    records = [{"id": f"n{i}", "text": TRICKY[i % 4], "dept": i % 2} for i in range(23)]
    src = tmp_path / "notes.jsonl.gz"
    with gzip.open(src, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    corpus = spec(format="jsonl", paths=[str(src)], keep_columns=["dept"])
    staging = tmp_path / "out" / "_staging"
    calls = []
    # like Ray tasks: fn and each source travel pickled
    tracking_map = lambda fn, xs: [calls.append(x) or pickle.loads(pickle.dumps(fn))(x) for x in xs]  # noqa: E731
    shards = plan_shards(corpus, str(staging), shard_rows=10, map_fn=tracking_map)
    assert len(calls) == 1 and calls[0].path == str(src)
    staged = sorted(staging.glob("*.parquet"))
    assert len(staged) == 1 and staged[0].name.startswith("notes.jsonl.gz-")
    assert [s.num_rows for s in shards] == [10, 10, 3] and {s.path for s in shards} == {
        str(staged[0])
    }
    assert all(s.source == str(src) for s in shards)
    rows, _, _ = read_all(shards, corpus)
    assert [(r["id"], r["text"], r["dept"]) for r in rows] == [
        (r["id"], r["text"], r["dept"]) for r in records
    ]
    # a second plan reuses the staged file without reading the source
    mtime = staged[0].stat().st_mtime_ns
    monkeypatch.setattr(FORMATS["jsonl"], "batches", lambda *a: pytest.fail("restaged"))
    assert plan_shards(corpus, str(staging), shard_rows=10) == shards
    assert staged[0].stat().st_mtime_ns == mtime


def mimic_csv(path: Path, with_errors: bool) -> list[dict]:
    """NOTEEVENTS-like csv.gz: quoted multi-line TEXT with commas and doubled quotes.

    CHARTTIME is always empty, ISERROR empty except (with_errors) some 1s and 0s.
    """
    rows = []
    for i in range(30):
        error = "1" if i % 10 == 0 else "0" if i % 5 == 0 else ""
        rows.append({
            "ROW_ID": 100 + i, "SUBJECT_ID": 7000 + i, "CHARTTIME": "",
            "CATEGORY": "Discharge summary" if i % 2 == 0 else "Nursing/other",
            "ISERROR": error if with_errors else "",
            "TEXT": TRICKY[i % 4],
        })  # fmt: skip
    header = list(rows[0])
    lines = [",".join(header)]
    for r in rows:
        cells = [str(r[c]) for c in header[:-1]] + ['"' + r["TEXT"].replace('"', '""') + '"']
        lines.append(",".join(cells))
    with gzip.open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
    return rows


@pytest.mark.parametrize("with_errors", [True, False])
def test_csv_gz_multiline_with_where(tmp_path: Path, with_errors: bool):
    rows = mimic_csv(tmp_path / "NOTEEVENTS.csv.gz", with_errors)
    corpus = spec(
        format="csv", paths=[str(tmp_path / "NOTEEVENTS.csv.gz")], id_column="ROW_ID", text_column="TEXT",
        keep_columns=["SUBJECT_ID", "CHARTTIME"],
        where={"CATEGORY": "Discharge summary", "ISERROR": [None, 0]},
    )  # fmt: skip
    shards = plan_shards(corpus, str(tmp_path / "staging"), shard_rows=8)
    assert [s.num_rows for s in shards] == [8, 8, 8, 6]
    got, rows_in, filtered = read_all(shards, corpus)
    want = [r for r in rows if r["CATEGORY"] == "Discharge summary" and r["ISERROR"] != "1"]
    assert len(want) == (12 if with_errors else 15)
    assert [r["id"] for r in got] == [r["ROW_ID"] for r in want]
    assert [r["text"] for r in got] == [r["TEXT"].encode() for r in want]  # raw bytes
    assert all(r["SUBJECT_ID"] == r["id"] + 6900 for r in got)
    assert {r["CHARTTIME"] for r in got} == {None}  # all empty: read as string, empty = null
    assert rows_in == 30 and rows_in == len(got) + filtered


def test_csv_bad_bytes_and_empty_text_pass_through(tmp_path: Path):
    src = tmp_path / "notes.csv"
    src.write_bytes(b'id,text\n1,"ok"\n2,"bad \xff\xfe bytes"\n3,""\n4,"multi\nline"\n5,\n')
    corpus = spec(format="csv", paths=[str(src)])
    rows, _, _ = read_all(plan_shards(corpus, str(tmp_path / "s"), 10), corpus)
    texts = [r["text"] for r in rows]
    assert texts == [b"ok", b"bad \xff\xfe bytes", b"", b"multi\nline", None]  # "" empty, bare null


def test_csv_options_and_column_types(tmp_path: Path):
    src = tmp_path / "notes.tsv"
    src.write_text("id;code;text\n1;007;'a; b'\n2;010;'c'\n")
    corpus = spec(format="csv", paths=[str(src)], keep_columns=["code"],
                  csv={"delimiter": ";", "quote_char": "'", "column_types": {"code": "string"}})  # fmt: skip
    rows, _, _ = read_all(plan_shards(corpus, str(tmp_path / "s"), 10), corpus)
    assert [(r["id"], r["code"], r["text"]) for r in rows] == [
        (1, "007", b"a; b"),
        (2, "010", b"c"),
    ]


def test_text_dir_nested(tmp_path: Path):
    root = tmp_path / "notes"
    files = {"a/1.txt": TRICKY[0], "a/b/2.txt": TRICKY[1], "c.txt": TRICKY[2], "d/e/f/3.txt": ""}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    with gzip.open(root / "z.txt.gz", "wt") as f:
        f.write(TRICKY[3])
    (root / ".hidden").write_text("skipped")
    (root / "bad.txt").write_bytes(b"\xff\xfe")
    expected = {k: v.encode() for k, v in files.items()} | {
        "z.txt.gz": TRICKY[3].encode(),
        "bad.txt": b"\xff\xfe",
    }
    corpus = spec(format="text", paths=[str(root)])
    shards = plan_shards(corpus, str(tmp_path / "staging"), shard_rows=3)
    assert [s.num_rows for s in shards] == [3, 3]
    rows, _, _ = read_all(shards, corpus)
    assert [r["id"] for r in rows] == sorted(expected)
    assert {r["id"]: r["text"] for r in rows} == expected
    assert plan_shards(corpus, str(tmp_path / "staging"), shard_rows=3) == shards
    (root / "a" / "1.txt").write_text("changed, longer text")
    changed = plan_shards(corpus, str(tmp_path / "staging"), shard_rows=3)
    assert changed[0].id != shards[0].id and changed[1].id == shards[1].id


def test_text_glob_ids_relative_to_glob_base(tmp_path: Path):
    for rel in ("x/1.txt", "y/2.txt", "y/3.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    corpus = spec(format="text", paths=[str(tmp_path / "*" / "*.txt")])
    rows, _, _ = read_all(plan_shards(corpus, str(tmp_path / "s"), 10), corpus)
    assert [r["id"] for r in rows] == ["x/1.txt", "y/2.txt"]


def test_odd_text_values_pass_through(tmp_path: Path):
    path = tmp_path / "odd.parquet"
    texts = pa.array([b"fine", None, b"", b"\xff\xfe"], pa.binary())
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "text": texts}), path)
    corpus = spec(format="parquet", paths=[str(path)])
    shards = plan_shards(corpus, str(tmp_path / "s"), 10)
    batch = next(iter(read_shard(shards[0], corpus, 10)))
    assert batch.schema.field("text").type == pa.binary()  # binary stays binary
    assert batch.column("text").to_pylist() == [b"fine", None, b"", b"\xff\xfe"]
    nums = tmp_path / "nums.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": pa.array([3], pa.int64())}), nums)
    corpus = spec(format="parquet", paths=[str(nums)])
    with pytest.raises(ValueError, match=r"nums.parquet: its text column 'text' .* is int64"):
        plan_shards(corpus, str(tmp_path / "s"), 10)  # no note at all: refused, not 1 error row
    nulls = tmp_path / "nulls.parquet"  # a file whose notes are all null: a column of type null
    pq.write_table(pa.table({"id": ["a", "b"], "text": pa.nulls(2)}), nulls)
    corpus = spec(format="parquet", paths=[str(nulls)])
    batch = next(iter(read_shard(plan_shards(corpus, str(tmp_path / "s"), 10)[0], corpus, 10)))
    assert batch.column("text").null_count == 2


def test_where_equality_and_membership(tmp_path: Path):
    path = tmp_path / "w.parquet"
    table = pa.table({"id": range(8), "text": ["t"] * 8,
                      "cat": ["a", "b", None, "a", "c", "a", None, "b"],
                      "err": pa.array([0, 1, None, None, 0, 1, 0, 0], pa.int64())})  # fmt: skip
    pq.write_table(table, path, row_group_size=3)
    cases = [
        ({"cat": "a"}, [0, 3, 5]),
        ({"cat": ["a", "b"]}, [0, 1, 3, 5, 7]),
        ({"cat": [None, "c"]}, [2, 4, 6]),
        ({"cat": None}, [2, 6]),
        ({"cat": "a", "err": [None, 0]}, [0, 3]),
        ({"err": 1}, [1, 5]),
    ]
    for where, ids in cases:
        corpus = spec(format="parquet", paths=[str(path)], where=where)
        rows, rows_in, filtered = read_all(plan_shards(corpus, str(tmp_path / "s"), 100), corpus)
        assert [r["id"] for r in rows] == ids, where
        assert (rows_in, filtered) == (8, 8 - len(ids))
        assert [r["row_index"] for r in rows] == ids  # index within the shard, before where


def test_where_type_mismatch_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"id": [1], "text": ["t"], "n": [1]}), path)
    corpus = spec(format="parquet", paths=[str(path)], where={"n": "abc"})
    shard = plan_shards(corpus, str(tmp_path / "s"), 10)[0]
    with pytest.raises(
        ValueError, match=r"corpus\.where\.n: cannot compare 'abc' with column type int64"
    ):
        list(read_shard(shard, corpus, 10))


def test_limit(tmp_path: Path):
    path = tmp_path / "l.parquet"
    table = pa.table({"id": range(30), "text": ["t"] * 30, "keep": [i % 3 == 0 for i in range(30)]})
    pq.write_table(table, path, row_group_size=5)
    plain = spec(format="parquet", paths=[str(path)])
    full = plan_shards(plain, str(tmp_path / "s"), 10)
    corpus = spec(format="parquet", paths=[str(path)], limit=13)
    shards = plan_shards(corpus, str(tmp_path / "s"), 10)
    assert [(s.num_rows, s.row_limit) for s in shards] == [(10, None), (3, 3)]
    assert shards[0] == full[0] and shards[1].id != full[1].id
    assert [r["id"] for r in read_all(shards, corpus)[0]] == list(range(13))
    assert plan_shards(corpus, str(tmp_path / "s"), 10) == shards
    exact = spec(format="parquet", paths=[str(path)], limit=20)
    assert plan_shards(exact, str(tmp_path / "s"), 10) == full[:2]
    filtered = spec(format="parquet", paths=[str(path)], where={"keep": True}, limit=5)
    shards = plan_shards(filtered, str(tmp_path / "s"), 10)
    rows, rows_in, n_filtered = read_all(shards, filtered)
    assert [r["id"] for r in rows] == [0, 3, 6, 9, 12]
    assert [s.num_rows for s in shards] == [10, 3] and rows_in == len(rows) + n_filtered


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_missing_column_names_it(tmp_path: Path, fmt: str):
    src = tmp_path / f"x.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"id": [1], "body": ["t"]}), src)
    elif fmt == "csv":
        src.write_text("id,body\n1,t\n")
    else:
        src.write_text('{"id": 1, "body": "t"}\n')
    corpus = spec(format=fmt, paths=[str(src)], keep_columns=["hadm"])
    with pytest.raises(
        ValueError,
        match=r"column 'text' \(corpus\.text_column\) not found; available columns: 'id', 'body'",
    ):
        plan_shards(corpus, str(tmp_path / "s"), 10)
    good = spec(format=fmt, paths=[str(src)], text_column="body", keep_columns=["hadm"])
    with pytest.raises(
        ValueError, match=r"x\.\w+: column 'hadm' \(corpus\.keep_columns\) not found"
    ):
        plan_shards(good, str(tmp_path / "s"), 10)


def test_missing_path_at_plan_time(tmp_path: Path):
    corpus = spec(format="parquet", paths=[str(tmp_path / "none" / "*.parquet")])
    with pytest.raises(ValueError, match="matches no file"):
        plan_shards(corpus, str(tmp_path / "s"), 10)


def test_staging_is_atomic_on_failure(tmp_path: Path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"id": {"a": 1}, "text": "a"}\n{"id": 2, "text": "b"}\n' * 3)
    corpus = spec(format="jsonl", paths=[str(src)])
    with pytest.raises(ValueError, match=r"bad\.jsonl: cannot read as jsonl"):
        plan_shards(corpus, str(tmp_path / "s"), 10)
    assert list((tmp_path / "s").iterdir()) == []  # no partial or temp file left


def test_broken_jsonl_lines_become_error_rows_and_the_rest_is_read(
    tmp_path: Path, monkeypatch, capfd
):
    """pyarrow fails a JSONL file whole (and numbers its rows per block): staging then reads
    it line by line. A line that is not a JSON object, or whose id has another JSON type, is
    a row of nulls with reason not_json; a text that is no string, not_text; a line that is
    not UTF-8, undecodable; every other line is read as pyarrow reads it. Values never reach
    an error message; a failed first pass leaves no file and no finalizer noise."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(textfile, "INFER_BLOCK_BYTES", 4096)  # many blocks, small file
    good = "".join(json.dumps({"id": i, "text": f"note {i} " * 8, "hadm": i * 10}) + "\n"
                   for i in range(400))  # fmt: skip
    bad = (
        "{not json\n"  # line 401
        + "[1, 2]\n"  # 402: JSON, not an object
        + json.dumps({"id": "x401", "text": "note"})
        + "\n"  # 403: a string id among ints
        + json.dumps({"id": 402, "text": 42, "hadm": 5})
        + "\n"  # 404: a number as text
        + "\n"  # blank: skipped, as pyarrow skips it
    ).encode() + b'{"id": 403, "text": "caf\xe9"}\n'  # 406: latin-1, not UTF-8
    src = tmp_path / "in.jsonl"
    src.write_bytes(good.encode() + bad + good.replace('"id": ', '"id": 1000').encode())
    corpus = spec(format="jsonl", paths=[str(src)], keep_columns=["hadm"])
    (shard,) = plan_shards(corpus, str(tmp_path / "s"), 10_000)
    table = pq.read_table(shard.path)
    assert table.num_rows == 805 and table.schema.field("id").type == pa.int64()
    assert table.schema.field("hadm").type == pa.int64()
    reasons = table["_reason"].to_pylist()
    assert reasons[400:405] == ["not_json", "not_json", "not_json", "not_text", "undecodable"]
    assert reasons[:400] == [None] * 400 == reasons[405:]
    assert table.slice(400, 5)["id"].to_pylist() == [None, None, None, 402, None]
    assert table.slice(403, 1)["hadm"].to_pylist() == [5]  # kept: only the text is no text
    assert table["id"].to_pylist()[405:407] == [10000, 10001]
    assert table["text"].to_pylist()[:2] == [f"note {i} " * 8 for i in range(2)]
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "note 1" not in err

    nested = tmp_path / "nested.jsonl"  # ids that are lists: not read line by line either
    nested.write_text(json.dumps({"id": [1], "text": "x"}) + "\n" + good)
    with pytest.raises(ValueError) as e:
        plan_shards(spec(format="jsonl", paths=[str(nested)]), str(tmp_path / "s2"), 100)
    want = "cannot read as jsonl: line 2: 'id' is a number, where line 1 has a list"
    assert str(e.value) == f"{nested}: {want}"
    assert not (tmp_path / "s2").exists() or list((tmp_path / "s2").iterdir()) == []


def test_shard_is_plain_data():
    shard = Shard("ab", "/x.parquet", (0, 1), 10, "/x.parquet")
    assert shard == Shard(**{f: getattr(shard, f) for f in shard.__dataclass_fields__})
    assert hash(shard) == hash(Shard("ab", "/x.parquet", (0, 1), 10, "/x.parquet"))


def test_csv_errors_do_not_quote_data(tmp_path: Path):
    src = tmp_path / "x.csv"
    src.write_bytes(b"id,n,text\n1,2,a\n2,CANARY,b\n")  # pyarrow's message quotes the value
    corpus = spec(format="csv", paths=[str(src)], csv={"column_types": {"n": "int64"}})
    with pytest.raises(ValueError, match=r"x\.csv: cannot read as csv") as e:
        plan_shards(corpus, str(tmp_path / "s"), 10)
    assert "CANARY" not in str(e.value) and e.value.__suppress_context__


def test_ragged_csv_rows_become_error_rows_in_their_places(tmp_path: Path, monkeypatch):
    """A row with more or fewer fields than the header is a row of nulls with reason
    not_csv, where it stood; every other row is read as from the file without it, across
    pyarrow's blocks, quoted newlines and blank lines; no value of a ragged row is kept."""
    import pyarrow.parquet as pq

    monkeypatch.setattr(textfile, "INFER_BLOCK_BYTES", 4096)  # many blocks, small file
    good = [f'{i},"note {i}\nsecond line, with a comma",{i * 10}\n' for i in range(600)]
    ragged = {0: "900,CANARY,x,y\n", 1: "901\n", 250: "CANARY\n", 599: "9,a,b,c,d\n"}
    lines = []
    for i, line in enumerate(good):
        if i in ragged:
            lines.append(ragged[i])
        lines.append(line)
        if i == 300:
            lines.append("\n")  # blank: no row, as pyarrow skips it
    src, clean = tmp_path / "in.csv", tmp_path / "clean.csv"
    src.write_text("id,text,hadm\n" + "".join(lines) + '"902,CANARY\n')  # unclosed quote: 1 field
    clean.write_text("id,text,hadm\n" + "".join(good))
    corpus = spec(format="csv", paths=[str(src)], keep_columns=["hadm"])
    (shard,) = plan_shards(corpus, str(tmp_path / "s"), 10_000)
    (want,) = plan_shards(spec(format="csv", paths=[str(clean)], keep_columns=["hadm"]),
                          str(tmp_path / "c"), 10_000)  # fmt: skip
    table = pq.read_table(shard.path)
    assert table.num_rows == 605 and table.schema.field("id").type == pa.int64()
    reasons = table["_reason"].to_pylist()
    places = [0, 2, 252, 602, 604]  # the records' own places (a blank line is none)
    assert [i for i, r in enumerate(reasons) if r is not None] == places
    assert set(reasons) == {None, "not_csv"}
    bad = table.take(places)
    assert all(v is None for c in ("id", "text", "hadm") for v in bad[c].to_pylist())
    rows = table.filter(pa.compute.is_null(table["_reason"])).drop_columns(["_reason"])
    assert rows.equals(pq.read_table(want.path))
    assert b"CANARY" not in Path(shard.path).read_bytes()

    every = tmp_path / "every.csv"  # no row fits: the file is all error rows, not refused
    every.write_text("id,text\n1\n2,a,b\n")
    (shard,) = plan_shards(spec(format="csv", paths=[str(every)]), str(tmp_path / "e"), 100)
    assert pq.read_table(shard.path)["_reason"].to_pylist() == ["not_csv", "not_csv"]


def test_staging_dir_as_uri(tmp_path: Path):
    src = tmp_path / "n.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(5)))
    corpus = spec(format="jsonl", paths=[f"file://{src}"])
    shards = plan_shards(corpus, f"file://{tmp_path}/out/_staging", shard_rows=2)
    assert all(s.path.startswith(f"file://{tmp_path}/out/_staging/") for s in shards)
    assert [r["id"] for r in read_all(shards, corpus)[0]] == list(range(5))


def test_batches_are_cut_by_text_bytes():
    from jobs.corpus import cut_by_bytes

    texts = ["a" * 10, "b" * 10, "c" * 35, None, "d" * 5, "e" * 20]
    batch = pa.RecordBatch.from_pydict({"text": texts, "i": list(range(6))})
    pieces = list(cut_by_bytes(batch, "text", 30))
    assert [p["i"].to_pylist() for p in pieces] == [[0, 1], [2], [3, 4, 5]]
    assert sum(p.num_rows for p in pieces) == 6  # nothing lost
    assert [p.num_rows for p in cut_by_bytes(batch, "text", None)] == [6]
    ints = pa.RecordBatch.from_pydict({"text": [1, 2, 3]})
    assert [p.num_rows for p in cut_by_bytes(ints, "text", 1)] == [3]  # not text: uncut


def test_moving_the_corpus_keeps_shard_ids_and_the_job_hash(tmp_path: Path):
    import shutil

    from jobs.spec import mount_free, parse_spec

    write_parquet_dir(tmp_path / "mnt_a" / "notes")
    shutil.copytree(tmp_path / "mnt_a", tmp_path / "mnt_b")  # a new mount: new paths, mtimes
    with gzip.open(tmp_path / "mnt_a" / "n.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"id": i, "text": f"note {i}"}) + "\n" for i in range(30))
    shutil.copy(tmp_path / "mnt_a" / "n.jsonl.gz", tmp_path / "mnt_b" / "n.jsonl.gz")
    plans = {}
    for mnt in ("mnt_a", "mnt_b"):
        pq_corpus = spec(format="parquet", paths=[str(tmp_path / mnt / "notes")],
                         id_column="note_id", text_column="TEXT")  # fmt: skip
        js_corpus = spec(format="jsonl", paths=[str(tmp_path / mnt / "*.jsonl.gz")])
        plans[mnt] = [
            [s.id for s in plan_shards(c, str(tmp_path / mnt / "staging"), shard_rows=10)]
            for c in (pq_corpus, js_corpus)
        ]
    assert plans["mnt_a"] == plans["mnt_b"]  # same files, same shard ids: resume finds them
    (tmp_path / "mnt_b" / "n.jsonl.gz").write_bytes(b"")  # another content: other ids
    moved = plan_shards(spec(format="jsonl", paths=[str(tmp_path / "mnt_b" / "*.jsonl.gz")]),
                        str(tmp_path / "mnt_b" / "staging2"), shard_rows=10)  # fmt: skip
    assert [s.id for s in moved] != plans["mnt_a"][1]

    assert mount_free("/mnt/a/notes/*.parquet") == "notes/*.parquet"
    assert mount_free("s3://bucket/x/NOTEEVENTS.csv.gz") == "NOTEEVENTS.csv.gz"
    assert mount_free("/data/notes/") == "notes"
    assert mount_free("/data/**/*.txt") == "data/**/*.txt"

    def job_hash(path: str) -> str:
        data = {"name": "t", "corpus": {"format": "parquet", "paths": [path]},
                "model": {"variant": "custom", "path": "/models/m"},
                "device_pool": [{"name": "cpu", "device": "cpu"}],
                "output": {"path": "/out"}}  # fmt: skip
        return parse_spec(data, tmp_path, check_paths=False).spec_hash()

    assert job_hash("/mnt/a/notes") == job_hash("s3://bucket/notes/")
    assert job_hash("/mnt/a/notes") != job_hash("/mnt/a/other_notes")


def test_one_bad_byte_never_changes_a_column_type(tmp_path: Path):
    """A non-UTF-8 value in the id or a kept column, in the first block or a later one: the
    column stays string, that value becomes null and `_undecodable` names its column."""
    good = b"".join(b"n%d,h%d,note %d\n" % (i, i, i) for i in range(3000))
    for where in ("first", "late"):
        bad = b"n\xff1,h1,note x\nn2,h\xfe2,note y\n"
        body = bad + good if where == "first" else good + bad
        path = tmp_path / f"{where}.csv.gz"
        with gzip.open(path, "wb") as f:
            f.write(b"ROW_ID,HADM,TEXT\n" + body)
        monkey = textfile.INFER_BLOCK_BYTES
        textfile.INFER_BLOCK_BYTES = 4096  # several blocks: the bad rows in a later one
        try:
            corpus = spec(format="csv", paths=[str(path)], id_column="ROW_ID",
                          text_column="TEXT", keep_columns=["HADM"])  # fmt: skip
            shards = plan_shards(corpus, str(tmp_path / f"staging-{where}"), shard_rows=1000)
        finally:
            textfile.INFER_BLOCK_BYTES = monkey
        rows, rows_in, _ = read_all(shards, corpus, batch_rows=500)
        assert rows_in == 3002
        schema = pq.read_schema(shards[0].path)
        assert schema.field("ROW_ID").type == pa.string() == schema.field("HADM").type
        marked = {(r["id"], r["HADM"], r["_undecodable"]) for r in rows if r["_undecodable"]}
        assert marked == {(None, "h1", "ROW_ID"), ("n2", None, "HADM")}


def test_file_headers_as_exports_write_them(tmp_path: Path, monkeypatch):
    """What preflight (validate, run) reads of a CSV/JSONL file before any work: a UTF-8
    byte-order mark (Excel's "CSV UTF-8") is no part of the first column's name; a JSONL file
    whose first line is broken or huge is read from its first JSON object; a UTF-16 file and a
    column the corpus reads that the file has twice are refused, naming the file; a JSONL line
    that gives such a column twice is a not_json row."""
    from jobs.corpus import Source

    def columns(name: str, data: bytes, fmt: str) -> list[str]:
        (tmp_path / name).write_bytes(data)
        source = Source(str(tmp_path / name), len(data), None, name=name)
        return FORMATS[fmt].columns(source, spec(format=fmt, paths=[str(tmp_path / name)]))

    bom = b"\xef\xbb\xbf"
    assert columns("a.csv", bom + b"id,text\r\n1,a\r\n", "csv") == ["id", "text"]
    assert columns("a.jsonl", bom + b'{"id": 1, "text": "a"}\n', "jsonl") == ["id", "text"]
    first = b'{"id": 1, "text": "cut off\n\n[1]\n{"id": 2, "text": "b", "hadm": 3}\n'
    assert columns("b.jsonl", first, "jsonl") == ["id", "text", "hadm"]
    huge = json.dumps({"id": 1, "text": "x" * (3 << 20)}).encode() + b"\n"  # past the 64 KiB reads
    assert columns("c.jsonl", huge, "jsonl") == ["id", "text"]
    assert columns("d.jsonl", b"", "jsonl") == []
    monkeypatch.setattr(FORMATS["jsonl"], "JSONL_HEAD_LINES", 3)
    with pytest.raises(ValueError, match=r"e\.jsonl: none of its first 3 lines is a JSON object"):
        columns("e.jsonl", b"[1]\nnot json\n\xff\xfe\n" + huge, "jsonl")
    tsv = columns("t.csv", b"id\ttext\n1\ta\n", "csv")  # a TSV read with the default ","
    hint = FORMATS["csv"].columns_hint(spec(format="csv", paths=["t.csv"]), tsv)
    assert tsv == ["id\ttext"] and hint.endswith('set corpus.csv.delimiter to "\\t")')
    semicolons = spec(format="csv", paths=["t.csv"], csv={"delimiter": ";"})
    assert 'delimiter to ","' in FORMATS["csv"].columns_hint(semicolons, ["id,text"])
    assert FORMATS["csv"].columns_hint(semicolons, ["id", "text"]) == ""
    with pytest.raises(ValueError, match=r"f\.csv: the file is UTF-16 .*iconv -f UTF-16"):
        columns("f.csv", "id,text\n1,a\n".encode("utf-16"), "csv")
    with pytest.raises(ValueError, match=r"g\.csv: its header is not UTF-8"):
        columns("g.csv", b"id,t\xe9xt\n1,a\n", "csv")
    import bz2
    import zipfile

    plain = b"id,text\n1,a\n"
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as z:
        z.writestr("notes.csv", plain)
    with open(tmp_path / "o.parquet", "wb") as f:
        pq.write_table(pa.table({"id": [1], "text": ["a"]}), f)
    for name, data, what in [
        ("j.csv.zip", packed.getvalue(), "a zip archive"),
        ("k.csv", gzip.compress(plain), "gzip data: name it ...gz"),
        ("l.jsonl", bz2.compress(plain), "bzip2 data: name it ...bz2"),
        ("m.csv.xz", b"\xfd7zXZ\x00\x00\x04", "xz data, which is not read"),
        ("n.csv", (tmp_path / "o.parquet").read_bytes(), "a Parquet file: set corpus.format"),
    ]:  # by their first bytes, not their names (after what a name asks to decompress)
        with pytest.raises(ValueError, match=f"{re.escape(name)}: not a text file but {what}"):
            columns(name, data, "jsonl" if name.endswith("jsonl") else "csv")
    assert columns("p.csv.gz", gzip.compress(plain), "csv") == ["id", "text"]
    assert columns("q.csv", b"BZh,text\n1,a\n", "csv") == ["BZh", "text"]  # a header, no bzip2

    (tmp_path / "h.csv").write_text("id,text,text\n1,a,b\n")
    with pytest.raises(ValueError) as e:
        plan_shards(spec(format="csv", paths=[str(tmp_path / "h.csv")]), str(tmp_path / "s"), 9)
    assert str(e.value) == (f"corpus.text_column: {tmp_path / 'h.csv'} has 2 columns named "
                            "'text': the job cannot tell which one to read; rename the others")  # fmt: skip

    src = tmp_path / "i.jsonl"  # a BOM before a file read line by line: line 1 is a row
    src.write_bytes(bom + b'{"id": 1, "text": "a"}\n{broken\n{"id": 2, "text": "b"}\n')
    (shard,) = plan_shards(spec(format="jsonl", paths=[str(src)]), str(tmp_path / "s2"), 9)
    table = pq.read_table(shard.path)
    assert table["id"].to_pylist() == [1, None, 2]
    assert table["_reason"].to_pylist() == [None, "not_json", None]

    src = tmp_path / "dup.jsonl"  # a key given twice: json.loads would keep the last silently
    src.write_text('{"id": 1, "text": "a", "text": "b"}\n'
                   '{"id": 2, "text": "c", "x": 1, "x": 2, "m": {"k": 1, "k": 2}}\n'
                   '{"id": 3, "id": 4, "text": "d"}\n')  # fmt: skip
    (shard,) = plan_shards(spec(format="jsonl", paths=[str(src)]), str(tmp_path / "s3"), 9)
    table = pq.read_table(shard.path)  # twice in a column read: not_json; elsewhere: read
    assert table["id"].to_pylist() == [None, 2, None]
    assert table["text"].to_pylist() == [None, "c", None]
    assert table["_reason"].to_pylist() == ["not_json", None, "not_json"]


def test_every_format_offers_the_same_names(tmp_path: Path):
    """Each module in FORMATS offers STAGED, NOTE_PER_FILE, columns, batches, sample and
    columns_hint; on one note in each format, columns() names the file's columns and batches()
    holds the note. Only parquet is read in place, only text is one note per file."""
    from jobs.corpus import list_sources

    (tmp_path / "t").mkdir()
    pq.write_table(pa.table({"id": [7], "text": ["a note"]}), tmp_path / "n.parquet")
    (tmp_path / "n.jsonl").write_text('{"id": 7, "text": "a note"}\n')
    (tmp_path / "n.csv").write_text("id,text\n7,a note\n")
    (tmp_path / "t" / "7").write_text("a note")
    paths = {"parquet": "n.parquet", "jsonl": "n.jsonl", "csv": "n.csv", "text": "t"}
    assert set(FORMATS) == set(paths)
    for name, fmt in FORMATS.items():
        assert isinstance(fmt.STAGED, bool) and isinstance(fmt.NOTE_PER_FILE, bool)
        corpus = spec(format=name, paths=[str(tmp_path / paths[name])])
        (source,) = list_sources(corpus, 10)
        assert fmt.columns(source, corpus) == ["id", "text"], name
        (batch,) = list(fmt.batches(source, corpus))
        row = batch.to_pylist()[0]
        assert (str(row["id"]), row["text"]) in {("7", "a note"), ("7", b"a note")}, name
        sample = fmt.sample(source, corpus, ["id"], 5)
        assert sample is None or sample.schema.names == ["id"], name
        assert fmt.columns_hint(corpus, ["id"]) == "", name
    assert [n for n, f in FORMATS.items() if not f.STAGED] == ["parquet"]
    assert [n for n, f in FORMATS.items() if f.NOTE_PER_FILE] == ["text"]


def test_staging_writes_under_a_temporary_name_that_clean_staging_removes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A staged file is written under an `fs.TMP_PREFIX` name and renamed; what a killed run
    leaves under such a name is removed by clean_staging, complete staged files are kept."""
    from jobs.corpus import clean_staging
    from jobs.fs import TMP_PREFIX

    src = tmp_path / "n.jsonl"
    src.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(3)))
    corpus = spec(format="jsonl", paths=[str(src)])
    staging = tmp_path / "staging"
    seen: list[str] = []

    def interrupted(source, corpus):
        yield pa.RecordBatch.from_pydict({"id": [1, 2], "text": ["t1", "t2"]})  # a row group
        deadline = time.monotonic() + 10  # read ahead of the writer: wait for its first chunk
        while not any(staging.glob(f"{TMP_PREFIX}*")) and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.extend(p.name for p in staging.iterdir())
        raise RuntimeError("killed")

    with monkeypatch.context() as m:
        m.setattr(FORMATS["jsonl"], "batches", interrupted)
        with pytest.raises(RuntimeError, match="killed"):
            plan_shards(corpus, str(staging), shard_rows=2)
    assert len(seen) == 1 and seen[0].startswith(f"{TMP_PREFIX}n.jsonl-")
    assert list(staging.iterdir()) == []  # the temporary file went with the failure
    shards = plan_shards(corpus, str(staging), shard_rows=2)
    left = staging / f"{TMP_PREFIX}n.jsonl-0123456789abcdef.parquet-{'0' * 32}"
    left.write_bytes(b"partial")
    clean_staging(str(staging))
    assert not left.exists() and (staging / "_staging").is_file()
    assert all(Path(s.path).is_file() for s in shards)
    assert plan_shards(corpus, str(staging), shard_rows=2) == shards


@pytest.mark.parametrize("at", [0, 70, 99])
def test_a_repeated_id_anywhere_is_named_with_its_file(tmp_path: Path, at: int):
    """A repeated id after the first batches (merged archives) is found and named, with the
    input that holds it, whatever batch it is in."""
    from jobs.corpus import repeated_ids

    ids = list(range(100))
    ids[at] = 60 if at != 60 else 61
    table = pa.table({"id": ids, "text": [f"n{i}" for i in range(100)]})
    pq.write_table(table.slice(0, 50), tmp_path / "a.parquet", row_group_size=10)
    pq.write_table(table.slice(50), tmp_path / "b.parquet", row_group_size=10)
    corpus = spec(format="parquet", paths=[str(tmp_path / f) for f in ("a.parquet", "b.parquet")])
    found = repeated_ids(plan_shards(corpus, str(tmp_path / "staging"), 20), corpus)
    assert (found.ids, found.extra_rows, found.example) == (1, 1, 60)
    assert found.source.endswith("a.parquet" if at < 50 else "b.parquet")  # the first holding it


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_bytes_that_are_not_utf8_in_a_string_column_are_error_rows(tmp_path: Path, fmt: str):
    """pyarrow's JSON and Parquet readers take a string with bytes that are not UTF-8 as it is:
    such a note is one `undecodable` error row, such an id makes its row one, such a kept value
    is nulled and named; every other row reads as written."""
    from jobs.notes import classify_batch

    rows = [{"id": f"n{i}", "text": f"note {i}", "ward": "w"} for i in range(12)]
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    raw = raw.replace(b"note 3", b"caf\xe9 3").replace(b'"n7"', b'"n\xff7"')
    raw = raw.replace(
        b'"id": "n9", "text": "note 9", "ward": "w"',
        b'"id": "n9", "text": "note 9", "ward": "\xfe"',
    )
    path = tmp_path / "in.jsonl"
    path.write_bytes(raw)
    if fmt == "parquet":  # the same values, written by a tool that does not check them
        table = pa.Table.from_batches(list(read_all_jsonl(path)))
        path = tmp_path / "in.parquet"
        pq.write_table(table, path)
    corpus = spec(format=fmt, paths=[str(path)], keep_columns=["ward"])
    notes, reasons, marks = [], [], []
    for shard in plan_shards(corpus, str(tmp_path / "s"), 100):
        for batch in read_shard(shard, corpus, 5):
            n, r, m = classify_batch(batch, 10_000, "id")
            notes, reasons, marks = notes + n, reasons + r, marks + m
            assert batch.to_pylist()  # every value reads
    assert reasons == [None] * 3 + ["undecodable"] + [None] * 3 + ["undecodable"] + [None] * 4
    assert marks[7] == ["id"] and marks[9] == ["ward"] and notes[9] == "note 9"
    assert notes[:3] == ["note 0", "note 1", "note 2"] and notes[3] is None


def read_all_jsonl(path: Path):
    import pyarrow.json as pa_json

    yield from pa_json.open_json(path)


def test_a_lone_cr_in_a_csv_header_ends_it_as_pyarrow_reads_it(tmp_path: Path):
    """A CR alone inside the header line ends the header (as pyarrow ends a row there): the
    columns before it are the file's columns, what follows is a ragged row (an error row)."""
    from jobs.corpus import list_sources

    path = tmp_path / "cr.csv"
    path.write_bytes(b"id,text\rward\n1,hello\n2,there\n")
    corpus = spec(format="csv", paths=[str(path)])
    assert FORMATS["csv"].columns(list_sources(corpus, 100)[0], corpus) == ["id", "text"]
    rows, rows_in, _ = read_all(plan_shards(corpus, str(tmp_path / "s"), 100), corpus)
    assert rows_in == 3 and [r["id"] for r in rows] == [None, 1, 2]
    assert rows[0]["_reason"] is not None and rows[1]["text"] == b"hello"


def test_mlm_at_mask_over_notes_without_one_is_warned(tmp_path: Path):
    """`heads.mlm.positions: mask` predicts only at [MASK] tokens the notes hold: over notes
    with none (MIMIC's), validate, the dry run and the run warn, naming the field and file."""
    from jobs.preflight import corpus_warnings
    from jobs.spec import parse_spec

    (tmp_path / "model").mkdir()
    texts = ["pt seen ___ on day 2", "no masks here"]
    pq.write_table(pa.table({"id": [1, 2], "text": texts}), tmp_path / "notes.parquet")

    def warnings(mlm: dict) -> list[str]:
        spec = parse_spec({"name": "t", "corpus": {"format": "parquet", "paths": ["notes.parquet"]},
                           "model": {"variant": "custom", "path": "model"},
                           "heads": {"mlm": mlm}, "device_pool": [{"name": "c", "device": "cpu"}],
                           "output": {"path": "out"}}, tmp_path)  # fmt: skip
        return corpus_warnings(spec)

    (line,) = warnings({"enabled": True})
    assert line.startswith("heads.mlm.positions: 'mask' predicts only at [MASK] tokens")
    assert f"none of the first 2 notes of {tmp_path / 'notes.parquet'}" in line
    assert warnings({"enabled": True, "positions": "all"}) == warnings({"enabled": False}) == []
    texts[1] = "the [MASK] was given"
    pq.write_table(pa.table({"id": [1, 2], "text": texts}), tmp_path / "notes.parquet")
    assert warnings({"enabled": True}) == []


def test_fewer_shards_than_actors_says_which_shard_rows_fills_them():
    from jobs.corpus import Shard, idle_actors_warning

    def shards(*rows_per_group):
        return [
            Shard(f"s{i}", "a.parquet", (i,), n, "a.parquet") for i, n in enumerate(rows_per_group)
        ]

    assert idle_actors_warning(shards(10, 10, 10), 3) is None
    small = idle_actors_warning(shards(10, 10), 8)  # groups of 10 are cut: 20 rows fill 8 at 2
    assert small == ("the plan has 2 shards for 8 actors: 6 of them would sit idle; "
                     "run.shard_rows 2 gives each actor a shard")  # fmt: skip
    assert idle_actors_warning(shards(3, 2), 8).endswith("the corpus has 5 rows: at most 5 "
                                                         "actors get one")  # fmt: skip
    grouped = [Shard("s", "a.parquet", (0, 1, 2, 3), 8, "a.parquet")]  # 4 groups of 2 rows
    assert idle_actors_warning(grouped, 4).endswith("run.shard_rows 2 gives each actor a shard")
