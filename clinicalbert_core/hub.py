"""Finding, downloading and preparing checkpoints.

A *source* is a local dir (prepared, or a raw HF snapshot), a `model.safetensors` file, or a
hub repo id. `prepare` turns any of them into a self-contained dir: `model.safetensors`,
`config.json`, `tokenizer.json` with the right casing, and a manifest with every file's
sha256 and where it came from. `ModelBundle` is a prepared model in memory, which is what
jobs ship to their actors through Ray's object store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save, save_file
from tokenizers import Tokenizer

from . import weights as W
from .config import EncoderConfig
from .tokenizer import tokenizer_casing, with_casing, wordpiece_from_vocab
from .variants import Variant, check_config, get_variant

log = logging.getLogger(__name__)

MANIFEST = "clinicalbert_manifest.json"
CONFIG_NAMES = ("config.json", "bert_config.json")
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
HUB_PATTERNS = [*CONFIG_NAMES, *WEIGHT_NAMES, "vocab.txt", "tokenizer.json"]


@dataclass(frozen=True)
class ModelFiles:
    """The files of one checkpoint on local disk."""

    root: Path
    config: Path
    weights: Path
    tokenizer: Path | None  # tokenizer.json
    vocab: Path | None  # vocab.txt
    manifest: dict[str, Any] | None  # present in prepared dirs


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def find_files(source: str | Path, config_path: str | Path | None = None) -> ModelFiles:
    """Locate config, weights and tokenizer files of a local dir or weights file."""
    path = Path(source)
    if path.is_file():
        root, weights = path.parent, path
    elif path.is_dir():
        root = path
        found = [path / n for n in WEIGHT_NAMES if (path / n).is_file()]
        if not found:
            sharded = sorted(p.name for p in path.glob("*.index.json"))
            hint = f" (sharded checkpoints {sharded} are not supported)" if sharded else ""
            raise ValueError(f"{path}: no weights file; expected one of {WEIGHT_NAMES}{hint}")
        weights = found[0]
    else:
        raise ValueError(f"model path not found: {path}")
    if config_path is not None:
        config = Path(config_path)
        if not config.is_file():
            raise ValueError(f"config file not found: {config}")
    else:
        configs = [root / n for n in CONFIG_NAMES if (root / n).is_file()]
        if not configs:
            raise ValueError(f"{root}: no config file; expected one of {CONFIG_NAMES}")
        config = configs[0]
    tokenizer = root / "tokenizer.json" if (root / "tokenizer.json").is_file() else None
    vocab = root / "vocab.txt" if (root / "vocab.txt").is_file() else None
    if tokenizer is None and vocab is None:
        raise ValueError(f"{root}: no tokenizer; expected tokenizer.json or vocab.txt")
    manifest = json.loads((root / MANIFEST).read_text()) if (root / MANIFEST).is_file() else None
    return ModelFiles(root, config, weights, tokenizer, vocab, manifest)


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def download(repo: str, revision: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """snapshot_download of the files a BERT checkpoint needs (pinned revision if given).

    huggingface_hub reads HF_HUB_OFFLINE, HF_TOKEN and HF_HOME itself; offline without a
    cached snapshot is an error naming the repo and revision.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir
            )
        )
    except LocalEntryNotFoundError as e:
        raise RuntimeError(
            f"hub repo {repo!r} at revision {revision or 'main'!r} is not in the local cache and "
            "the hub cannot be reached (offline mode or no network); download it on a "
            "connected machine or pass a local path"
        ) from e


