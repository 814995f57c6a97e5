"""File systems and the one atomic writer.

Paths are local paths or URIs `pyarrow.fs` understands (s3://, gs://, file://). Every file the
jobs write under a final name (staged inputs, part files, errors parts, _job.json, _report.json,
_SUCCESS, the lock on object stores) is written by `write_atomic`: streamed to a temporary name
beside it (`TMP_PREFIX`), then renamed, so a crash never leaves a partial file under a final
name. No Ray here.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import pyarrow as pa
import pyarrow.fs as pa_fs

TMP_PREFIX = ".tmp-"  # a writer's temporary file: hidden from dataset discovery, cleaned later


@contextmanager
def private_files(dir_mode: int) -> Iterator[None]:
    """Everything this process creates meanwhile on local disk gets `dir_mode` (dirs) or it
    without the x bits (files): 0o700 keeps note-derived data (parts, errors, reports, staged
    copies of the notes) to the owner. Object stores have their own access rules."""
    old = os.umask(0o777 & ~dir_mode)
    try:
        yield
    finally:
        os.umask(old)


def current_umask() -> int:
    """This process's umask (to give Ray tasks the driver's)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def is_uri(path: str) -> bool:
    """True for `scheme://...` paths (s3, gs, file, ...), which are not resolved or checked."""
    return "://" in path


def filesystem(path: str) -> tuple[pa_fs.FileSystem, str]:
    """The pyarrow file system for a local path or URI, and the path within it."""
    return pa_fs.FileSystem.from_uri(path if is_uri(path) else os.path.abspath(path))


def join(directory: str, name: str) -> str:
    """`name` inside `directory` (a local path, a URI, or a path within a file system); a URI's
    query (`?endpoint_override=...&scheme=http`) stays at its end, so the path reaches the same
    store."""
    if not is_uri(directory):
        return os.path.join(directory, name)
    base, sep, query = directory.partition("?")
    return f"{base.rstrip('/')}/{name}{sep}{query}"


def as_uri(spec_uri: str, fs_path: str) -> str:
    """A path within `spec_uri`'s file system as a path `filesystem` accepts: for a URI, with
    its scheme, credentials and query (endpoint, scheme, region) kept."""
    if not is_uri(spec_uri):
        return fs_path
    base, sep, query = spec_uri.partition("?")
    _, inner = pa_fs.FileSystem.from_uri(spec_uri)
    prefix = base[: len(base) - len(inner)] if inner and base.endswith(inner) else None
    return (prefix or base.split("://", 1)[0] + "://") + fs_path + sep + query


def temp_path(path: str) -> str:
    """A fresh temporary name beside `path` (same dir, so the final rename stays in place)."""
    parent, _, name = path.rpartition("/")
    return f"{parent}/{TMP_PREFIX}{name}-{uuid.uuid4().hex}"


def write_atomic(fs: pa_fs.FileSystem, path: str, write: Callable[[pa.NativeFile], Any]) -> None:
    """`write(stream)` into a temporary file beside `path`, then rename it to `path`; on any
    error (Ctrl-C too) the temporary file is removed and nothing appears under `path`."""
    parent = path.rpartition("/")[0]
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = temp_path(path)
    try:
        with fs.open_output_stream(tmp) as sink:
            write(sink)
        fs.move(tmp, path)
    except BaseException:
        delete(fs, tmp)
        raise


def delete(fs: pa_fs.FileSystem, path: str) -> None:
    """Remove a file; one that is already gone is fine."""
    with suppress(FileNotFoundError):
        fs.delete_file(path)


def names(fs: pa_fs.FileSystem, directory: str) -> list[str]:
    """The base names in `directory` ([] when it does not exist)."""
    try:
        infos = fs.get_file_info(pa_fs.FileSelector(directory, allow_not_found=True))
    except FileNotFoundError:
        return []
    return [i.base_name for i in infos]
