"""Hostile checkpoints fail fast, in one line naming the file and the limit.

Each test is one class of hostile input: sizes in config.json, error lists, a safetensors
header, tokenizer files, a config that contradicts its weights, manifest entries and symlinks
leading out of the model dir. "Huge" files are sparse (`truncate`): a limit checked by stat
fails before a byte is read, which is what makes the wall-time bounds hold (and bounds memory:
nothing that large was ever read or built).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from clinicalbert_core import checkpoint_limits as L
from clinicalbert_core.architectures import load_config
from clinicalbert_core.hub import MANIFEST, open_checkpoint, prepare, sha256_file
from clinicalbert_core.inspection import inspect
from clinicalbert_core.weights import convert, read_state_dict
from jobs.cli import main
from jobs.synthetic import make_model, make_modernbert

FAST_S = 5.0  # every hostile case here fails in well under a second; this bound is slack


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small raw BERT checkpoint (config.json, model.safetensors, vocab.txt)."""
    root = tmp_path_factory.mktemp("raw")
    return make_model(root / "raw", hidden=32, layers=2, heads=4, max_positions=128, seed=3)


def copy(src: Path, dst: Path, **config: Any) -> Path:
    """A copy of the checkpoint `src` with `config` merged into its config.json."""
    shutil.copytree(src, dst, symlinks=True)
    if config:
        path = dst / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


def refused(opener: Callable[[], Any], *words: str, kind: type = ValueError) -> str:
    """`opener()` raises `kind` within FAST_S seconds, its message one line of sane length
    holding every one of `words`; returns the message."""
    start = time.monotonic()
    with pytest.raises(kind) as e:
        opener()
    elapsed = time.monotonic() - start
    msg = str(e.value)
    assert elapsed < FAST_S, (elapsed, msg[:200])
    assert "\n" not in msg and len(msg) < 3000, msg[:500]
    for word in words:
        assert word in msg, (word, msg[:500])
    return msg


