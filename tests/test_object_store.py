"""Object stores as safe as local disk, against a local S3 server (moto) on 127.0.0.1 that the
tests start and stop themselves: URIs keep their query for every derived path, cleanup aborts
incomplete multipart uploads, and two runs locking one output at the same instant never both
win. No Ray, nothing leaves this machine."""

from __future__ import annotations

import json
import logging
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.corpus import list_sources, plan_shards, read_shard
from jobs.corpus.staging import clean_staging
from jobs.fs import as_uri, filesystem, join
from jobs.lock import OutputLock
from jobs.output import LOCK_FILE, OutputDir
from jobs.spec import CorpusSpec


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (a free port), stopped after the module; yields
    (boto3 client, the URI query that points pyarrow at it)."""
    import os
    import socket

    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        client = boto3.client(
            "s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1"
        )
        client.create_bucket(Bucket="notes")
        yield client, f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_every_derived_path_keeps_the_uri_query(s3, tmp_path):
    """Listed inputs, staged files and paths joined under a URI keep `?endpoint_override=...`:
    without it pyarrow would read a bucket of the same name from the public endpoint."""
    client, query = s3
    for i in range(2):
        rows = [{"id": i * 10 + k, "text": f"note {k}"} for k in range(3)]
        body = "".join(json.dumps(r) + "\n" for r in rows).encode()
        client.put_object(Bucket="notes", Key=f"in/part{i}.jsonl", Body=body)
    assert join(f"s3://notes/out{query}", "_job.json") == f"s3://notes/out/_job.json{query}"
    assert as_uri(f"s3://notes/in{query}", "notes/in/a.jsonl") == f"s3://notes/in/a.jsonl{query}"
    corpus = CorpusSpec.model_validate({"format": "jsonl", "paths": [f"s3://notes/in{query}"]})
    sources = list_sources(corpus, 100)
    assert [s.path for s in sources] == [f"s3://notes/in/part{i}.jsonl{query}" for i in range(2)]
    shards = plan_shards(corpus, f"s3://notes/staging{query}", 100)
    assert len(shards) == 2 and all(s.path.startswith("s3://notes/staging/") for s in shards)
    assert all(s.path.endswith(query) for s in shards)
    ids = [r["id"] for s in shards for b in read_shard(s, corpus, 10) for r in b.to_pylist()]
    assert ids == [0, 1, 2, 10, 11, 12]


def test_cleanup_aborts_incomplete_multipart_uploads(s3):
    """A killed writer's multipart upload (a temp part, a staged copy of notes) is invisible
    to listing but kept and billed by S3: a resume's cleanup aborts it, under the output and
    the staging prefixes, and only there."""
    client, query = s3
    keys = ["run/.tmp-part-0123456789abcdef.parquet-x", "run.staging/.tmp-notes.parquet-y",
            "elsewhere/.tmp-z"]  # fmt: skip
    for key in keys:
        upload = client.create_multipart_upload(Bucket="notes", Key=key)
        client.upload_part(Bucket="notes", Key=key, UploadId=upload["UploadId"], PartNumber=1,
                           Body=b"x" * 1024)  # fmt: skip
    out = OutputDir(f"s3://notes/run{query}")
    out.check_spec("h1", {}, overwrite=False)
    clean_staging(f"s3://notes/run.staging{query}")
    left = [u["Key"] for u in client.list_multipart_uploads(Bucket="notes").get("Uploads", [])]
    assert left == ["elsewhere/.tmp-z"]


def _race(out_uri: str, rounds: int, stale: bool) -> list[int]:
    """Two runs acquire the lock of one output at the same instant, `rounds` times: how many
    won each round."""
    won = []
    for _ in range(rounds):
        out = OutputDir(out_uri)
        fs, lock_path = filesystem(join(out_uri, LOCK_FILE))
        if stale:  # a crashed run's lock, long expired
            holder = {"host": "gone", "pid": 1, "job": "old", "token": "t", "renewed_at": 0,
                      "lease_s": 1}  # fmt: skip
            with fs.open_output_stream(lock_path) as f:
                f.write(json.dumps(holder).encode())
        locks = [OutputLock(out, f"run{i}", lease_s=600) for i in range(2)]
        barrier, wins = threading.Barrier(2), []

        def acquire(lock: OutputLock, barrier=barrier, wins=wins) -> None:
            barrier.wait()
            try:
                lock.acquire()
                wins.append(lock)
            except RuntimeError:
                pass

        threads = [threading.Thread(target=acquire, args=(lock,)) for lock in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won.append(len(wins))
        for lock in wins:
            lock.release()
        with pytest.raises(FileNotFoundError):
            fs.open_input_stream(lock_path).read()
    return won


@pytest.mark.parametrize("stale", [False, True], ids=["fresh", "stale-lock-taken-over"])
def test_two_runs_locking_one_s3_output_never_both_win(s3, stale):
    """S3's conditional writes (If-None-Match to create, If-Match on the ETag read to take a
    stale lock over): of two runs that acquire at the same instant exactly one wins, 40 times
    in 40."""
    _, query = s3
    won = _race(f"s3://notes/locked-{int(stale)}{query}", 40, stale)
    assert won == [1] * 40


def test_a_store_without_conditional_create_warns(s3, monkeypatch, caplog):
    """Where no conditional create is at hand (another store, or S3 without boto3) the lock
    falls back to read-check-write, and the run says so."""
    import jobs.lock as lock_module
    import jobs.objectstore as objectstore

    _, query = s3
    monkeypatch.setattr(objectstore, "s3_object", lambda uri: None)
    lock_module._warn_read_check_write.cache_clear()
    out = OutputDir(f"s3://notes/plain{query}")
    lock = OutputLock(out, "solo", lease_s=600)
    with caplog.at_level(logging.WARNING, logger="jobs.lock"):
        lock.acquire()
    try:
        assert any("read-check-write" in m and query not in m for m in caplog.messages)
        fs, path = filesystem(join(out.uri, LOCK_FILE))
        assert json.loads(fs.open_input_stream(path).read())["job"] == "solo"
    finally:
        lock.release()


def test_a_parquet_corpus_on_s3_plans_and_reads_by_its_own_endpoint(s3, tmp_path):
    """Parquet inputs are read in place: the shard paths carry the query too."""
    client, query = s3
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", "c"]})
    pq.write_table(table, tmp_path / "x.parquet")
    client.upload_file(str(tmp_path / "x.parquet"), "notes", "pq/x.parquet")
    corpus = CorpusSpec.model_validate({"format": "parquet", "paths": [f"s3://notes/pq{query}"]})
    started = time.monotonic()
    (shard,) = plan_shards(corpus, f"s3://notes/pq-staging{query}", 100)
    assert shard.path == f"s3://notes/pq/x.parquet{query}"
    assert [r["id"] for b in read_shard(shard, corpus, 10) for r in b.to_pylist()] == [1, 2, 3]
    assert time.monotonic() - started < 30
