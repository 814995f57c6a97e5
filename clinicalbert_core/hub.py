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

from . import architectures
from . import weights as W
from .checkpoint_limits import capped, check_inside, check_manifest_files, shown
from .classify import head_info, task_head
from .config import EncoderConfig, read_json_object
from .tokenizer import (
    Specials,
    find_specials,
    read_tokenizer,
    tokenizer_casing,
    tokenizer_kind,
    with_casing,
    without_padding_and_truncation,
    wordpiece_from_vocab,
)
from .variants import Variant, check_config, get_variant

log = logging.getLogger(__name__)

MANIFEST = "clinicalbert_manifest.json"
CONFIG_NAMES = ("config.json", "bert_config.json")
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
TOKENIZER_CONFIGS = ("tokenizer_config.json", "special_tokens_map.json")
HUB_PATTERNS = [*CONFIG_NAMES, *WEIGHT_NAMES, "vocab.txt", "tokenizer.json", *TOKENIZER_CONFIGS]


@dataclass(frozen=True)
class ModelFiles:
    """The files of one checkpoint on local disk."""

    root: Path
    config: Path
    weights: Path
    tokenizer: Path | None  # tokenizer.json
    vocab: Path | None  # vocab.txt
    manifest: dict[str, Any] | None  # present in prepared dirs

    def tokenizer_config(self) -> dict[str, Any]:
        """tokenizer_config.json merged over special_tokens_map.json (either may be absent)."""
        merged: dict[str, Any] = {}
        for name in reversed(TOKENIZER_CONFIGS):
            path = self.root / name
            if path.is_file():
                check_inside(path, self.root)
                merged |= read_json_object(path)
        return merged


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
            hint = f" (sharded checkpoints are not supported: {capped(sharded)})" if sharded else ""
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
    own = [weights, tokenizer, vocab, root / MANIFEST] + ([config] if config_path is None else [])
    for found in own:  # symlinks stay inside (a config named apart, config_path, may be anywhere)
        if found is not None and found.exists():
            check_inside(found, root)
    manifest = read_json_object(root / MANIFEST) if (root / MANIFEST).is_file() else None
    return ModelFiles(root, config, weights, tokenizer, vocab, manifest)


def looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/", "~"))


def download(
    repo: str,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    cached_only: bool = False,
) -> Path:
    """snapshot_download of the files a checkpoint needs (pinned revision if given).

    huggingface_hub reads HF_HUB_OFFLINE, HF_TOKEN and HF_HOME itself; offline without a
    cached snapshot is an error naming the repo and revision. cached_only: never touch the
    network (FileNotFoundError when the snapshot is not in the local cache).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo, revision=revision, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir,
                local_files_only=cached_only,
            )
        )  # fmt: skip
    except LocalEntryNotFoundError as e:
        if cached_only:
            raise FileNotFoundError(
                f"hub repo {repo!r} at revision {revision or 'main'!r} is not in the local cache"
            ) from None
        raise RuntimeError(
            f"hub repo {repo!r} at revision {revision or 'main'!r} is not in the local cache and "
            "the hub cannot be reached (offline mode or no network); download it on a "
            "connected machine or pass a local path"
        ) from e


def resolve(
    source: str | Path,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    cached_only: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """A source -> (local path, provenance). Local paths win over hub ids."""
    path = Path(source).expanduser()
    if path.exists():
        return path, {"path": str(path.resolve())}
    if isinstance(source, str) and looks_like_hub_id(source):
        local = download(source, revision, cache_dir, cached_only)
        # the snapshot dir is named after the commit: record that, not the branch name
        return local, {"hub": source, "revision": revision or "main", "commit": local.name}
    raise ValueError(f"model source not found: {source!r} is neither a local path nor a hub id")


def resolve_casing(variant: Variant, lowercase: bool | None, tokenizer: Tokenizer | None) -> bool:
    """Casing: explicit override > the variant's trained casing > the tokenizer's own."""
    if lowercase is not None:
        return lowercase
    if variant.lowercase is not None:
        return variant.lowercase
    if tokenizer is None:
        raise ValueError(
            f"casing unknown for variant {variant.name!r}: the checkpoint has no tokenizer.json; "
            "say which: in a job spec model.lowercase: true/false; in Python lowercase=True/False; "
            "for `clinicalbert prepare`, --lowercase or --cased"
        )
    return tokenizer_casing(tokenizer)


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint opened and checked: where it is, what it is, how to tokenize for it.
    The single place that runs the loading steps (`load`, `ModelBundle.load`, `prepare`)."""

    files: ModelFiles
    provenance: dict[str, Any]
    variant: Variant
    config: EncoderConfig
    lowercase: bool | None  # None only when opened with casing_required=False
    tokenizer: Tokenizer  # casing applied, its own padding/truncation switched off
    specials: Specials
    tokenizer_notes: tuple[str, ...]  # what was changed in the shipped tokenizer.json

    @property
    def tokenizer_kind(self) -> str:
        return tokenizer_kind(self.tokenizer)

    def state(self) -> dict[str, torch.Tensor]:
        return W.read_state_dict(self.files.weights)

    def checked_state(
        self,
    ) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, Any] | None]:
        """The weights, checked strictly against the config (every tensor present, of its
        shape, finite: ValueError naming each one otherwise), the optional heads they carry
        ({'pooler': bool, 'mlm': bool, 'classifier': bool}) and what the classifier predicts
        (classify.head_info; None without one)."""
        state, source = self.state(), str(self.files.weights)
        heads = W.heads_present(state, self.config)
        raw, rows = self.config.to_dict(), W.classifier_rows(state, self.config)
        head = task_head(raw, rows, str(self.files.config))
        kind = None if head is None else head.kind
        W.convert(state, self.config, heads["pooler"], heads["mlm"], source, classifier=kind)
        return state, heads, head_info(head)


