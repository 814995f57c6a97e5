"""Test-only slowdowns inside Ray's worker processes (no knob in the product code).

A Ray cluster started inside `worker_env(path)` runs `install()` in every worker process it
starts (tests/sitecustomize.py, on the workers' PYTHONPATH): it wraps the actor's per-unit
loop (`ShardProcessor._units`) and the staging task (`jobs.corpus.staging.stage_source`) so
that they sleep for what the JSON file at `path` says at the time of the call: {"<pool name>": seconds after each record batch of that pool's
actors, "staging": seconds before each input is staged, "staging_gate": a path: a staged
input's first chunk is committed, then its staging waits until that file exists (at most
GATE_S; then it writes `<path>.timeout`)}. Tests write that file (the `slowdown` fixture); a
missing or empty file slows nothing.

`python tests/slowdown.py run SPEC` is the CLI (`python -m jobs run SPEC`) with its Ray
started that way (a driver in its own process: SLOWDOWN_FILE names the file).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "SLOWDOWN_FILE"
# A test Ray keeps its idle workers: with Ray's default, the workers of one job's planning
# tasks are gone by the next job, whose planning then waits ~0.8 s for a fresh one.
RAY_CONFIG = {"RAY_num_workers_soft_limit": "2"}
HERE = str(Path(__file__).resolve().parent)
GATE_S = 120.0


@contextlib.contextmanager
def worker_env(path: str | os.PathLike) -> Iterator[None]:
    """Within it, a local Ray started here (its raylet inherits this environment) gives every
    worker it starts the slowdowns the file at `path` says, and keeps RAY_CONFIG; this
    process's environment is restored afterwards (processes started later do not inherit it)."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", ENV, *RAY_CONFIG)}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, saved["PYTHONPATH"]) if p)
    os.environ[ENV] = str(path)
    os.environ.update(RAY_CONFIG)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def seconds(key: str) -> float:
    return float(planned(key) or 0.0)


def planned(key: str) -> Any:
    try:
        return json.loads(Path(os.environ[ENV]).read_text() or "{}").get(key)
    except (KeyError, FileNotFoundError):
        return None


def wait_for(path: str) -> None:
    """Until `path` exists (at most GATE_S; then `<path>.timeout` is written)."""
    deadline = time.monotonic() + GATE_S
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            Path(f"{path}.timeout").write_text("")
            return
        time.sleep(0.05)


def _gated(chunks: Any, path: str) -> Any:
    """`chunks` (a staging generator), held after the first until `path` exists."""
    for i, chunk in enumerate(chunks):
        yield chunk
        if i == 0:
            wait_for(path)


def install() -> None:
    """Ray's worker_process_setup_hook: wrap the functions a slowdown applies to."""
    import ray

    from jobs import actor
    from jobs.corpus import staging

    units, stage = actor.ShardProcessor._units, staging.stage_source

    def slow_units(self: Any, reader: Any) -> Any:
        for unit in units(self, reader):
            yield unit
            if unit.last:
                time.sleep(seconds(self.pool.name))
                hold = planned("hold")
                if hold and hold["node"] == ray.get_runtime_context().get_node_id():
                    wait_for(hold["until"])

    def slow_stage(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds("staging"))
        chunks = stage(*args, **kwargs)
        return chunks if (path := planned("staging_gate")) is None else _gated(chunks, path)

    actor.ShardProcessor._units = slow_units
    staging.stage_source = slow_stage


def main() -> int:
    import ray

    from jobs.cli import main as cli_main

    init = ray.init

    def slowed_init(*args: Any, **kwargs: Any) -> Any:
        with worker_env(os.environ[ENV]):
            return init(*args, **kwargs)

    ray.init = slowed_init
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