def sparse(path: Path, size: int) -> Path:
    """A file of `size` zero bytes that takes no disk."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# ---- config sizes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("num_hidden_layers", 100_000, "100000"),
        ("num_hidden_layers", 10**40, "1" + "0" * 40),
        ("num_hidden_layers", 1e40, "1e+40"),
        ("num_hidden_layers", True, "True"),
        ("num_hidden_layers", 0, "got 0"),
        ("hidden_size", 1 << 20, "1048576"),
        ("num_attention_heads", 4096, "4096"),
        ("intermediate_size", 12.5, "12.5"),
        ("vocab_size", 10**9, "1000000000"),
        ("max_position_embeddings", 1 << 40, str(1 << 40)),
        ("num_labels", 10**7, "10000000"),
        ("num_hidden_layers", "x" * 10_000, "xxx..."),
    ],
)
def test_config_sizes_are_bounded_before_anything_is_built(
    raw_dir: Path, tmp_path: Path, field: str, value: Any, shown: str
):
    bad = copy(raw_dir, tmp_path / "bad", **{field: value})
    limit = f"at most {L.MAX_CONFIG_SIZES[field]:,}"
    for opener in (lambda: prepare(bad, tmp_path / "out", lowercase=False), lambda: inspect(bad)):
        refused(opener, f"{bad / 'config.json'}: {field}", limit, shown)
    assert not (tmp_path / "out").exists()
    # the raw dict is checked first, whatever the architecture (ModernBERT's from_dict would
    # otherwise list layer types for every layer)
    for model_type in ("bert", "modernbert"):
        raw = {"model_type": model_type, "vocab_size": 100, field: value}
        refused(partial(load_config, raw, "cfg"), f"cfg: {field}", limit)


def test_config_json_itself_is_bounded(raw_dir: Path, tmp_path: Path):
    big = copy(raw_dir, tmp_path / "big")
    sparse(big / "config.json", 2 * L.MAX_JSON_BYTES)
    refused(lambda: inspect(big), f"{big / 'config.json'}: 2,097,152 bytes", "1 MiB limit")
    deep = copy(raw_dir, tmp_path / "deep")
    (deep / "config.json").write_text("[" * 200_000 + "]" * 200_000)  # 400 KB, under the cap
    refused(lambda: inspect(deep), f"{deep / 'config.json'}: not readable JSON")
    (deep / "config.json").write_text('{"vocab_size": ' + "9" * 5000 + "}")
    refused(lambda: inspect(deep), f"{deep / 'config.json'}: not readable JSON")
    (deep / "config.json").write_text(json.dumps({"vocab_size": 30, "model_type": ["bert"]}))
    refused(lambda: inspect(deep), "model_type ['bert'] is not supported")


def test_cli_prints_one_line(raw_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    bad = copy(raw_dir, tmp_path / "bad", num_hidden_layers=10**40)
    start = time.monotonic()
    assert main(["inspect", str(bad)]) == 2
    assert main(["prepare", str(bad), "--out", str(tmp_path / "out"), "--cased"]) == 2
    assert time.monotonic() - start < 2 * FAST_S
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and err.count("num_hidden_layers must be") == 2, err[:500]


# ---- error lists -------------------------------------------------------------------------------
def test_problem_lists_are_capped(raw_dir: Path, tmp_path: Path):
    """A config of 200 layers over weights of 2: 198 layers of missing tensors, 20 named."""
    many = copy(raw_dir, tmp_path / "many", num_hidden_layers=200)
    msg = refused(
        lambda: prepare(many, tmp_path / "out", lowercase=False),
        "the config has num_hidden_layers 200, the weights 2 layers",
        "missing tensors: ",
        f"... and {198 * 16 - L.MAX_LISTED:,} more",
    )
    assert msg.count("encoder.layer.") == L.MAX_LISTED
    wide = copy(raw_dir, tmp_path / "wide", hidden_size=64)
    refused(
        lambda: prepare(wide, tmp_path / "out", lowercase=False),
        "the config has vocab_size 336 and hidden_size 64, the word embeddings are (336, 32)",
        "mis-shaped tensors: ",
        "more",
    )
    ck = open_checkpoint(raw_dir, lowercase=False)
    state = ck.state() | {f"junk.{i}": torch.zeros(1) for i in range(5000)}
    refused(
        lambda: convert(state, ck.config, pooler=False, mlm=False),
        "unexpected tensors: junk.0, junk.1, ",
        "... and 4,980 more",
    )


# ---- safetensors header ------------------------------------------------------------------------
def test_safetensors_header_is_bounded(raw_dir: Path, tmp_path: Path):
    big = copy(raw_dir, tmp_path / "big")
    weights = big / "model.safetensors"
    header = L.MAX_SAFETENSORS_HEADER_BYTES + 1
    sparse(weights, 8 + header + 1000)  # a header length past the cap, then nothing but zeros
    with open(weights, "r+b") as f:
        f.write(header.to_bytes(8, "little"))
    for opener in (lambda: inspect(big), lambda: prepare(big, tmp_path / "out", lowercase=False)):
        refused(opener, f"{weights}: safetensors header of {header:,} bytes", "16 MiB limit")

    many = copy(raw_dir, tmp_path / "many")
    entries = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}
               for i in range(L.MAX_TENSORS + 1)}  # fmt: skip
    blob = json.dumps(entries).encode()
    (many / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob)
    refused(lambda: inspect(many), f"{many / 'model.safetensors'}: 10,001 tensors", "10,000")
    refused(
        lambda: read_state_dict(len(blob).to_bytes(8, "little") + blob),
        "weights bytes: 10,001 tensors",
    )


def test_weights_only_refusal_is_one_line(raw_dir: Path, tmp_path: Path):
    """A pickle that would run code: one line with torch's reason, not its advice."""

    class Evil:
        def __reduce__(self) -> tuple[Any, tuple[()]]:
            return (os.getcwd, ())

    evil = copy(raw_dir, tmp_path / "evil")
    (evil / "model.safetensors").unlink()
    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    (evil / "pytorch_model.bin").write_bytes(buf.getvalue())
    msg = refused(lambda: inspect(evil), "pytorch_model.bin: cannot read", "getcwd")
    assert "weights_only` set to `False`" not in msg


# ---- tokenizer files ---------------------------------------------------------------------------
def test_tokenizer_files_are_bounded(raw_dir: Path, model_dir: Path, tmp_path: Path):
    tok = copy(model_dir, tmp_path / "tok")
    sparse(tok / "tokenizer.json", 220 * L.MiB)
    refused(lambda: inspect(tok), f"{tok / 'tokenizer.json'}: 230,686,720 bytes", "32 MiB limit")
    refused(lambda: open_checkpoint(tok, verify=False), "tokenizer.json", "32 MiB limit")

    vocab = copy(raw_dir, tmp_path / "vocab")
    sparse(vocab / "vocab.txt", 4 << 30)
    for opener in (
        lambda: inspect(vocab),
        lambda: prepare(vocab, tmp_path / "out", lowercase=False),
    ):
        refused(opener, f"{vocab / 'vocab.txt'}: 4,294,967,296 bytes", "16 MiB limit")
    (vocab / "vocab.txt").write_bytes(b"x\n" * (L.MAX_CONFIG_SIZES["vocab_size"] + 1))
    refused(lambda: inspect(vocab), "vocab.txt: 1,000,001 tokens, over the limit of 1,000,000")

    conf = copy(raw_dir, tmp_path / "conf")
    sparse(conf / "tokenizer_config.json", 5 * L.MiB)
    msg = refused(lambda: inspect(conf), "tokenizer_config.json: 5,242,880 bytes", "1 MiB")
    assert str(conf) in msg


