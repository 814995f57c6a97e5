"""Jobs end to end on a local Ray: exactly-once output, pools, actor death, resume, PHI."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from clinicalbert_core import ClinicalBertRunner
from clinicalbert_core.hub import prepare
from jobs.spec import parse_spec
from jobs.synthetic import make_notes

pytestmark = pytest.mark.ray
CANARY = "ZQXJ-CANARY-7781"  # planted in notes; must never appear in logs, errors or reports


def notes_table(n: int, seed: int = 0) -> pa.Table:
    notes = make_notes(n, seed=seed, max_words=150)
    notes = [f"{t} {CANARY}" if i % 5 == 0 else t for i, t in enumerate(notes)]
    return pa.table({
        "note_id": pa.array(range(100, 100 + n), pa.int64()),
        "subject_id": pa.array([7000 + i % 9 for i in range(n)], pa.int64()),
        "text": notes,
    })  # fmt: skip


def job(tmp: Path, model_path: Path, corpus: dict, **over) -> dict:
    spec = {
        "name": "t",
        "corpus": corpus,
        "model": {"variant": "custom", "path": str(model_path), "max_seq": 64,
                  "long_notes": {"strategy": "windows", "stride": 16, "aggregate": "mean"}},
        "heads": {"pooling": "cls"},
        "device_pool": [{"name": "cpu", "device": "cpu", "actors": 2, "cpus_per_actor": 1,
                         "precision": "fp32", "batch_tokens": 1024}],
        "output": {"path": str(tmp / "out")},
        "run": {"shard_rows": 10, "batch_rows": 4, "progress_interval_s": 0.5},
    }  # fmt: skip
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return spec


def run(spec: dict, base: Path, **kw):
    from jobs.driver import run_job

    return run_job(parse_spec(spec, base), **kw)


def dry_run(spec: dict, base: Path):
    from jobs.dry_run import dry_run_job

    return dry_run_job(parse_spec(spec, base))


def read_out(path: Path) -> tuple[pa.Table, pa.Table | None]:
    parts = sorted(path.glob("part-*.parquet"))
    table = pa.concat_tables([pq.read_table(p) for p in parts])
    errs = sorted((path / "_errors").glob("part-*.parquet"))
    return table, (pa.concat_tables([pq.read_table(p) for p in errs]) if errs else None)


def parquet_corpus(tmp: Path, n: int, group: int = 5) -> tuple[pa.Table, dict]:
    """A Parquet corpus of `n` synthetic notes in row groups of `group`, and its spec section."""
    table = notes_table(n)
    pq.write_table(table, tmp / "notes.parquet", row_group_size=group)
    return table, {
        "format": "parquet",
        "paths": [str(tmp / "notes.parquet")],
        "id_column": "note_id",
    }


def direct_vectors(model: Path, notes: list[str]) -> np.ndarray:
    runner = ClinicalBertRunner.load(model, precision="fp32", max_seq=64, long_notes="windows",
                                     stride=16, aggregate="mean", batch_tokens=1024)  # fmt: skip
    return runner.encode(notes, return_hidden=False).pooled.numpy()


def check_exactly_once(ids_in: list, out: pa.Table, errors: pa.Table | None) -> None:
    got = out["id"].to_pylist() + ([] if errors is None else errors["id"].to_pylist())
    assert sorted(got, key=str) == sorted(ids_in, key=str)


def interrupt_after(n: int):
    """An on_result hook that raises KeyboardInterrupt once `n` shards are done."""
    done = []

    def hook(result, slot, slots):
        done.append(result.shard_id)
        if len(done) == n:
            raise KeyboardInterrupt

    return hook


def assert_private(root: Path) -> None:
    """What a job wrote under `root` (the default output.mode): dirs 0700, files 0600."""
    import stat

    found = [root, *root.rglob("*")]
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in found}
    assert len(found) > 1 and all(m == (0o700 if (root / p).is_dir() else 0o600)
                                  for p, m in modes.items()), modes  # fmt: skip


def run_processes(seconds: float = 15.0) -> list[str]:
    """The actor processes of finished runs (encoder actors, commit gates) still alive after
    waiting up to `seconds` for them to exit (Ray kills them asynchronously)."""
    import time

    deadline = time.monotonic() + seconds
    while True:
        left = []
        for proc in Path("/proc").iterdir():
            try:
                title = (proc / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if title.startswith((b"ray::EncoderActor", b"ray::CommitGate")):
                left.append(f"{proc.name} {title.decode(errors='replace')}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def clean_run(spec: dict, tmp: Path, name: str = "fresh") -> pa.Table:
    """`spec` run into a fresh output dir under tmp/name, in this process and without Ray
    (every shard through the actor's own ShardProcessor, nothing interrupted): its rows."""
    from jobs.actor import ShardProcessor
    from jobs.corpus import plan_shards
    from jobs.model import load_bundle

    fresh = tmp / name
    fresh.mkdir()
    clean = parse_spec({**spec, "output": {**spec["output"], "path": str(fresh / "out")}}, fresh)
    pool = next(p for p in clean.device_pool if p.device == "cpu")  # runs on this machine
    processor = ShardProcessor(load_bundle(clean), clean, pool)
    for shard in plan_shards(clean.corpus, clean.staging_dir(), clean.run.shard_rows):
        processor.process(shard)
    return read_out(fresh / "out")[0]


def embeddings(table: pa.Table) -> np.ndarray:
    return np.stack(table["embedding"].to_numpy(zero_copy_only=False))


def assert_equals_clean_run(out: Path, spec: dict, tmp: Path) -> pa.Table:
    """`out` must hold the same ids (each once) and vectors as a clean run of `spec`
    (`clean_run`). Returns `out`'s rows sorted by id."""
    a, b = read_out(out)[0].sort_by("id"), clean_run(spec, tmp).sort_by("id")
    assert a["id"].equals(b["id"])
    np.testing.assert_allclose(embeddings(a), embeddings(b), atol=1e-6)
    return a


def test_parquet_job_exactly_once_and_equal_to_runner(tmp_path, model_dir, ray_local, caplog):
    caplog.set_level(logging.INFO, logger="jobs")
    table = notes_table(45)
    pq.write_table(table, tmp_path / "notes.parquet", row_group_size=10)
    corpus = {"format": "parquet", "paths": [str(tmp_path / "notes.parquet")],
              "id_column": "note_id", "keep_columns": ["subject_id"]}  # fmt: skip
    report = run(job(tmp_path, model_dir, corpus), tmp_path)
    out, errors = read_out(tmp_path / "out")
    check_exactly_once(table["note_id"].to_pylist(), out, errors)
    assert errors is None and report["rows_in"] == 45 == report["rows_out"]
    assert (tmp_path / "out" / "_SUCCESS").exists()
    address = ray_local.get_runtime_context().gcs_address  # the log names the cluster joined
    assert f"Ray cluster at {address}: 1 node(s), 2 CPUs, 0 GPUs" in caplog.messages
    by_id = {i: k for i, k in zip(out["id"].to_pylist(), range(out.num_rows))}
    order = [by_id[i] for i in table["note_id"].to_pylist()]
    assert out["subject_id"].to_pylist() == [
        out["subject_id"][k].as_py() for k in range(out.num_rows)
    ]
    assert [out["subject_id"][k].as_py() for k in order] == table["subject_id"].to_pylist()
    vectors = np.stack(out["embedding"].to_numpy(zero_copy_only=False))[order]
    expected = direct_vectors(model_dir, table["text"].to_pylist())
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    meta = pq.read_schema(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).metadata
    assert meta[b"casing"] == b"cased" and meta[b"pooling"] == b"cls"
    assert meta[b"normalize"] == b"false" and meta[b"id_column"] == b"note_id"
    assert run_processes() == []  # every actor of the run, the commit gate too, has exited


def test_jsonl_csv_text_formats_with_bad_rows(tmp_path, model_dir, ray_local, capfd):
    notes = make_notes(12, seed=5, max_words=80)
    notes[1] = f'multi\nline, "quoted" note {CANARY}\n\nend'
    rows = [{"id": f"n{i}", "text": t} for i, t in enumerate(notes)]
    rows += [{"id": "null", "text": None}, {"id": "blank", "text": "   \n "}]
    rows += [{"id": "zero-tokens", "text": "\u200b\ufeff\u200b"}]  # tokenizes to nothing
    with gzip.open(tmp_path / "notes.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    csv = "ROW_ID,TEXT\n" + "".join(
        f'{i},"{t.replace(chr(34), chr(34) * 2)}"\n' for i, t in enumerate(notes)
    )
    with gzip.open(tmp_path / "notes.csv.gz", "wb") as f:
        f.write(csv.encode() + b'77,"bad \xff\xfe bytes ' + CANARY.encode() + b'"\n')
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, t in enumerate(notes[:5]):
        (tmp_path / "txt" / ("sub" if i % 2 else "") / f"note{i}.txt").write_text(t)
    (tmp_path / "txt" / "empty.txt").write_text("")
    cases = {
        "jsonl": ({"format": "jsonl", "paths": [str(tmp_path / "notes.jsonl.gz")]},
                  [r["id"] for r in rows], {"null": 1, "empty": 2}),
        "csv": ({"format": "csv", "paths": [str(tmp_path / "notes.csv.gz")],
                 "id_column": "ROW_ID", "text_column": "TEXT"},
                list(range(len(notes))) + [77], {"undecodable": 1}),
        "text": ({"format": "text", "paths": [str(tmp_path / "txt")]},
                 ["note0.txt", "sub/note1.txt", "note2.txt", "sub/note3.txt", "note4.txt",
                  "empty.txt"], {"empty": 1}),
    }  # fmt: skip
    for name, (corpus, ids, reasons) in cases.items():
        root = tmp_path / name
        root.mkdir()
        report = run(job(root, model_dir, corpus), root)
        out, errors = read_out(root / "out")
        check_exactly_once(ids, out, errors)
        assert report["errors_by_reason"] == reasons, name
        assert report["rows_in"] == report["rows_out"] + report["error_rows"]
        assert set(errors.column_names) == {"id", "shard", "row_index", "reason", "column"}
        text = json.dumps(report) + (root / "out" / "_job.json").read_text()
        assert CANARY not in text
        assert_private(root / "out")
    if "csv" in cases:  # the csv notes equal the runner's vectors on the same text
        out, _ = read_out(tmp_path / "csv" / "out")
        got = dict(zip(out["id"].to_pylist(), out["embedding"].to_pylist()))
        expected = direct_vectors(model_dir, notes)
        np.testing.assert_allclose(
            np.array([got[i] for i in range(len(notes))]), expected, atol=1e-5
        )
    captured = capfd.readouterr()
    assert CANARY not in captured.out + captured.err


def clean_and_broken(tmp_path: Path, model_dir, fmt: str, clean: str, broken: str) -> dict:
    """name -> (written rows sorted by id, errors, report) of one job per file (`where`
    cat == d), each output checked by verify."""
    from jobs.verify import verify_output

    outs = {}
    for name, data in (("clean", clean), ("broken", broken)):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"notes.{fmt}").write_text(data)
        corpus = {"format": fmt, "paths": [str(tmp_path / name / f"notes.{fmt}")],
                  "where": {"cat": "d"}}  # fmt: skip
        report = run(job(tmp_path / name, model_dir, corpus), tmp_path / name)
        out, errors = read_out(tmp_path / name / "out")
        outs[name] = (out.sort_by("id"), errors, report)
        assert verify_output(str(tmp_path / name / "out")) == []
    return outs


