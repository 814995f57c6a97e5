"""`clinicalbert bench --scale N`: the cached corpus, model, spec and finished output it makes,
and every step's figures (each step in a process of its own) on a tiny N."""

from __future__ import annotations

import json
import sys

import pyarrow.parquet as pq
import pytest

from jobs import bench
from jobs.bench import scale

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_note_ids_are_distinct_scattered_and_typed():
    ints = scale.note_ids(0, 5000, "int64").to_numpy()
    assert len(set(ints.tolist())) == 5000 and ints.min() >= 1 and ints.max() <= 1 << 40
    assert not (ints[1:] > ints[:-1]).all()  # not in row order
    strings = scale.note_ids(4990, 5000, "string").to_pylist()
    assert all(len(s) == 14 and s[0] == "n" and s[1:].isdigit() for s in strings)
    assert [int(s[1:]) for s in strings] == ints[4990:].tolist()  # the same ids, as text


def test_scale_bench_prints_every_steps_figures(tmp_path, monkeypatch, capsys):
    from jobs.verify import verify_output

    monkeypatch.setitem(sys.modules, "transformers", None)  # the job layer's own: not needed
    monkeypatch.setattr(scale, "FILE_ROWS", 800)  # 3 files, 8 row groups (= shards) of <= 300
    monkeypatch.setattr(scale, "GROUP_ROWS", 300)
    out = tmp_path / "scale.json"
    args = ["--scale", "2000", "--scale-ids", "string", "--cache", str(tmp_path),
            "--dispatch-actors", "20", "--dispatch-shards", "500", "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    root = tmp_path / "scale-2000-string"
    assert figures["dir"] == str(root)

    made = figures["made"]
    assert made["cached"] is False and made["files"] == 3 and made["row_groups"] == 8
    files = sorted((root / "corpus").glob("*.parquet"))
    assert [pq.read_metadata(f).num_rows for f in files] == [800, 800, 400]
    assert [pq.read_metadata(files[0]).row_group(i).num_rows for i in range(3)] == [300, 300, 200]
    ids = pq.read_table(root / "corpus", columns=["note_id"])["note_id"].to_pylist()
    assert len(set(ids)) == 2000 and all(len(i) == 14 for i in ids)
    assert made["corpus_bytes"] == sum(f.stat().st_size for f in files)

    assert list(figures["steps"]) == ["validate", "dry-run", "plan", "verify"]
    for name, step in figures["steps"].items():
        assert 0 < step["wall_s"] <= step["process_s"], name
        assert 0 < step["rss_before_kib"] < step["peak_rss_kib"], name
        assert f"  {name:<9}" in printed and "MiB" in printed
    plan = figures["steps"]["plan"]
    assert plan["shards"] == made["output_parts"] == 8 and plan["rows"] == 2000
    assert plan["ids_s"] is not None  # the driver's repeated-id check ran, and said how long
    assert plan["resume_ids"] == "verdict kept"  # a resume over the same corpus read no id
    assert "verdict kept" in printed
    assert verify_output(str(root / "output")) == []  # a finished output, as verify expects
    written = pq.read_table(root / "output", columns=["id"])["id"].to_pylist()
    assert sorted(written) == sorted(ids)
    assert figures["dispatch"]["shards"] == 500 and "500 shards over 20 fake actors" in printed

    again = scale.make_files(root, 2000, "string")  # cached: nothing made again
    assert again["cached"] is True and again["corpus_s"] == made["corpus_s"]