def open_checkpoint(
    source: str | Path,
    variant: str | None = None,
    lowercase: bool | None = None,
    revision: str | None = None,
    config_path: str | Path | None = None,
    casing_required: bool = True,
    verify: bool = True,
    offline: bool = False,
) -> Checkpoint:
    """Resolve a source (local dir, weights file, hub id), read and check its config against
    the variant, settle casing, build the tokenizer and find its special tokens.

    casing_required=False (inspect): a vocab-only checkpoint of unknown casing opens with
    `lowercase=None` (its tokenizer built cased, for looking at, not for encoding).
    verify: a prepared dir's files must match the sha256s of its manifest (ValueError naming
    the file, expected and actual digest), so corrupt weights never load.
    offline: a hub id opens only from the local cache (FileNotFoundError otherwise)."""
    path, provenance = resolve(source, revision, cached_only=offline)
    files = find_files(path, config_path)
    if verify and (problems := integrity_problems(files.root, files.manifest)):
        raise ValueError(
            f"{files.root}: files do not match {MANIFEST} (corrupted or changed since "
            "prepare; prepare it again): " + capped(problems, "; ")
        )
    config = architectures.config_from_file(files.config)
    manifest = files.manifest or {}
    v = get_variant(variant or manifest.get("variant") or "custom")
    check_config(v, config)
    own = read_tokenizer(files.tokenizer) if files.tokenizer else None
    unknown = not casing_required and own is None and lowercase is v.lowercase is None
    casing = None if unknown else resolve_casing(v, lowercase, own)
    notes, specials = _from_manifest(manifest, files.root / MANIFEST)
    if own is not None:
        tok, removed = without_padding_and_truncation(own)
        notes += removed
        tok = with_casing(tok, casing)
    else:
        assert files.vocab is not None
        tok = wordpiece_from_vocab(files.vocab, bool(casing))
    if specials is None:
        config_ids = architectures.of(config).special_ids(config)
        specials = find_specials(tok, files.tokenizer_config(), config_ids)
    return Checkpoint(files, provenance, v, config, casing, tok, specials, tuple(notes))


def _from_manifest(manifest: dict[str, Any], path: Path) -> tuple[list[str], Specials | None]:
    """A prepared dir's tokenizer notes and special token ids (None: not recorded)."""
    notes, specials = manifest.get("tokenizer_notes", []), manifest.get("specials")
    if not isinstance(notes, list) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"{path}: tokenizer_notes must be a list of strings, got {shown(notes)}")
    try:
        return list(notes), None if specials is None else Specials(**specials)
    except TypeError:
        raise ValueError(
            f"{path}: specials must be {{'cls': id, 'sep': id, 'mask': id | null}}, "
            f"got {shown(specials)}"
        ) from None