def test_broken_jsonl_lines_are_error_rows_and_the_rest_is_the_clean_output(
    tmp_path, model_dir, ray_local, capfd
):
    """A JSONL export with a few broken lines: each is an error row (`not_json`, `not_text`;
    never filtered away by `where`), every other row is written exactly as from the same
    file without them, and no value of a broken line appears anywhere."""

    notes = make_notes(10, seed=7, max_words=60)
    rows = [{"id": i, "text": t, "cat": "d" if i % 3 else "n"} for i, t in enumerate(notes)]
    clean = "".join(json.dumps(r) + "\n" for r in rows)
    broken = (
        clean
        + f'{{"id": 50, "text": "{CANARY} cut off mid-wr\n'  # not JSON
        + json.dumps({"id": 51, "text": 7, "cat": "n"})
        + "\n"  # a number as text
        + json.dumps({"id": f"{CANARY}", "text": "x", "cat": "d"})
        + "\n"  # a string id
    )
    outs = clean_and_broken(tmp_path, model_dir, "jsonl", clean, broken)
    out, errors, report = outs["broken"]
    assert report["errors_by_reason"] == {"not_json": 2, "not_text": 1}
    assert report["rows_in"] == 13 and report["filtered_rows"] == outs["clean"][2]["filtered_rows"]
    assert sorted(errors["reason"].to_pylist()) == ["not_json", "not_json", "not_text"]
    # lines 11-13 are the second shard's (shard_rows 10) rows 0-2, in the staged file's order
    assert errors.sort_by("row_index")["row_index"].to_pylist() == [0, 1, 2]
    assert len(set(errors["shard"].to_pylist())) == 1
    assert out.equals(outs["clean"][0])  # the good rows: as from the clean file
    text = (tmp_path / "broken" / "out" / "_report.json").read_text() + str(errors.to_pylist())
    captured = capfd.readouterr()
    assert CANARY not in text + captured.out + captured.err


