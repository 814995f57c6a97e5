"""Listing a corpus: its spec paths (files, dirs, globs, URIs) as Sources, in plan order.

A dir or glob never reads a dir a clinicalbert job writes (an output or staging dir) as notes.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

import pyarrow.fs as pa_fs

from ..fs import as_uri, filesystem
from ..spec import CorpusSpec, has_glob
from .formats import FORMATS
from .staging import STAGING_MARKER
from .units import Source

# Files that mark a dir a job writes (output.LOCK_FILE and META_FILES' _job.json; the marker):
# a corpus dir or glob never reads such a dir as notes.
OWN_DIR_MARKERS = ("_job.json", "_lock.json", STAGING_MARKER)


def list_sources(corpus: CorpusSpec, shard_rows: int) -> list[Source]:
    """The corpus's inputs in plan order; text files (a format with one note per file) are
    grouped `shard_rows` to a Source."""
    note_per_file = FORMATS[corpus.format].NOTE_PER_FILE
    seen: set[str] = set()
    sources: list[Source] = []
    for spec_path in corpus.paths:
        base, files = _expand(spec_path)
        files = [f for f in files if f.path not in seen]
        seen.update(f.path for f in files)
        if not note_per_file:
            sources += [
                Source(as_uri(spec_path, f.path), f.size, f.mtime_ns, (), _relative(base, f.path))
                for f in files
            ]
            continue
        rel = [(_relative(base, f.path), f.size, f.mtime_ns) for f in files]
        name = os.path.basename(base.rstrip("/"))
        for i in range(0, len(rel), shard_rows):
            chunk = tuple(rel[i : i + shard_rows])
            size = sum(s for _, s, _ in chunk)
            sources.append(Source(as_uri(spec_path, base), size, None, chunk, name))
    return sources


@dataclass(frozen=True)
class _File:
    path: str  # path within the file system
    size: int
    mtime_ns: int | None


def _expand(spec_path: str) -> tuple[str, list[_File]]:
    """(base dir, files) for a file, dir (recursive) or glob; files sorted, base in fs terms."""
    fs, path = filesystem(spec_path)
    if has_glob(path):
        parts = path.split("/")
        fixed = next(i for i, p in enumerate(parts) if has_glob(p))
        base = "/".join(parts[:fixed]) or "/"
        recursive = "**" in parts or len(parts) - fixed > 1
        infos = _list(fs, base, recursive) if _is_dir(fs, base) else []
        files = [i for i in _not_in_own_dirs(infos) if _glob_match(parts, i.path.split("/"))]
        if not files:
            raise ValueError(f"corpus path {spec_path!r} matches no file")
        return base, files
    info = fs.get_file_info(path)
    if info.type == pa_fs.FileType.Directory:
        listed = _list(fs, path)
        if _own_dirs(listed) & {path.rstrip("/")}:
            raise ValueError(
                f"corpus path {spec_path!r} is an output or staging dir of a clinicalbert job "
                f"(it holds {' or '.join(OWN_DIR_MARKERS)}), not notes"
            )
        files = [f for f in _not_in_own_dirs(listed) if not _hidden(_relative(path, f.path))]
        return path, files
    if info.type == pa_fs.FileType.File:
        return os.path.dirname(path), [_File(info.path, info.size, info.mtime_ns)]
    raise ValueError(f"corpus path {spec_path!r} does not exist")


def _own_dirs(files: list[_File]) -> set[str]:
    """The dirs among these files' parents that a job writes: output dirs (`_job.json`,
    `_lock.json`) and staging dirs (STAGING_MARKER)."""
    return {f.path.rsplit("/", 1)[0] for f in files if f.path.rsplit("/", 1)[-1] in OWN_DIR_MARKERS}


def _not_in_own_dirs(files: list[_File]) -> list[_File]:
    """The files outside every job's output and staging dirs: a corpus dir that holds a
    job's output (`output.path: notes/embedded`) never reads it back as notes."""
    own = tuple(d + "/" for d in _own_dirs(files))
    return [f for f in files if not f.path.startswith(own)] if own else files


def _is_dir(fs: pa_fs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pa_fs.FileType.Directory


def _list(fs: pa_fs.FileSystem, base: str, recursive: bool = True) -> list[_File]:
    infos = fs.get_file_info(pa_fs.FileSelector(base, recursive=recursive))
    files = [_File(i.path, i.size, i.mtime_ns) for i in infos if i.type == pa_fs.FileType.File]
    return sorted(files, key=lambda f: f.path)


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _glob_match(pattern: list[str], parts: list[str]) -> bool:
    """Component-wise glob: `*`, `?`, `[..]` stay within one component; `**` spans any number."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _glob_match(pattern[1:], parts[1:])
    )


def _relative(base: str, path: str) -> str:
    return path[len(base) :].lstrip("/") if path.startswith(base) else os.path.basename(path)
