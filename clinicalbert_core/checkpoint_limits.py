"""How big a checkpoint may be, and where its files may live: every bound in one place.

A checkpoint is input like any other: a config that claims 10^40 layers, a 4 GiB vocab.txt, a
safetensors header of a million entries or a manifest naming `../../etc/passwd` must fail in
a second, in one line naming the file and the limit, before anything is read, parsed, built
or enumerated. The bounds sit far above real encoders (bert-base: 12 layers, hidden 768, vocab
30,522, ~200 tensors; ModernBERT-large: 28 layers, hidden 1024, 8,192 positions) and above
most large models too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

MiB = 1 << 20

# config.json fields that size tensors or loops: each, where present, a positive int <= this
MAX_CONFIG_SIZES: dict[str, int] = {
    "num_hidden_layers": 256,
    "hidden_size": 16_384,
    "num_attention_heads": 256,
    "intermediate_size": 131_072,
    "vocab_size": 1_000_000,
    "max_position_embeddings": 1_048_576,
    "type_vocab_size": 1_024,
    "num_labels": 100_000,
}
# file sizes, checked by stat before a file is read (32 MiB of tokenizer.json opens in ~4 s,
# ~700 MB; bert-base's is 0.5 MB, ModernBERT's 2 MB, XLM-R's 17 MB)
MAX_JSON_BYTES = 1 * MiB  # config.json, tokenizer_config.json, special_tokens_map.json, manifest
MAX_TOKENIZER_JSON_BYTES = 32 * MiB
MAX_VOCAB_TXT_BYTES = 16 * MiB  # and at most MAX_CONFIG_SIZES["vocab_size"] lines
# safetensors: its header is ~100-150 bytes per tensor (bert-base: ~200 tensors, ~25 KB)
MAX_SAFETENSORS_HEADER_BYTES = 16 * MiB
MAX_TENSORS = 10_000
MAX_MANIFEST_FILES = 64  # a prepared dir's manifest lists ~5
MAX_LISTED = 20  # names an error lists before "... and N more"
MAX_SHOWN_VALUE = 200  # characters of a value an error quotes


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB and n % (MiB // 16) == 0 else f"{n:,} bytes"


def shown(value: Any) -> str:
    """repr(value), cut to MAX_SHOWN_VALUE characters: what an error may quote of input."""
    text = repr(value)
    return text if len(text) <= MAX_SHOWN_VALUE else text[: MAX_SHOWN_VALUE - 3] + "..."


def capped(items: Sequence[str], sep: str = ", ", limit: int = MAX_LISTED) -> str:
    """The first `limit` items joined, and how many more there are: `a, b, ... and 1,234 more`."""
    rest = len(items) - limit
    return sep.join(items[:limit]) + (f"{sep}... and {rest:,} more" if rest > 0 else "")


def check_file_size(path: Path, limit: int, what: str) -> None:
    """ValueError naming `path` and the limit when the file (symlinks followed) is larger."""
    size = path.stat().st_size
    if size > limit:
        raise ValueError(
            f"{path}: {size:,} bytes, over the {_size(limit)} limit for {what} "
            "(clinicalbert_core.checkpoint_limits)"
        )


def check_config_sizes(raw: dict[str, Any], source: str) -> None:
    """Every size field `raw` sets is a positive int within MAX_CONFIG_SIZES: checked on the
    raw dict, before any architecture reads, allocates or enumerates anything from it."""
    for name, limit in MAX_CONFIG_SIZES.items():
        value = raw.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise ValueError(
                f"{source}: {name} must be a positive integer of at most {limit:,} "
                f"(clinicalbert_core.checkpoint_limits), got {shown(value)}"
            )


def check_safetensors_header(length: int, name: str) -> None:
    """The header's byte length (its first 8 bytes), before the header is read."""
    if length > MAX_SAFETENSORS_HEADER_BYTES:
        raise ValueError(
            f"{name}: safetensors header of {length:,} bytes, over the "
            f"{_size(MAX_SAFETENSORS_HEADER_BYTES)} limit (clinicalbert_core.checkpoint_limits)"
        )


def check_tensor_count(count: int, name: str) -> None:
    """The entries of a parsed safetensors header, before any tensor is made from them."""
    if count > MAX_TENSORS:
        raise ValueError(
            f"{name}: {count:,} tensors, over the limit of {MAX_TENSORS:,} "
            "(clinicalbert_core.checkpoint_limits)"
        )


def check_manifest_files(files: Any, manifest: Path) -> None:
    """A manifest's `files`: an object of at most MAX_MANIFEST_FILES entries, each named by
    a plain relative path (`check_manifest_name`)."""
    if not isinstance(files, dict):
        raise ValueError(f"{manifest}: files must map file names to sha256s, got {shown(files)}")
    if len(files) > MAX_MANIFEST_FILES:
        raise ValueError(
            f"{manifest}: {len(files):,} files listed, over the limit of {MAX_MANIFEST_FILES} "
            "(clinicalbert_core.checkpoint_limits)"
        )
    for name in files:
        check_manifest_name(name, manifest)


def check_manifest_name(name: Any, manifest: Path) -> None:
    """A manifest's file entry is a plain relative path inside the model dir: no absolute
    path, no `..`, `.` or empty part, no backslash."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not parts
        or "\\" in name
        or PurePosixPath(name).is_absolute()
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(
            f"{manifest}: file entry {shown(name)} is not a plain relative path inside the "
            "model dir"
        )


def check_inside(path: Path, root: Path) -> None:
    """`path` (a file of the model dir `root`) resolves, symlinks followed, inside `root`, or,
    when `root` is a Hugging Face cache snapshot (`models--org--name/snapshots/<rev>/`, every
    file a link to `../../blobs/<sha>`), inside that repo's `blobs/`."""
    real, home = path.resolve(), root.resolve()
    allowed = [home]
    snapshots = home.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        allowed.append(snapshots.parent / "blobs")
    if not any(real.is_relative_to(a) for a in allowed):
        raise ValueError(
            f"{path}: links to {real}, outside the model dir {home}; a model file may only "
            "link inside its dir (or a hub snapshot's blobs/)"
        )
