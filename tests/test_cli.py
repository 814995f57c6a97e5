"""The `clinicalbert` command line: validate, schema, prepare, inspect, demo-data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from jobs.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_validate_good_and_bad(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch):
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

    def no_ray(*args, **kwargs):
        raise AssertionError("a refused spec reached Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr("jobs.driver.connect", no_ray)
    assert main(["run", str(bad)]) == 2  # refused before any Ray work
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


def demo_spec(tmp_path: Path) -> dict:
    """configs/demo.yaml pointed at a small demo corpus and model made here."""
    main(["demo-data", "--out", str(tmp_path / "demo"), "--notes", "20", "--hidden", "32"])
    spec = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    spec["corpus"]["paths"] = [str(tmp_path / "demo" / "corpus" / "notes.parquet")]
    spec["model"]["path"] = str(tmp_path / "demo" / "model")
    spec["output"]["path"] = str(tmp_path / "out")
    return spec


def test_validate_catches_data_and_model_mistakes_before_ray(tmp_path, capsys, monkeypatch):
    import time

    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("validate reached Ray")

    monkeypatch.setattr(ray, "init", no_ray)
    spec = demo_spec(tmp_path)
    path = tmp_path / "job.yaml"
    mistakes = {
        "text_column": (lambda s: s["corpus"].update(text_column="Text"),
                        "corpus.text_column: column 'Text' is not in", "did you mean 'text'?"),
        "where": (lambda s: s["corpus"].update(where={"categroy": "x"}),
                  "corpus.where.categroy: column 'categroy'", "did you mean 'category'?"),
        "keep": (lambda s: s["corpus"].update(keep_columns=["subject id"]),
                 "corpus.keep_columns[0]: column 'subject id'", "did you mean 'subject_id'?"),
        "where value": (lambda s: s["corpus"].update(where={"category": "Discharge summary "}),
                        "corpus.where.category: 'Discharge summary ' matches none",
                        "differ only in spaces: ['Discharge summary']"),
        "max_seq": (lambda s: s["model"].update(max_seq=1024),
                    "model.max_seq: 1024 exceeds the model's max_position_embeddings 512", ""),
        "mlm positions": (lambda s: s["heads"].update(mlm={"enabled": True, "positions": "mask"},
                                                      pooling="pooler"), "", ""),
        "repeated ids": (lambda s: s["corpus"].update(id_column="category"),
                         "corpus.id_column: 'category' is not unique: 1 id is on more than one "
                         "row (19 extra rows; e.g. 'Discharge summary' in ",
                         "run.allow_duplicate_ids: true"),
        "output is a file": (lambda s: s["output"].update(path=str(path)),
                             f"output.path: {path} is a file, not a directory", ""),
        "output under a file": (lambda s: s["output"].update(path=str(path / "out")),
                                f"output.path: {path / 'out'} lies under a file, {path}", ""),
        "staging under a file": (lambda s: s["run"].update(staging_dir=str(path / "st")),
                                 f"run.staging_dir: {path / 'st'} lies under a file", ""),
    }  # fmt: skip
    for name, (change, want, hint) in mistakes.items():
        bad = json.loads(json.dumps(spec))
        change(bad)
        path.write_text(yaml.safe_dump(bad))
        t0 = time.monotonic()
        code = main(["validate", str(path)])
        captured = capsys.readouterr()
        err = captured.err
        assert time.monotonic() - t0 < 10, name
        if not want:  # this checkpoint has a pooler, an MLM head and [MASK]: valid
            assert code == 0, (name, err)
            continue
        if name == "where value":  # a warning: later files may hold the value
            assert code == 0 and f"warning: {want}" in captured.out and hint in captured.out
            continue
        assert code == 2 and want in err and hint in err, (name, err)
        assert err.count("\n") == 1, err  # one line, no traceback

    weights = tmp_path / "demo" / "model" / "model.safetensors"
    blob = weights.read_bytes()
    weights.write_bytes(blob[:-100])  # a truncated copy
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.path:" in err and "model.safetensors" in err
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(flipped))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: sha256" in err and "the manifest expects" in err
    assert main(["inspect", str(weights.parent)]) == 1
    assert "CORRUPT     model.safetensors: sha256" in capsys.readouterr().out

    from clinicalbert_core.hub import prepare
    from jobs.synthetic import make_modernbert

    modern = prepare(make_modernbert(tmp_path / "mb", hidden=32, layers=2), tmp_path / "mbp")
    spec["model"] |= {"path": str(modern), "max_seq": 128}
    spec["heads"] = {"pooling": "pooler"}  # ModernBERT has no pooler
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    assert "heads.pooling: 'pooler' needs trained pooler weights" in capsys.readouterr().err

    spec["corpus"]["paths"] = ["/cluster/only/notes.parquet"]
    spec["model"]["path"] = "/cluster/only/model"
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    assert main(["validate", "--no-check-paths", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_unreachable_object_store_output_is_one_line(tmp_path, capsys, monkeypatch):
    """An s3:// output nobody answers for: one line naming the problem, no traceback."""
    spec = demo_spec(tmp_path)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    spec["output"]["path"] = "s3://bucket/out?endpoint_override=127.0.0.1:9&scheme=http"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: output.path: s3://bucket/out?endpoint_override=127.0.0.1:9&")
    assert "cannot be checked" in err and "\n" not in err and "Traceback" not in err


def test_verify_names_a_path_that_is_no_output(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    for name, want in (("nope", "no such output dir"), ("file", "not a directory"),
                       ("empty", "no part files")):  # fmt: skip
        assert main(["verify", str(tmp_path / name)]) == 1
        assert capsys.readouterr().out == f"{tmp_path / name}: {want}\n"


def test_a_closed_pipe_is_no_error():
    """`clinicalbert schema | head -c 1`: the reader has gone before the output is written
    (here: closed before the process starts); no error line, exit 141 as a shell's."""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run([sys.executable, "-m", "jobs", "schema"], cwd=REPO, stdout=write,
                          stderr=subprocess.PIPE, timeout=60)  # fmt: skip
    os.close(write)
    assert proc.returncode == 141 and proc.stderr.decode() == "", proc.stderr.decode()
