"""The output dir: layout, resume state, atomic writes, reading the output back.

    <out>/part-<shard>.parquet           one per shard: rows keyed by note id
    <out>/_errors/part-<shard>.parquet   only for shards with bad rows: id, shard, row, reason
    <out>/_job.json  _report.json  _SUCCESS (last)

Everything but the parts has a name dataset discovery skips (leading `_` or `.`), so pandas,
pyarrow, polars and duckdb read exactly the output rows. No note text is ever written here
(staged inputs live outside, see JobSpec.staging_dir).

Part files (writing, committing, reading one) are parts.py's; the lock is lock.py's. Every
file here is written by `fs.write_atomic`. Paths are local paths or URIs (`pyarrow.fs`).
No Ray here.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import parts
from .fs import TMP_PREFIX, delete, filesystem, names, write_atomic
from .objectstore import abort_uploads
from .parts import ERRORS_DIR, PART_PREFIX, PartWriter

META_FILES = ("_job.json", "_report.json", "_SUCCESS", "_ids.json")
LOCK_FILE = "_lock.json"


def foreign_problem(uri: str, foreign: list[str]) -> str:
    """The one line refusing an output dir that holds files no job of ours wrote."""
    return (f"output dir {uri} holds {len(foreign):,} file(s) no job of clinicalbert wrote "
            f"(e.g. {foreign[0]!r}): a reader of the dir (pd.read_parquet) would mix them with "
            "the output. Use an empty or new output.path (--overwrite deletes only a job's own "
            "files)")  # fmt: skip


DISTRIBUTION = "clinicalbert-jobs"
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
_OTHER_PATH = "use another output.path, or --overwrite"


def package_version() -> str:
    """This project's version: from the pyproject.toml beside the code (a checkout, or the
    `--working-dir` upload of `ray job submit`, where nothing is installed), else from the
    installed distribution, else "0+unknown"."""
    if _PYPROJECT.is_file():
        project = tomllib.loads(_PYPROJECT.read_text()).get("project", {})
        if project.get("name") == DISTRIBUTION and "version" in project:
            return str(project["version"])
    try:
        return importlib_metadata.version(DISTRIBUTION)
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def should_resume(
    uri: str,
    job: Any,
    committed: set[str],
    spec_hash: str,
    weights_sha256: str | None,
    overwrite: bool,
) -> bool:
    """The resume decision (pure). `job`: the old `_job.json` content (None when absent), or
    {} for an unreadable one `overwrite` replaces; `committed`: the shards with a part file.
    True: resume (same spec hash and model weights: nothing deleted). False: start over
    (delete the output): `overwrite`, or a dir whose earlier run committed no part, which is
    simply taken over. ValueError: another spec's (or other weights') committed output."""
    if job is not None and not isinstance(job, dict):
        if not overwrite:
            raise ValueError(f"{uri}/_job.json is not a JSON object; {_OTHER_PATH}")
        job = {}  # unreadable: another job's, replaced
    had, has = _weights((job or {}).get("spec", {})), weights_sha256
    same_spec = job is not None and job.get("spec_hash") == spec_hash
    if same_spec and not (had and has and had != has) and not overwrite:
        return True
    if committed and not overwrite:  # a start that committed nothing blocks no corrected spec
        if same_spec:
            why = f"was written with model weights sha256 {had}; this run's model has {has}"
        else:
            have = f"spec hash {job.get('spec_hash')}" if job else "no _job.json"
            why = f"holds another job's output ({have}, {len(committed)} part files); this "
            why += f"spec's hash is {spec_hash}"
        raise ValueError(
            f"output dir {uri} {why}. Use another output.path, or --overwrite to delete that output"
        )
    return False


class OutputDir:
    """A job's output dir (local path or URI): paths, resume state, atomic writes, reading."""

    def __init__(self, path: str):
        self.uri = path.rstrip("/") or path
        self.fs, root = filesystem(path)
        self.root = root.rstrip("/") or root

    # ---- paths -----------------------------------------------------------------------------
    def join(self, *sub: str) -> str:
        """Path (within `fs`) of `sub` (names, outermost first) inside the output dir."""
        return "/".join([self.root, *sub])

    def part_path(self, shard_id: str) -> str:
        """Path (within `fs`) of a shard's part file."""
        return parts.part_path(self.root, shard_id)

    def errors_path(self, shard_id: str) -> str:
        """Path (within `fs`) of a shard's errors part."""
        return parts.errors_path(self.root, shard_id)

    # ---- state -----------------------------------------------------------------------------
    def _names(self, sub: str = "") -> list[str]:
        return names(self.fs, self.join(sub) if sub else self.root)

    def committed(self) -> set[str]:
        """Shard ids whose part file is present under its final name (temp files ignored)."""
        return {s for s in map(parts.shard_of, self._names()) if s is not None}

    def foreign(self) -> list[str]:
        """Names in the dir that no job of ours writes and that readers of the dir take as
        data (names starting with '_' or '.' are skipped by Parquet dataset readers)."""
        return sorted(
            n for n in self._names() if parts.shard_of(n) is None and not n.startswith(("_", "."))
        )

    def check_spec(self, spec_hash: str, resolved: dict[str, Any], overwrite: bool) -> None:
        """Resume (same spec hash: nothing deleted), refuse (another spec's committed output:
        ValueError), or with `overwrite` delete the output and start over (same spec too).
        A dir whose earlier run committed no part is simply taken over. Writes `_job.json`;
        makes `_errors/` (empty until a shard has bad rows: its readers then read no rows
        instead of failing). The decision is `should_resume`'s."""
        self.fs.create_dir(self.root, recursive=True)
        if foreign := self.foreign():
            raise ValueError(foreign_problem(self.uri, foreign))
        try:
            job = self.read_json("_job.json")
        except ValueError as e:
            if not overwrite:
                raise ValueError(f"{e}; {_OTHER_PATH}") from e
            job = {}  # unreadable: another job's, replaced below
        if should_resume(self.uri, job, self.committed(), spec_hash, _weights(resolved), overwrite):
            self.clean_temp()  # resume
        else:
            self.clear()
            self.clean_temp()
            self.write_json("_job.json", {"spec_hash": spec_hash, "spec": resolved})
        self.fs.create_dir(self.join(ERRORS_DIR), recursive=True)

    def clear(self) -> None:
        """Delete a previous job's outputs: parts, errors, temp files, _job/_report/_SUCCESS."""
        for name in self._names():
            if name.startswith((PART_PREFIX, TMP_PREFIX)) or name in META_FILES:
                delete(self.fs, self.join(name))
        with suppress(FileNotFoundError):
            self.fs.delete_dir(self.join(ERRORS_DIR))

    def clean_temp(self) -> None:
        """Delete what crashed writers left: temp files, incomplete multipart uploads (object
        stores), and errors parts of shards that never committed. Only while no writer runs
        (check_spec calls it before a run starts)."""
        for name in self._names():
            if name.startswith(TMP_PREFIX):
                delete(self.fs, self.join(name))
        abort_uploads(self.uri)
        committed = self.committed()
        for name in self._names(ERRORS_DIR):
            shard = parts.shard_of(name)
            if name.startswith(TMP_PREFIX) or (shard is not None and shard not in committed):
                delete(self.fs, self.join(ERRORS_DIR, name))

    # ---- writing ---------------------------------------------------------------------------
    @contextmanager
    def part_writer(
        self, shard_id: str, schema: pa.Schema, meta: dict[str, str]
    ) -> Iterator[PartWriter]:
        """A PartWriter (its part's metadata: `meta`, this package's version, the shard) whose
        temp file is removed unless `commit` was called."""
        meta = {**meta, "version": package_version()}
        with parts.part_writer(self.fs, self.root, shard_id, schema, meta) as writer:
            yield writer

    def write_part(
        self, shard_id: str, table: pa.Table, errors: pa.Table | None, metadata: dict[str, str]
    ) -> None:
        """Commit a whole shard at once: errors part (if rows), then the part file."""
        with self.part_writer(shard_id, table.schema, metadata) as writer:
            writer.write(table)
            writer.commit(errors)

    def write_json(self, name: str, obj: Any) -> None:
        """Write `<out>/<name>` atomically as indented JSON."""
        data = (json.dumps(obj, indent=2, default=str) + "\n").encode()
        write_atomic(self.fs, self.join(name), lambda sink: sink.write(data))

    def read_json(self, name: str) -> Any:
        """`<out>/<name>` parsed, or None when absent; ValueError when it is not JSON."""
        try:
            with self.fs.open_input_stream(self.join(name)) as f:
                data = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.uri}/{name} is not valid JSON: {e}") from e

    def mark_success(self) -> None:
        """Write `_SUCCESS` (last, once every shard is committed)."""
        write_atomic(self.fs, self.join("_SUCCESS"), lambda sink: sink.write(b""))

    # ---- reading ---------------------------------------------------------------------------
    def part_metadata(self, shard_id: str) -> dict[str, str]:
        """A committed part's key-value metadata (footer only; Arrow's own keys left out)."""
        return parts.part_metadata(self.fs, self.part_path(shard_id))

    def shard_stats(self, shard_id: str) -> dict[str, Any]:
        """The counts a committed shard's writer recorded (see parts.shard_stats)."""
        return parts.shard_stats(self.fs, self.part_path(shard_id))

    def read_table(self) -> pa.Table | None:
        """All committed parts as one table (shard id order), or None when none is committed."""
        return parts.read_parts(self.fs, [self.part_path(s) for s in sorted(self.committed())])

    def read_errors(self) -> pa.Table | None:
        """Errors parts of committed shards as one table, or None when there are none."""
        shards = set(self._names(ERRORS_DIR))
        paths = [
            self.errors_path(s) for s in sorted(self.committed()) if parts.part_name(s) in shards
        ]
        return parts.read_parts(self.fs, paths)


def _weights(resolved: dict[str, Any]) -> str | None:
    return (resolved.get("model_identity") or {}).get("weights_sha256")
