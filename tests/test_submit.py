"""`ray job submit` against a `ray start --head` on 127.0.0.1 (token auth as Ray sets it up)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from clinicalbert_core.hub import prepare
from jobs.synthetic import make_model, write_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)  # fmt: skip


def pids_using(marker: str) -> list[int]:
    """Processes whose command line names `marker` (this test's Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                pids.append(int(entry.name))
    return pids


def stop_head(temp: str, grace: float = 2.0, timeout: float = 30.0) -> None:
    """Stop exactly the Ray processes of the head this test started (never `ray stop`, which
    stops every Ray on the machine): SIGTERM, then after `grace` seconds SIGKILL whatever is
    left (Ray's GCS and raylet take 30 s and more to end on SIGTERM alone)."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, timeout)):
        for pid in pids_using(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids_using(temp) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids_using(temp):
            return
    raise AssertionError(f"Ray processes of {temp} still running: {pids_using(temp)}")


def test_ray_job_submit_on_loopback(tmp_path: Path, own_ray):
    raw = make_model(tmp_path / "raw", hidden=32, layers=2, heads=4, max_positions=128)
    model = prepare(raw, tmp_path / "model", variant="custom", lowercase=False)
    write_corpus(tmp_path / "corpus" / "notes.parquet", 60, seed=2, max_words=120)
    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["corpus"]["paths"] = [str(tmp_path / "corpus" / "notes.parquet")]
    spec["model"]["path"] = str(model)
    spec["output"]["path"] = str(tmp_path / "run")
    spec["run"]["shard_rows"] = 20
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))

    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{BIN}:{os.environ['PATH']}"}
    gcs, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # AF_UNIX socket paths must stay short
    started = ray_cli("start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                      "--num-cpus=3", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={dash}", f"--temp-dir={temp}", env=env)  # fmt: skip
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's job agent registers a while after `ray start` returns; until
            # then Ray refuses the submission itself (nothing is created) and says to retry
            submitted = ray_cli(
                "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".",
                "--runtime-env", "cluster/runtime_env.yaml", "--",
                "python", "-m", "jobs", "run", str(tmp_path / "job.yaml"), env=env, timeout=600,
            )  # fmt: skip
            log = submitted.stdout + submitted.stderr
            if "No available agent to submit job" not in log or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert submitted.returncode == 0, log[-3000:]
        assert "succeeded" in log.lower()
    finally:
        stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)
    parts = sorted((tmp_path / "run").glob("part-*.parquet"))
    rows = sum(pq.read_metadata(p).num_rows for p in parts)
    assert rows == 60 and (tmp_path / "run" / "_SUCCESS").exists()