def test_ragged_csv_rows_are_error_rows_and_the_rest_is_the_clean_output(
    tmp_path, model_dir, ray_local, capfd
):
    """A CSV export with ragged rows (more or fewer fields than the header): each is an error
    row `not_csv`, never filtered by `where`; every other row is written as from the file
    without them; no value of a ragged row appears anywhere."""
    import csv
    import io

    notes = make_notes(10, seed=8, max_words=60)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "text", "cat"])
    writer.writerows([i, t, "d" if i % 3 else "n"] for i, t in enumerate(notes))
    clean = buffer.getvalue()
    broken = clean + f"50,{CANARY},d,extra\n51\n" + f'52,"{CANARY}, a quoted comma",d\n'
    outs = clean_and_broken(tmp_path, model_dir, "csv", clean, broken)
    out, errors, report = outs["broken"]
    assert report["errors_by_reason"] == {"not_csv": 2}
    assert report["rows_in"] == 13 and report["rows_out"] == outs["clean"][2]["rows_out"] + 1
    assert errors["id"].to_pylist() == [None, None]
    assert out.filter(pc.not_equal(out["id"], 52)).sort_by("id").equals(outs["clean"][0])
    text = (tmp_path / "broken" / "out" / "_report.json").read_text() + str(errors.to_pylist())
    captured = capfd.readouterr()
    assert CANARY not in text + captured.out + captured.err


def test_two_pools_share_the_shards_exactly_once(tmp_path, model_dir, ray_local, slowdown):
    """Two pools, one slowed down: every shard runs once, on one of them, and both take part.
    How shards split by speed is tested without Ray (test_dispatch.py), deterministically."""
    table, corpus = parquet_corpus(tmp_path, 80)
    pools = [
        {"name": "fast", "device": "cpu", "actors": 1, "precision": "fp32", "batch_tokens": 1024},
        {"name": "slow", "device": "cpu", "actors": 1, "precision": "fp32", "batch_tokens": 1024},
    ]
    slowdown({"slow": 0.3})
    spec = job(
        tmp_path, model_dir, corpus, device_pool=pools, run={"shard_rows": 5, "batch_rows": 5}
    )
    report = run(spec, tmp_path)
    out, errors = read_out(tmp_path / "out")
    check_exactly_once(table["note_id"].to_pylist(), out, errors)
    shards = {k: v["shards"] for k, v in report["per_pool"].items()}
    assert shards["fast"] + shards["slow"] == 16 and shards["fast"] >= 1 and shards["slow"] >= 1


def test_each_actor_records_the_precision_it_ran(tmp_path, model_dir, ray_local):
    table, corpus = parquet_corpus(tmp_path, 30)
    pools = [
        {"name": "f", "device": "cpu", "actors": 1, "precision": "fp32", "batch_tokens": 1024},
        {"name": "q", "device": "cpu", "actors": 1, "precision": "auto", "allow_int8": True,
         "batch_tokens": 1024},
    ]  # fmt: skip
    spec = job(tmp_path, model_dir, corpus, device_pool=pools, run={"shard_rows": 5})
    report = run(spec, tmp_path)
    want = {"f": "fp32", "q": "int8"}
    for name, pool in report["per_pool"].items():
        assert pool["precisions"] == ([want[name]] if pool["shards"] else [])
    for actor in report["per_actor"].values():
        assert actor["precision"] == want[actor["pool"]]
    expected = direct_vectors(model_dir, table["text"].to_pylist())
    index = {i: k for k, i in enumerate(table["note_id"].to_pylist())}
    by_part: dict[str, int] = {}
    for part in sorted((tmp_path / "out").glob("part-*.parquet")):
        meta = pq.read_metadata(part).metadata
        stats = json.loads(meta[b"clinicalbert_shard_stats"])
        assert meta[b"precision"].decode() == stats["precision"] == want[stats["pool"]]
        rows = pq.read_table(part)
        got = np.stack(rows["embedding"].to_numpy(zero_copy_only=False))
        ref = expected[[index[i] for i in rows["id"].to_pylist()]]
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > (0.999999 if stats["precision"] == "fp32" else 0.99), cos.min()
        by_part[stats["precision"]] = by_part.get(stats["precision"], 0) + rows.num_rows
    assert report["notes_by_precision"] == by_part and sum(by_part.values()) == 30
    again = run(spec, tmp_path)  # every shard committed: the earlier parts are counted the same
    assert again["shards"]["processed"] == 0 and again["notes_by_precision"] == by_part


def test_killed_actor_job_completes_exactly_once(tmp_path, model_dir, ray_local):
    import ray

    table, corpus = parquet_corpus(tmp_path, 60)
    killed = []

    def kill_one(result, slot, slots):
        if not killed:
            victim = next(s for s in slots if s is not slot)
            killed.append(victim.name)
            ray.kill(victim.handle)

    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
    report = run(spec, tmp_path, on_result=kill_one)
    out, errors = read_out(tmp_path / "out")
    check_exactly_once(table["note_id"].to_pylist(), out, errors)
    assert killed and report["actor_restarts"] >= 1
    assert not report["shards"]["failed"]


def test_interrupted_driver_resumes_to_the_same_output(tmp_path, model_dir, ray_local):
    table, corpus = parquet_corpus(tmp_path, 50)
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
    with pytest.raises(KeyboardInterrupt) as stopped:
        run(spec, tmp_path, on_result=interrupt_after(3))
    assert run_processes() == [], stopped  # though `stopped` still holds the run's frames
    committed = len(list((tmp_path / "out").glob("part-*.parquet")))
    assert 3 <= committed < 10 and not (tmp_path / "out" / "_SUCCESS").exists()
    partial = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert partial["interrupted"] is True and 3 <= partial["shards"]["processed"] <= committed
    assert partial["rows_in"] == partial["rows_out"] + partial["error_rows"]
    report = run(spec, tmp_path)
    assert not list((tmp_path / "out").glob(".tmp-*"))  # killed attempts' temp files removed
    assert report["shards"]["committed_before"] == committed
    assert report["shards"]["processed"] == 10 - committed
    assert_equals_clean_run(tmp_path / "out", spec, tmp_path)


