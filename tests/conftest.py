"""Fixtures the job tests share: a small prepared BERT and a local Ray (2 CPUs) per module."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clinicalbert_core.hub import prepare
from jobs.synthetic import make_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("model")
    raw = make_model(root / "raw", hidden=32, layers=2, heads=4, max_positions=128, seed=3)
    return prepare(raw, root / "prepared", variant="custom", lowercase=False)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray this module starts and stops (never `ray stop`: only this process's Ray)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()
