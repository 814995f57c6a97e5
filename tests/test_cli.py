"""The `clinicalbert` command line: validate, schema, prepare, inspect, demo-data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_validate_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert (
        main(["demo-data", "--out", str(tmp_path / "demo"), "--notes", "20", "--hidden", "32"]) == 0
    )
    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["corpus"]["paths"] = [str(tmp_path / "demo" / "corpus" / "notes.parquet")]
    spec["model"]["path"] = str(tmp_path / "demo" / "model")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(good)]) == 0
    assert "valid" in capsys.readouterr().out

    spec["device_pool"][0]["device"] = "tpu"
    spec["corpus"]["paths"] = [str(tmp_path / "missing.parquet")]
    spec["surprise"] = 1
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(spec))
    import ray

    assert main(["run", str(bad)]) == 2  # refused before any Ray work
    assert not ray.is_initialized()
    err = capsys.readouterr().err
    assert "device_pool[0].device" in err and "'tpu'" in err
    assert "corpus.paths[0]" in err and "does not exist" in err
    assert "surprise" in err


def test_schema_is_json(capsys: pytest.CaptureFixture):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"corpus", "model", "device_pool", "output"} <= set(schema["properties"])


def test_prepare_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture):
    from jobs.synthetic import make_model

    raw = make_model(tmp_path / "raw", hidden=32, layers=1, heads=2, max_positions=64)
    out = tmp_path / "prepared"
    assert main(["prepare", str(raw), "--variant", "custom", "--cased", "--out", str(out)]) == 0
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "cased" in text and "pooler, mlm" in text and "model.safetensors" in text
    assert (
        main(["prepare", str(raw), "--variant", "bio_clinicalbert", "--out", str(tmp_path / "x")])
        == 2
    )
    assert "vocab_size" in capsys.readouterr().err
