"""Fixtures the job tests share: a small prepared BERT, and one local Ray (2 CPUs) for the
whole session whose workers can be slowed down per test (`slowdown`, see slowdown.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import slowdown as slowdown_hooks

from clinicalbert_core.hub import prepare
from jobs.synthetic import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    raw = make_model(root / "raw", hidden=32, layers=2, heads=4, max_positions=128, seed=3)
    return prepare(raw, root / "prepared", variant="custom", lowercase=False)


@pytest.fixture(scope="session")
def slowdown_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slowdown") / "slowdown.json"
    path.write_text("{}")
    return path


@pytest.fixture
def slowdown(slowdown_file: Path):
    """slowdown({"<pool>": seconds per record batch, "staging": seconds per input}): what the
    session's Ray workers sleep from now until the test ends."""
    yield lambda plan: slowdown_file.write_text(json.dumps(plan))
    slowdown_file.write_text("{}")


@pytest.fixture
def ray_local(slowdown_file: Path):
    """The session's local Ray (never `ray stop`: only this process's Ray). Started on first
    use, and again after a test that shut it down to use a cluster of its own."""
    import ray

    if not ray.is_initialized():
        _start_ray(slowdown_file)
    yield ray


def _start_ray(slowdown_file: Path) -> None:
    import ray

    with slowdown_hooks.worker_env(slowdown_file):
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 logging_level=logging.WARNING)  # fmt: skip


@pytest.fixture
def sigint_ignored(slowdown_file: Path):
    """A local Ray started from a process that ignores SIGINT, as under `nohup clinicalbert
    run ... &`: the raylet and every worker inherit SIG_IGN. Shut down after the test (the
    next test that asks for `ray_local` starts the session's Ray afresh)."""
    import signal

    import ray

    if ray.is_initialized():
        ray.shutdown()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        _start_ray(slowdown_file)
    finally:
        signal.signal(signal.SIGINT, old)
    yield ray
    ray.shutdown()


@pytest.fixture
def own_ray():
    """For a test whose Ray clusters are its own (a `ray start` head, CLI drivers each with
    their own local Ray): the session's Ray is shut down first, so the 2 cores are theirs
    (`ray_local` starts it again for a later test that asks)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests with Ray clusters of their own run last, so the session's Ray starts once
    (each of them shuts it down: a session Ray started after one is a second start-up)."""
    items.sort(key=lambda item: "own_ray" in getattr(item, "fixturenames", ()))


def pytest_sessionfinish(session: pytest.Session) -> None:
    import sys

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()