def test_other_spec_into_same_output_is_refused(tmp_path, model_dir, ray_local, caplog):
    table, corpus = parquet_corpus(tmp_path, 10, 10)
    with caplog.at_level(logging.WARNING, logger="jobs.driver"):
        run(job(tmp_path, model_dir, corpus), tmp_path)
    assert "the plan has 1 shard for 2 actors: 1 of them would sit idle" in caplog.text
    other = job(tmp_path, model_dir, corpus, heads={"pooling": "mean"})
    with pytest.raises(ValueError, match="overwrite"):
        run(other, tmp_path)
    report = run(other, tmp_path, overwrite=True)
    assert report["rows_out"] == 10


def test_windows_not_aggregated_and_mlm_rows(tmp_path, model_dir, ray_local):
    notes = ["Pt was started on [MASK] for afib. " * 12, "Pt is a 67 yo M [MASK] hx of chf."]
    table = pa.table({"note_id": ["a", "b"], "text": notes})
    pq.write_table(table, tmp_path / "notes.parquet")
    corpus = {
        "format": "parquet",
        "paths": [str(tmp_path / "notes.parquet")],
        "id_column": "note_id",
    }
    spec = job(tmp_path, model_dir, corpus,
               model={"long_notes": {"strategy": "windows", "stride": 16, "aggregate": "none"}},
               heads={"pooling": "cls", "mlm": {"enabled": True, "top_k": 3}})  # fmt: skip
    run(spec, tmp_path)
    out, _ = read_out(tmp_path / "out")
    rows_a = [r for r in out.to_pylist() if r["id"] == "a"]
    assert len(rows_a) > 1 and [r["window_index"] for r in rows_a] == list(range(len(rows_a)))
    for r in out.to_pylist():
        note = notes[0] if r["id"] == "a" else notes[1]
        assert 0 <= r["char_start"] < r["char_end"] <= len(note)
        for c, ids, lps in zip(r["mlm_char_start"], r["mlm_top_ids"], r["mlm_top_logprobs"]):
            assert note[c : c + 6] == "[MASK]"
            assert len(ids) == 3 and lps == sorted(lps, reverse=True)
    masks = sum(len(r["mlm_position"]) for r in out.to_pylist())
    assert masks >= 13  # every [MASK] in every window (overlaps count once per window)


def test_planning_says_how_far_it_is(ray_local, caplog):
    """Staging a large CSV takes minutes: while inputs are read or staged, a line per interval
    (here one input of two is done, the other sleeps 2 s)."""
    import time

    from jobs.launch import ray_map

    with caplog.at_level(logging.INFO, logger="jobs.launch"):
        assert ray_map(time.sleep, [0, 2.0], every_s=0.5) == [None, None]
    lines = [r.getMessage() for r in caplog.records if r.message.startswith("planning: ")]
    assert lines and all(re.fullmatch(r"planning: [01] of 2 inputs read or staged, elapsed "
                                      r"0m0\ds", line) for line in lines), lines  # fmt: skip
    assert lines[-1].startswith("planning: 1 of 2 "), lines  # the sleeping one is left


def test_dry_run_keeps_the_pools_this_machine_can_run():
    from jobs.dry_run import scale_pools
    from jobs.spec import PoolSpec

    pools = (PoolSpec(name="gpu", device="cuda", actors=4),
             PoolSpec(name="mac", device="mps", actors=2),
             PoolSpec(name="cpu", device="cpu", actors=4, cpus_per_actor=8))  # fmt: skip
    here = scale_pools(pools, cpus=4, gpus=0)  # no GPU, no Apple GPU: the CPU pool, shrunk
    assert [(p.name, p.actors, p.cpus_per_actor) for p in here] == [("cpu", 1, 3)]
    mac = scale_pools(pools, cpus=8, gpus=0, mps=True)
    assert [p.name for p in mac] == ["mac", "cpu"]
    assert [p.name for p in scale_pools(pools, cpus=8, gpus=1)] == ["gpu", "cpu"]


def test_dry_run_prints_estimates(tmp_path, model_dir, ray_local, capsys, monkeypatch):
    import jobs.driver
    import jobs.preflight
    from jobs.dispatch import fmt_duration
    from jobs.dry_run import print_dry_run

    table, corpus = parquet_corpus(tmp_path, 40, 10)
    spec = job(tmp_path, model_dir, corpus, run={"dry_run_notes": 15, "shard_rows": 10})
    plans = []
    plan = jobs.driver.plan_shards
    for module in (jobs.driver, jobs.preflight):  # wherever a dry run could plan
        monkeypatch.setattr(module, "plan_shards", lambda *a, **k: plans.append(1) or plan(*a, **k))
    report = dry_run(spec, tmp_path)
    assert plans == [1]  # the corpus is planned once: the sample is taken from that plan
    d = report["dry_run"]
    assert d["sampled_notes"] == 15 and d["corpus_rows"] == 40
    assert d["token_length"]["max"] >= d["token_length"]["p95"] >= d["token_length"]["p50"] > 0
    assert d["projection"]["cpu"]["hours_alone"] > 0
    capsys.readouterr()
    print_dry_run(report)
    printed = capsys.readouterr().out
    assert "full corpus: 40 rows" in printed and "4 shards" in printed and "15 notes" in printed
    assert d["idle_actors"] is None and "warning" not in printed  # 4 shards for 2 actors
    alone = fmt_duration(d["projection"]["cpu"]["hours_alone"] * 3600)
    assert f"{alone} alone" in printed and "0.00 h" not in printed
    assert d["projection"]["cpu"]["precisions"] == ["fp32"] and "pool cpu (fp32): ~" in printed
    assert [fmt_duration(s) for s in (42, 1050, 11700)] == ["0m42s", "17m30s", "3h15m"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("part-*"))