# ---- config against weights --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"hidden_size": 64}, "hidden_size 64, the word embeddings are (336, 32)"),
        ({"vocab_size": 999}, "vocab_size 999 and hidden_size 32, the word embeddings are (336"),
        ({"num_hidden_layers": 3}, "num_hidden_layers 3, the weights 2 layers"),
        ({"num_hidden_layers": 1}, "num_hidden_layers 1, the weights 2 layers"),
    ],
)
def test_inspect_names_contradictions(
    raw_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, config: dict, says: str
):
    bad = copy(raw_dir, tmp_path / "bad", **config)
    info = inspect(bad)
    assert any(says in c for c in info["contradictions"]), info["contradictions"]
    assert all(len(c) < 3000 for c in info["contradictions"])
    assert main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH    config vs weights: " in out and says in out
    assert main(["inspect", "--json", str(bad)]) == 1
    assert json.loads(capsys.readouterr().out)["contradictions"] == info["contradictions"]


def test_inspect_agrees_with_sound_models(model_dir: Path, tmp_path: Path):
    assert inspect(model_dir)["contradictions"] == []
    modern = prepare(make_modernbert(tmp_path / "mb", hidden=32, layers=2), tmp_path / "mbp")
    assert inspect(modern)["contradictions"] == []
    assert main(["inspect", str(model_dir)]) == 0


# ---- manifest entries and symlinks -------------------------------------------------------------
def test_manifest_entries_stay_inside(model_dir: Path, tmp_path: Path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the model\n")
    digest = sha256_file(secret)
    for entry in ("../secret.txt", str(secret), "sub/../../secret.txt", "./config.json", ""):
        bad = copy(model_dir, tmp_path / "bad")
        manifest = json.loads((bad / MANIFEST).read_text())
        manifest["files"][entry] = "0" * 64
        (bad / MANIFEST).write_text(json.dumps(manifest))
        for opener in (open_checkpoint, inspect):
            msg = refused(
                partial(opener, bad), f"{bad / MANIFEST}: file entry {entry!r}", "plain relative"
            )
            assert digest not in msg
        shutil.rmtree(bad)
    bad = copy(model_dir, tmp_path / "bad")
    manifest = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**manifest, "files": ["config.json"]}))
    refused(lambda: open_checkpoint(bad), "files must map file names to sha256s")


def test_symlinks_stay_inside(raw_dir: Path, model_dir: Path, tmp_path: Path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(raw_dir / "vocab.txt", outside / "vocab.txt")
    linked = copy(raw_dir, tmp_path / "linked")
    (linked / "vocab.txt").unlink()
    (linked / "vocab.txt").symlink_to(outside / "vocab.txt")
    for opener in (
        lambda: inspect(linked),
        lambda: prepare(linked, tmp_path / "out", lowercase=False),
    ):
        refused(opener, f"{linked / 'vocab.txt'}: links to {outside / 'vocab.txt'}", "model dir")
    extra = copy(model_dir, tmp_path / "extra")  # a file inspect would hash and print
    (extra / "notes.txt").symlink_to(outside / "vocab.txt")
    refused(lambda: inspect(extra), f"{extra / 'notes.txt'}: links to")
    inner = copy(raw_dir, tmp_path / "inner")  # a link inside the dir is fine
    (inner / "real_vocab.txt").write_bytes((inner / "vocab.txt").read_bytes())
    (inner / "vocab.txt").unlink()
    (inner / "vocab.txt").symlink_to("real_vocab.txt")
    assert inspect(inner)["contradictions"] == []


def hub_snapshot(cache: Path, src: Path, rev: str = "b" * 40) -> Path:
    """huggingface_hub's cache layout: snapshots/<rev>/<file> -> ../../blobs/<sha256>."""
    repo = cache / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / sha256_file(f)
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    return snap


def test_hub_snapshot_links_into_blobs(raw_dir: Path, tmp_path: Path):
    snap = hub_snapshot(tmp_path / "hub", raw_dir)
    assert all((snap / n).is_symlink() for n in ("config.json", "model.safetensors"))
    out = prepare(snap, tmp_path / "out", lowercase=False)
    assert inspect(out)["integrity"] == [] and inspect(snap)["contradictions"] == []
    # a snapshot link out of its repo's blobs (here: another repo's) is refused
    other = hub_snapshot(tmp_path / "hub2", raw_dir)
    (snap / "vocab.txt").unlink()
    (snap / "vocab.txt").symlink_to(other / "vocab.txt")
    refused(lambda: inspect(snap), f"{snap / 'vocab.txt'}: links to", "blobs/")