@dataclass(frozen=True)
class ModelBundle:
    """A prepared model in memory: config, safetensors bytes, tokenizer, identity."""

    config: dict[str, Any]
    weights: bytes  # safetensors
    tokenizer_json: str
    specials: dict[str, int | None]
    variant: str
    lowercase: bool
    weights_sha256: str
    source: dict[str, Any]
    architecture: str  # config model_type: bert | modernbert
    tokenizer_kind: str  # WordPiece | BPE | ...
    heads: dict[str, bool]  # optional heads the weights carry: pooler, mlm, classifier
    classifier: dict[str, Any] | None = None  # what its classifier predicts (classifier_info)

    @classmethod
    def load(
        cls,
        source: str | Path,
        variant: str | None = None,
        lowercase: bool | None = None,
        revision: str | None = None,
    ) -> ModelBundle:
        ck = open_checkpoint(source, variant, lowercase, revision)
        state, heads, classifier = ck.checked_state()  # here, not in every actor
        if ck.files.weights.suffix == ".safetensors":
            blob = ck.files.weights.read_bytes()
        else:
            blob = save(W.dedupe(state, ck.config))
        del state
        return cls(
            config=ck.config.to_dict(),
            weights=blob,
            tokenizer_json=ck.tokenizer.to_str(),
            specials=ck.specials.to_dict(),
            variant=ck.variant.name,
            lowercase=ck.lowercase,
            weights_sha256=hashlib.sha256(blob).hexdigest(),
            source=ck.provenance,
            architecture=ck.config.model_type,
            tokenizer_kind=ck.tokenizer_kind,
            heads=heads,
            classifier=classifier,
        )

    def identity(self) -> dict[str, Any]:
        """What names this model in job records and output metadata."""
        return {
            "variant": self.variant, "architecture": self.architecture,
            "tokenizer": self.tokenizer_kind, "weights_sha256": self.weights_sha256,
            "lowercase": self.lowercase, "source": self.source,
        }  # fmt: skip


def prepare(
    source: str | Path,
    out_dir: str | Path,
    variant: str | None = None,
    lowercase: bool | None = None,
    revision: str | None = None,
) -> Path:
    """Write a self-contained model dir; idempotent (same source and files: nothing rewritten)."""
    out = Path(out_dir)
    ck = open_checkpoint(source, variant, lowercase, revision)
    state, heads, _ = ck.checked_state()
    identity = {
        "variant": ck.variant.name,
        "lowercase": ck.lowercase,
        "source": ck.provenance,
        "source_weights_sha256": sha256_file(ck.files.weights),
    }
    old = out / MANIFEST
    if old.is_file():
        manifest = read_json_object(old)
        same = {k: manifest.get(k) for k in identity} == identity
        if same and manifest.get("files") and not integrity_problems(out, manifest):
            log.info("%s is already prepared from the same source; nothing to do", out)
            return out
    for note in ck.tokenizer_notes:
        log.info("tokenizer.json: %s", note)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(W.dedupe(state, ck.config), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(ck.config.to_dict(), indent=2) + "\n")
        ck.tokenizer.save(str(tmp / "tokenizer.json"))
        if ck.files.vocab is not None:
            shutil.copyfile(ck.files.vocab, tmp / "vocab.txt")
        manifest = {
            **identity,
            "format_version": 2,
            "architecture": ck.config.model_type,
            "tokenizer": ck.tokenizer_kind,
            "tokenizer_notes": list(ck.tokenizer_notes),
            "specials": ck.specials.to_dict(),
            "heads": heads,
            "parameters": sum(t.numel() for t in W.dedupe(state, ck.config).values()),
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


def integrity_problems(
    root: Path, manifest: dict[str, Any] | None, digests: dict[str, str] | None = None
) -> list[str]:
    """One line per file the manifest lists that is missing or has another sha256
    (`digests`: the files' sha256s when the caller has them already). A listed name that is
    not a plain relative path, or a file that links outside `root`, is a ValueError naming it."""
    files = (manifest or {}).get("files") or {}
    check_manifest_files(files, root / MANIFEST)
    problems = []
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name}: missing")
            continue
        check_inside(path, root)
        if (actual := (digests or {}).get(name) or sha256_file(path)) != digest:
            expected = digest if isinstance(digest, str) and len(digest) == 64 else shown(digest)
            problems.append(f"{name}: sha256 {actual}, the manifest expects {expected}")
    return problems