def resolve(
    source: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """A source -> (local path, provenance). Local paths win over hub ids."""
    path = Path(source).expanduser()
    if path.exists():
        return path, {"path": str(path.resolve())}
    if isinstance(source, str) and looks_like_hub_id(source):
        local = download(source, revision, cache_dir)
        # the snapshot dir is named after the commit: record that, not the branch name
        return local, {"hub": source, "revision": revision or "main", "commit": local.name}
    raise ValueError(f"model source not found: {source!r} is neither a local path nor a hub id")


def resolve_casing(variant: Variant, lowercase: bool | None, tokenizer: Tokenizer | None) -> bool:
    """Casing: explicit override > the variant's trained casing > the tokenizer's own."""
    if lowercase is not None:
        return lowercase
    if variant.lowercase is not None:
        return variant.lowercase
    own = tokenizer_casing(tokenizer) if tokenizer is not None else None
    if own is None:
        raise ValueError(
            f"casing unknown for variant {variant.name!r}: the checkpoint has no tokenizer.json; "
            "say lowercase=True/False (CLI: --lowercase or --cased)"
        )
    return own


def load_tokenizer(files: ModelFiles, lowercase: bool) -> Tokenizer:
    """tokenizer.json (re-cased if it disagrees) or one built from vocab.txt."""
    if files.tokenizer is not None:
        tok = Tokenizer.from_file(str(files.tokenizer))
        if tokenizer_casing(tok) != lowercase:
            log.info(
                "tokenizer.json casing differs from the chosen casing; using lowercase=%s",
                lowercase,
            )
            tok = with_casing(tok, lowercase)
        return tok
    assert files.vocab is not None
    return wordpiece_from_vocab(files.vocab, lowercase)


@dataclass(frozen=True)
class ModelBundle:
    """A prepared model in memory: config, safetensors bytes, tokenizer, identity."""

    config: dict[str, Any]
    weights: bytes  # safetensors
    tokenizer_json: str
    variant: str
    lowercase: bool
    weights_sha256: str
    source: dict[str, Any]

    @classmethod
    def load(
        cls,
        source: str | Path,
        variant: str | None = None,
        lowercase: bool | None = None,
        revision: str | None = None,
    ) -> ModelBundle:
        path, provenance = resolve(source, revision)
        files = find_files(path)
        v, config = checked_config(files, variant)
        if files.weights.suffix == ".safetensors":
            blob = files.weights.read_bytes()
        else:
            blob = save(_dedupe(W.read_state_dict(files.weights)))
        casing = resolve_casing(v, lowercase, own_tokenizer(files))
        tok = load_tokenizer(files, casing)
        return cls(
            config=config.to_dict(),
            weights=blob,
            tokenizer_json=tok.to_str(),
            variant=v.name,
            lowercase=casing,
            weights_sha256=hashlib.sha256(blob).hexdigest(),
            source=provenance,
        )


def own_tokenizer(files: ModelFiles) -> Tokenizer | None:
    return Tokenizer.from_file(str(files.tokenizer)) if files.tokenizer else None


def checked_config(files: ModelFiles, variant: str | None) -> tuple[Variant, EncoderConfig]:
    config = EncoderConfig.from_file(files.config)
    name = variant or (files.manifest or {}).get("variant") or "custom"
    v = get_variant(name)
    check_config(v, config)
    return v, config


def _dedupe(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: drop a decoder tied to the embeddings, copy others."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in state.items():
        if k.endswith("predictions.decoder.weight") and any(
            e.endswith("word_embeddings.weight") and torch.equal(t, state[e]) for e in state
        ):
            continue  # re-tied at load
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


def prepare(
    source: str | Path,
    out_dir: str | Path,
    variant: str | None = None,
    lowercase: bool | None = None,
    revision: str | None = None,
) -> Path:
    """Write a self-contained model dir; idempotent (same source and files: nothing rewritten)."""
    out = Path(out_dir)
    path, provenance = resolve(source, revision)
    files = find_files(path)
    v, config = checked_config(files, variant)
    casing = resolve_casing(v, lowercase, own_tokenizer(files))
    state = W.read_state_dict(files.weights)
    W.convert(
        state, config, pooler=W.has_pooler(state), mlm=W.has_mlm(state), source=str(files.weights)
    )
    tok = load_tokenizer(files, casing)
    identity = {
        "variant": v.name,
        "lowercase": casing,
        "source": provenance,
        "source_weights_sha256": sha256_file(files.weights),
    }
    old = out / MANIFEST
    if old.is_file():
        manifest = json.loads(old.read_text())
        if {k: manifest.get(k) for k in identity} == identity and _files_intact(out, manifest):
            log.info("%s is already prepared from the same source; nothing to do", out)
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(_dedupe(state), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        tok.save(str(tmp / "tokenizer.json"))
        if files.vocab is not None:
            shutil.copyfile(files.vocab, tmp / "vocab.txt")
        manifest = {
            **identity,
            "format_version": 1,
            "heads": {"pooler": W.has_pooler(state), "mlm": W.has_mlm(state)},
            "parameters": sum(t.numel() for t in _dedupe(state).values()),
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _files_intact(root: Path, manifest: dict[str, Any]) -> bool:
    entries = manifest.get("files") or {}
    return bool(entries) and all(
        (root / name).is_file() and sha256_file(root / name) == digest
        for name, digest in entries.items()
    )


def inspect(path: str | Path) -> dict[str, Any]:
    """What a model dir holds: config, casing, heads, parameter count, sha256 per file."""
    files = find_files(path)
    config = EncoderConfig.from_file(files.config)
    state = W.read_state_dict(files.weights)
    own = own_tokenizer(files)
    return {
        "path": str(files.root),
        "config": config.to_dict(),
        "variant": (files.manifest or {}).get("variant"),
        "lowercase": (files.manifest or {}).get(
            "lowercase", tokenizer_casing(own) if own else None
        ),
        "heads": {"pooler": W.has_pooler(state), "mlm": W.has_mlm(state)},
        "parameters": sum(t.numel() for t in _dedupe(state).values()),
        "source": (files.manifest or {}).get("source"),
        "sha256": {p.name: sha256_file(p) for p in sorted(files.root.iterdir()) if p.is_file()},
    }