def test_encoder_predictor_plain_and_in_ray_data(model_dir, ray_local):
    import ray

    from jobs import EncoderPredictor

    notes = make_notes(9, seed=11, max_words=120)
    notes[4] = None
    notes[6] = "\ufeff\u200b"  # no token at all: an error row, never a vector
    opts = {"model": str(model_dir), "precision": "fp32", "max_seq": 64, "long_notes": "windows",
            "stride": 16, "batch_tokens": 1024}  # fmt: skip
    plain = EncoderPredictor(**opts)({"k": np.arange(9), "text": np.array(notes, dtype=object)})
    assert plain.column_names == ["k", "embedding", "error", "model"]  # no note text
    assert plain.schema.field("embedding").type == pa.list_(pa.float32(), 32)
    assert plain.schema.field("error").type == pa.string()
    errors = plain["error"].to_pylist()
    assert errors == [None] * 4 + ["null", None, "empty", None, None]
    embedding = plain["embedding"].to_pylist()
    assert embedding[4] is None and embedding[6] is None
    assert plain.schema.metadata[b"weights_sha256"] == plain["model"][0].as_py().encode()
    good = [n for i, n in enumerate(notes) if i not in (4, 6)]
    expected = direct_vectors(model_dir, good)
    got = np.array([v for v in embedding if v is not None], np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    kept = EncoderPredictor(**opts, keep_text=True)({"text": np.array(notes[:2], dtype=object)})
    assert kept["text"].to_pylist() == notes[:2]

    ds = ray.data.from_items([{"k": i, "text": t} for i, t in enumerate(notes)])
    ds = ds.map_batches(EncoderPredictor, fn_constructor_kwargs=opts,
                        compute=ray.data.ActorPoolStrategy(size=1), batch_size=4)  # fmt: skip
    rows = sorted(ds.take_all(), key=lambda r: r["k"])
    assert [r["error"] for r in rows] == errors and "text" not in rows[0]
    got = np.stack([r["embedding"] for r in rows if r["error"] is None])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_readme_ray_data_snippet_runs_as_written(tmp_path, ray_local, monkeypatch):
    """The README's Ray Data block, executed verbatim on the demo corpus and model."""
    import re

    from jobs.cli import main

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- ray-data-snippet -->\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    assert main(["demo-data", "--out", "out/demo", "--notes", "12", "--hidden", "32"]) == 0
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    out = pq.read_table("out/demo/embedded")
    assert out.num_rows == 12 and "text" not in out.column_names
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 32)


@pytest.fixture(scope="module")
def modernbert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from jobs.synthetic import make_modernbert

    root = tmp_path_factory.mktemp("modernbert")
    raw = make_modernbert(root / "raw", hidden=32, layers=4, heads=4, local_attention=16)
    return prepare(raw, root / "prepared", variant="custom")


def test_modernbert_job_with_mlm_resumes_to_the_same_output(tmp_path, modernbert_dir, ray_local):
    table, corpus = parquet_corpus(tmp_path, 30)
    notes = table["text"].to_pylist()
    notes[2] = notes[2] + " Pt was started on [MASK] for afib."
    table = table.set_column(2, "text", pa.array(notes))
    pq.write_table(table, tmp_path / "notes.parquet", row_group_size=5)
    over = {
        "model": {"max_seq": 256, "long_notes": {"strategy": "windows", "stride": 32,
                                                  "aggregate": "mean"}},
        "heads": {"pooling": None, "mlm": {"enabled": True, "top_k": 3}},
        "run": {"shard_rows": 5, "batch_rows": 5},
    }  # fmt: skip
    spec = job(tmp_path, modernbert_dir, corpus, **over)
    spec["device_pool"][0]["batch_tokens"] = 2048
    with pytest.raises(KeyboardInterrupt):
        run(spec, tmp_path, on_result=interrupt_after(2))
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    report = run(spec, tmp_path)
    assert report["shards"]["committed_before"] >= 2 and report["rows_out"] == 30
    a = assert_equals_clean_run(tmp_path / "out", spec, tmp_path)
    check_exactly_once(table["note_id"].to_pylist(), a, None)
    b, _ = read_out(tmp_path / "fresh" / "out")
    assert a["mlm_top_ids"].equals(b.sort_by("id")["mlm_top_ids"])
    vectors = np.stack(a["embedding"].to_numpy(zero_copy_only=False))
    runner = ClinicalBertRunner.load(modernbert_dir, precision="fp32", max_seq=256,
                                     long_notes="windows", stride=32, batch_tokens=2048)  # fmt: skip
    order = np.argsort(table["note_id"].to_numpy())
    expected = runner.encode([notes[i] for i in order], return_hidden=False).pooled.numpy()
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    row = a.to_pylist()[2]
    assert row["mlm_char_start"] and all(len(ids) == 3 for ids in row["mlm_top_ids"])
    note = notes[2]
    assert all(note[c : c + 6] == "[MASK]" for c in row["mlm_char_start"])
    meta = pq.read_schema(sorted((tmp_path / "out").glob("part-*.parquet"))[0]).metadata
    assert meta[b"architecture"] == b"modernbert" and meta[b"tokenizer"] == b"BPE"
    assert meta[b"pooling"] == b"mean" and meta[b"casing"] == b"cased"
    identity = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert "modernbert" in json.dumps(identity) and "BPE" in json.dumps(identity)


def test_spec_mistakes_against_the_model_are_refused_before_ray(
    tmp_path, model_dir, modernbert_dir, ray_local
):
    from jobs.spec import SpecError

    table, corpus = parquet_corpus(tmp_path, 10, 10)
    too_long = job(tmp_path, model_dir, corpus, model={"max_seq": 256})
    with pytest.raises(SpecError, match="model.max_seq: 256 exceeds the model's max_position"):
        run(too_long, tmp_path)
    no_pooler = job(tmp_path, modernbert_dir, corpus, heads={"pooling": "pooler"})
    with pytest.raises(SpecError, match="heads.pooling: 'pooler' needs trained pooler weights"):
        run(no_pooler, tmp_path)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    # no vectors asked for: the pooler is never needed, the MLM rows are written
    only_mlm = job(tmp_path, modernbert_dir, corpus, model={"max_seq": 512},
                   heads={"pooling": "pooler", "embeddings": False, "mlm": {"enabled": True}})  # fmt: skip
    report = run(only_mlm, tmp_path)
    out, _ = read_out(tmp_path / "out")
    assert report["rows_out"] == 10 and "embedding" not in out.column_names
    assert "mlm_top_ids" in out.column_names


def test_standard_readers_get_exactly_the_vectors_and_no_text_under_output(
    tmp_path, model_dir, ray_local, capfd
):
    import duckdb
    import pandas as pd
    import polars as pl
    import pyarrow.dataset as ds

    notes = make_notes(14, seed=21, max_words=60)
    notes = [f"{t} {CANARY}" for t in notes]
    lines = [f'{i},"{t}"' for i, t in enumerate(notes)]
    lines += ["100,", f'101,"{"x " * 3000} {CANARY}"', f'102,"\\u200b {CANARY}"']
    with gzip.open(tmp_path / "notes.csv.gz", "wb") as f:
        f.write(("ROW_ID,TEXT\n" + "\n".join(lines) + "\n").encode())
        f.write(b'103,"bad \xff bytes ' + CANARY.encode() + b'"\n')
    corpus = {"format": "csv", "paths": [str(tmp_path / "notes.csv.gz")],
              "id_column": "ROW_ID", "text_column": "TEXT"}  # fmt: skip
    out_dir = tmp_path / "out"
    staging = tmp_path / "out.staging"
    staging.mkdir()  # a staging run killed earlier left a partial copy of the notes
    (staging / f".tmp-notes-x.parquet-{'0' * 32}").write_text(CANARY)
    report = run(job(tmp_path, model_dir, corpus, run={"max_note_chars": 5000}), tmp_path)
    assert report["errors_by_reason"] == {"null": 1, "too_long": 1, "undecodable": 1}
    assert report["rows_out"] == 15 and not staging.exists()  # staged copy removed on success

    expected = sorted(read_out(out_dir)[0]["id"].to_pylist())
    readers = {
        "pandas": lambda: pd.read_parquet(out_dir)["id"].tolist(),
        "pyarrow": lambda: pq.read_table(out_dir)["id"].to_pylist(),
        "dataset": lambda: ds.dataset(out_dir, format="parquet").to_table()["id"].to_pylist(),
        "polars": lambda: pl.read_parquet(f"{out_dir}/part-*.parquet")["id"].to_list(),
        "polars scan": lambda: pl.scan_parquet(f"{out_dir}/part-*.parquet").collect()["id"]
        .to_list(),
        "duckdb": lambda: [
            r[0] for r in duckdb.sql(f"SELECT id FROM '{out_dir}/part-*.parquet'").fetchall()
        ],
    }  # fmt: skip
    for name, read in readers.items():
        assert sorted(read()) == expected, name
    frame = pd.read_parquet(out_dir)
    assert len(frame["embedding"].iloc[0]) == 32 and set(frame.columns) >= {"id", "n_tokens"}

    session = Path(ray_local._private.worker._global_node.get_session_dir_path())
    searched = [p for p in out_dir.rglob("*") if p.is_file()] + [
        p for p in (session / "logs").rglob("*") if p.is_file()
    ]
    assert any(p.name == "_report.json" for p in searched)
    for path in searched:
        assert CANARY.encode() not in path.read_bytes(), path
    captured = capfd.readouterr()
    assert CANARY not in captured.out + captured.err


def test_verify_finds_what_is_wrong_with_an_output(tmp_path, model_dir, ray_local, capsys):
    import shutil

    from jobs.cli import main
    from jobs.verify import verify_output

    table = notes_table(20)
    texts = table["text"].to_pylist()
    texts[3] = None
    table = table.set_column(2, "text", pa.array(texts))
    pq.write_table(table, tmp_path / "notes.parquet", row_group_size=5)
    corpus = {"format": "parquet", "paths": [str(tmp_path / "notes.parquet")],
              "id_column": "note_id"}  # fmt: skip
    run(job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5}), tmp_path)
    out = tmp_path / "out"
    assert verify_output(str(out)) == []
    assert main(["verify", str(out)]) == 0 and "ok" in capsys.readouterr().out

    parts = sorted(out.glob("part-*.parquet"))
    extra = out / "part-0000extra.parquet"
    shutil.copy(parts[0], extra)  # a part written twice
    text = "\n".join(verify_output(str(out)))
    assert "part-0000extra.parquet: footer names shard" in text
    dupes = pq.read_table(parts[0]).num_rows
    assert f"{dupes} ids written more than once" in text
    assert "_report.json: rows_in 20, the parts' footers sum to 25" in text
    extra.unlink()

    footer = pq.ParquetFile(parts[1]).metadata.metadata  # a part that lost a row
    pq.write_table(pq.read_table(parts[1]).slice(1).replace_schema_metadata(footer), parts[1])
    (out / "_SUCCESS").unlink()
    findings = verify_output(str(out))
    rows = pq.read_table(parts[1]).num_rows
    assert f"{parts[1].name}: {rows} rows, its footer says {rows + 1}" in findings

    part = pq.read_table(parts[2])  # a vector with a NaN in it, the row count intact
    vectors = np.stack(part["embedding"].to_numpy(zero_copy_only=False))
    vectors[1, 0] = np.nan
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])
    footer = pq.ParquetFile(parts[2]).metadata.metadata
    part = part.set_column(part.schema.get_field_index("embedding"), "embedding", embedding)
    pq.write_table(part.replace_schema_metadata(footer), parts[2])
    nan_id = part["id"][1].as_py()
    findings = verify_output(str(out))
    assert f"{parts[2].name}: 1 rows with null, NaN or inf in embedding, e.g. id {nan_id!r}" in (
        findings
    )
    assert "_SUCCESS is missing: the job did not finish every shard" in findings
    assert main(["verify", str(out)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == len(findings) and CANARY not in "\n".join(lines)


def test_text_in_any_arrow_layout_is_text(tmp_path, model_dir, ray_local):
    """A dictionary-encoded text column (pandas' category, as Parquet keeps it) is read as
    its strings: the same vectors as plain strings, no row an error; views likewise."""
    from jobs.actor import classify

    table = notes_table(12)
    pq.write_table(table, tmp_path / "plain.parquet")
    coded = table.set_column(2, "text", table["text"].dictionary_encode())
    coded = coded.set_column(1, "subject_id", coded["subject_id"].dictionary_encode())
    pq.write_table(coded, tmp_path / "coded.parquet")
    assert pa.types.is_dictionary(pq.read_schema(tmp_path / "coded.parquet").field("text").type)
    corpus = {"format": "parquet", "paths": [str(tmp_path / "plain.parquet")],
              "id_column": "note_id", "keep_columns": ["subject_id"]}  # fmt: skip
    plain = clean_run(job(tmp_path, model_dir, corpus), tmp_path, "plain").sort_by("id")
    corpus["paths"] = [str(tmp_path / "coded.parquet")]
    coded = clean_run(job(tmp_path, model_dir, corpus), tmp_path, "coded").sort_by("id")
    assert coded.schema.field("subject_id").type == pa.int64()  # its values' type
    assert coded["id"].equals(plain["id"]) and coded.num_rows == 12
    np.testing.assert_array_equal(embeddings(coded), embeddings(plain))
    more = notes_table(12, seed=1).set_column(0, "note_id", pa.array(range(300, 312)))
    pq.write_table(more, tmp_path / "more.parquet")  # plain, beside the coded file: one type
    corpus["paths"] = [str(tmp_path / "coded.parquet"), str(tmp_path / "more.parquet")]
    spec = job(tmp_path, model_dir, corpus, output={"path": str(tmp_path / "both")})
    report = run(spec, tmp_path)  # and through Ray, the coded file beside a plain one
    assert report["rows_out"] == 24 and report["error_rows"] == 0
    assert_equals_clean_run(tmp_path / "both", spec, tmp_path)
    texts = table["text"].combine_chunks()
    for layout in (texts.dictionary_encode(), texts.cast(pa.string_view()),
                   texts.cast(pa.large_string()), texts.cast(pa.binary_view())):  # fmt: skip
        notes, reasons = classify(layout, table["note_id"].combine_chunks(), 10**6)
        assert reasons == [None] * 12 and notes == texts.to_pylist(), layout.type


def test_nan_and_blank_ids_are_null_ids_and_wrong_column_types_refused(
    tmp_path, model_dir, ray_local
):
    """pandas writes an int id column with gaps as float64 with NaN: a NaN id is a null id
    (an error row, never a written row nor a repeated id), as is a text id that is empty or
    only whitespace (a quoted "" in a CSV); an id column of a nested type, or a text column
    that holds no text (an int64 column named as corpus.text_column), is refused before any
    work, naming the field and the file."""
    from jobs.preflight import check_plan
    from jobs.spec import SpecError
    from jobs.verify import verify_output

    table = notes_table(10)
    ids = [
        float("nan") if i in (3, 6) else float(v)
        for i, v in enumerate(table["note_id"].to_pylist())
    ]
    pq.write_table(table.set_column(0, "note_id", pa.array(ids)), tmp_path / "floats.parquet")
    corpus = {"format": "parquet", "paths": [str(tmp_path / "floats.parquet")],
              "id_column": "note_id"}  # fmt: skip
    spec = job(tmp_path, model_dir, corpus)
    assert check_plan(parse_spec(spec, tmp_path)) == []  # two NaNs are no repeated id
    report = run(spec, tmp_path)
    assert report["rows_out"] == 8 and report["error_rows"] == 2, report
    written, errs = read_out(tmp_path / "out")
    assert sorted(written["id"].to_pylist()) == sorted(v for v in ids if v == v)
    assert errs["reason"].to_pylist() == ["null_id"] * 2
    assert sorted(errs["row_index"].to_pylist()) == [3, 6]
    assert verify_output(str(tmp_path / "out")) == []

    nested = pa.array([{"mrn": i} for i in range(10)])
    pq.write_table(table.set_column(0, "note_id", nested), tmp_path / "nested.parquet")
    corpus["paths"] = [str(tmp_path / "nested.parquet")]
    spec = job(tmp_path, model_dir, corpus, output={"path": str(tmp_path / "nested")})
    (problem,) = check_plan(parse_spec(spec, tmp_path))
    assert (
        "nested.parquet: its id column 'note_id' (corpus.id_column) is struct<mrn: int64>"
        in problem
    )
    with pytest.raises((SpecError, ValueError), match=r"\(corpus.id_column\) is struct"):
        run(spec, tmp_path)
    assert not (tmp_path / "nested").exists() or not list((tmp_path / "nested").glob("part-*"))

    pq.write_table(table.set_column(2, "text", table["subject_id"]), tmp_path / "ints.parquet")
    corpus["paths"] = [str(tmp_path / "ints.parquet")]
    spec = job(tmp_path, model_dir, corpus, output={"path": str(tmp_path / "ints")})
    (problem,) = check_plan(parse_spec(spec, tmp_path))
    assert "ints.parquet: its text column 'text' (corpus.text_column) is int64, not text" in problem
    with pytest.raises((SpecError, ValueError), match=r"\(corpus.text_column\) is int64"):
        run(spec, tmp_path)

    notes = table["text"].to_pylist()
    ids = ["n0", '""', "n2", '"  "', "n4", '""', "n6", "n7"]
    lines = ["note_id,text", *(f'{i},"{t}"' for i, t in zip(ids, notes))]
    (tmp_path / "blank.csv").write_text("\n".join(lines) + "\n")
    corpus = {"format": "csv", "paths": [str(tmp_path / "blank.csv")], "id_column": "note_id"}
    spec = job(tmp_path, model_dir, corpus, output={"path": str(tmp_path / "blank")})
    assert check_plan(parse_spec(spec, tmp_path)) == []  # two "" ids are no repeated id
    report = run(spec, tmp_path)
    assert report["rows_out"] == 5 and report["error_rows"] == 3, report
    written, errs = read_out(tmp_path / "blank")
    assert sorted(written["id"].to_pylist()) == ["n0", "n2", "n4", "n6", "n7"]
    assert errs["reason"].to_pylist() == ["null_id"] * 3
    assert sorted(errs["row_index"].to_pylist()) == [1, 3, 5]
    assert verify_output(str(tmp_path / "blank")) == []


def test_repeated_ids_are_refused_by_name_unless_allowed(tmp_path, model_dir, ray_local):
    """An id on several rows: refused before any encoding (column, counts, one id, the
    file); allowed, every row is written once (here one window per row), the report counts
    the repeats and `verify` finds the output whole, and a part written twice still found."""
    import shutil

    from jobs.spec import SpecError
    from jobs.verify import verify_output

    table = notes_table(20)
    ids, texts = table["note_id"].to_pylist(), table["text"].to_pylist()
    ids[5] = ids[15] = ids[0]  # id 100 on three rows
    ids[7] = ids[1]  # id 101 on two
    texts[15] = None  # one repeat is an error row
    table = table.set_column(0, "note_id", pa.array(ids, pa.int64()))
    table = table.set_column(2, "text", pa.array(texts))
    pq.write_table(table, tmp_path / "notes.parquet", row_group_size=5)
    corpus = {"format": "parquet", "paths": [str(tmp_path / "notes.parquet")],
              "id_column": "note_id"}  # fmt: skip
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 5, "batch_rows": 5})
    with pytest.raises(SpecError) as e:
        run(spec, tmp_path)
    msg = str(e.value)
    assert "corpus.id_column: 'note_id' is not unique: 2 ids are on more than one row" in msg
    assert "(3 extra rows; e.g. 100 in " in msg and "notes.parquet" in msg
    assert "run.allow_duplicate_ids: true" in msg and not list((tmp_path / "out").glob("part-*"))

    spec["run"]["allow_duplicate_ids"] = True
    spec["model"]["long_notes"] = {"strategy": "windows", "stride": 16, "aggregate": "none"}
    report = run(spec, tmp_path)
    assert report["rows_in"] == 20 and report["rows_out"] == 19 and report["error_rows"] == 1
    assert report["repeated_ids"] == {"ids": 2, "extra_rows": 3}
    out = tmp_path / "out"
    written, _ = read_out(out)
    firsts = pc.equal(written["window_index"], 0)
    assert sorted(written.filter(firsts)["id"].to_pylist()).count(100) == 2  # + its error row
    assert verify_output(str(out)) == []
    parts = sorted(out.glob("part-*.parquet"))
    shutil.copy(parts[0], out / "part-0000extra.parquet")  # a part written twice
    extra = pq.read_table(parts[0]).filter(pc.equal(pq.read_table(parts[0])["window_index"], 0))
    findings = verify_output(str(out))
    assert f"{3 + extra.num_rows} rows repeat an id, the report says the input repeats 3" in (
        findings
    )


def test_empty_where_ends_non_zero_and_spec_changes_after_a_failed_start(
    tmp_path, model_dir, ray_local
):
    table, corpus = parquet_corpus(tmp_path, 10, 10)
    nothing = job(tmp_path, model_dir, corpus | {"where": {"subject_id": -1}})
    report = run(nothing, tmp_path)
    assert report["rows_in"] == 10 == report["filtered_rows"] and "wrote no note" in report["empty"]
    assert not (tmp_path / "out" / "_SUCCESS").exists()
    allowed = job(tmp_path, model_dir, corpus | {"where": {"subject_id": -1}},
                  run={"allow_empty": True})  # fmt: skip
    assert "empty" not in run(allowed, tmp_path)

    # a start that committed nothing (a bad spec) does not block the corrected one
    from jobs.spec import SpecError

    second = tmp_path / "second"
    second.mkdir()
    failing = job(second, model_dir, corpus, device_pool=[
        {"name": "cpu", "device": "cpu", "actors": 1, "cpus_per_actor": 64}])  # fmt: skip
    with pytest.raises(SpecError, match=r"device_pool\[0\] \(cpu\): one actor needs 64 CPU"):
        run(failing, second)
    fixed = job(second, model_dir, corpus, heads={"pooling": "mean"})
    assert run(fixed, second)["rows_out"] == 10
    before = {p.name: p.stat().st_mtime_ns for p in (second / "out").glob("part-*")}
    assert run(fixed, second)["shards"]["processed"] == 0  # resumed: nothing to do
    report = run(fixed, second, overwrite=True)  # --overwrite recomputes
    assert report["shards"]["processed"] == 1 and report["shards"]["committed_before"] == 0
    after = {p.name: p.stat().st_mtime_ns for p in (second / "out").glob("part-*")}
    assert before.keys() == after.keys() and before != after


def test_id_type_drift_is_refused_by_name_and_added_files_run_alone(
    tmp_path, model_dir, ray_local, capsys
):
    a = notes_table(10)
    pq.write_table(a, tmp_path / "a.parquet", row_group_size=5)
    b = notes_table(6, seed=1)
    b = b.set_column(0, "note_id", pa.array([f"n{i}" for i in range(6)]))
    pq.write_table(b, tmp_path / "b.parquet")
    corpus = {"format": "parquet", "paths": [str(tmp_path / "*.parquet")], "id_column": "note_id"}
    with pytest.raises(ValueError, match=r"'note_id' is int64 in .*a.parquet but string in .*b"):
        run(job(tmp_path, model_dir, corpus), tmp_path)
    from jobs.cli import main  # validate finds it too, before any run

    (tmp_path / "job.yaml").write_text(json.dumps(job(tmp_path, model_dir, corpus)))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 2
    assert "job.yaml: corpus: column 'note_id' is int64 in " in capsys.readouterr().err
    (tmp_path / "b.parquet").unlink()
    first = run(job(tmp_path, model_dir, corpus), tmp_path)
    assert first["shards"]["processed"] == 1
    c = notes_table(7, seed=2).set_column(0, "note_id", pa.array(range(500, 507)))
    pq.write_table(c, tmp_path / "c.parquet")  # the archive grew: a new file
    second = run(job(tmp_path, model_dir, corpus), tmp_path)
    assert second["shards"] == {"total": 2, "committed_before": 1, "processed": 1, "failed": []}
    assert second["rows_out"] == 17
    assert_equals_clean_run(tmp_path / "out", job(tmp_path, model_dir, corpus), tmp_path)


def test_progress_moves_inside_a_long_shard(tmp_path, model_dir, ray_local, slowdown, capfd):
    import re

    table, corpus = parquet_corpus(tmp_path, 40, 40)
    slowdown({"lag": 0.4})  # only this test's pool
    spec = job(tmp_path, model_dir, corpus, run={"shard_rows": 40, "batch_rows": 4,
                                                 "progress_interval_s": 0.5})  # fmt: skip
    spec["device_pool"][0] |= {"name": "lag", "actors": 1}
    report = run(spec, tmp_path)
    assert report["rows_out"] == 40
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.startswith("progress:")]
    inside = [ln for ln in lines if "shards 0/1" in ln]
    counts = [int(re.match(r"progress: (\d+)/", ln).group(1)) for ln in inside]
    assert any(0 < c < 40 for c in counts), lines  # rows counted before the shard committed
    assert all("notes written" in ln and "error rows" in ln for ln in lines)


def test_staging_tasks_write_with_the_drivers_modes(tmp_path, ray_local):
    """Staged copies of the notes are written by Ray tasks (other processes): they get the
    modes of the driver's output.mode too (the default 0700; 0750 widened on purpose)."""
    from functools import partial

    from jobs.corpus import plan_shards
    from jobs.fs import private_files
    from jobs.launch import ray_map
    from jobs.spec import CorpusSpec

    (tmp_path / "in.jsonl").write_text("".join(f'{{"id": {i}, "text": "n"}}\n' for i in range(3)))
    corpus = CorpusSpec.model_validate({"format": "jsonl", "paths": [str(tmp_path / "in.jsonl")]})
    for mode in (0o700, 0o750):
        staging = tmp_path / f"staging{mode:o}"
        with private_files(mode):
            (shard,) = plan_shards(corpus, str(staging), 100, map_fn=partial(ray_map))
        assert Path(shard.path).is_relative_to(staging)
        if mode == 0o700:
            assert_private(staging)
        else:
            assert {p.stat().st_mode & 0o777 for p in staging.rglob("*") if p.is_file()} == {0o640}
