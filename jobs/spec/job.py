"""The whole job spec (`JobSpec`): its sections, cross-section checks, spec hash and JSON
Schema."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from clinicalbert_core.limits import (
    batch_tokens_problem,
)
from clinicalbert_core.variants import VARIANTS

from .corpus import CorpusSpec
from .fields import _fail, _Section, mount_free
from .sections import HeadsSpec, ModelSpec, OutputSpec, PoolSpec, RunSpec

# Fields that do not change what the job writes; left out of `spec_hash`.
HASH_EXCLUDED = (
    ("device_pool",),
    ("output", "path"),
    ("output", "mode"),
    ("run", "max_shard_attempts"),
    ("run", "batch_rows"),
    ("run", "batch_bytes"),
    ("run", "dry_run_notes"),
    ("run", "progress_interval_s"),
    ("run", "stall_timeout_s"),
    ("run", "staging_dir"),
    ("run", "keep_staged"),
    ("run", "allow_empty"),
    ("run", "allow_duplicate_ids"),
)


# Fields added after outputs were written: while unset (null) they are left out of the hash,
# so those outputs still resume under the same spec.
HASH_WHEN_SET = (("heads", "classify"), ("heads", "tokens"))


class JobSpec(_Section):
    """A ClinicalBERT batch job: corpus in, Parquet out."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="Job name ([A-Za-z0-9._-]+).")
    corpus: CorpusSpec
    model: ModelSpec
    heads: HeadsSpec = Field(default_factory=HeadsSpec)
    device_pool: tuple[PoolSpec, ...] = Field(
        strict=False, description="Actor pools (at least one, unique names)."
    )
    output: OutputSpec
    run: RunSpec = Field(default_factory=RunSpec)

    @field_validator("device_pool", mode="before")
    @classmethod
    def _some_pools(cls, pools: Any) -> Any:
        if isinstance(pools, list | tuple) and not pools:
            raise ValueError("give at least one pool")
        return pools

    @model_validator(mode="after")
    def _pools(self) -> JobSpec:
        names: set[str] = set()
        staging = self.staging_dir().partition("?")[0].rstrip("/") + "/"
        if staging.startswith(self.output.path.partition("?")[0].rstrip("/") + "/"):
            raise _fail(
                "must not be inside output.path (staged files hold note text)",
                "run.staging_dir",
                self.run.staging_dir,
            )
        for i, pool in enumerate(self.device_pool):
            if pool.name in names:
                raise _fail("duplicate pool name", f"device_pool[{i}].name", pool.name)
            names.add(pool.name)
            if problem := batch_tokens_problem(pool.batch_tokens, self.model.max_seq, spec=True):
                raise _fail(problem, f"device_pool[{i}].batch_tokens", pool.batch_tokens)
        return self

    @model_validator(mode="before")
    @classmethod
    def _classify_default(cls, data: Any) -> Any:
        """heads.classify.aggregate left unset: none where the output has a row per window
        (model.long_notes.aggregate none), else mean."""
        heads = data.get("heads") if isinstance(data, dict) else None
        classify = heads.get("classify") if isinstance(heads, dict) else None
        if isinstance(classify, dict) and classify.get("aggregate") is None:
            model = data.get("model")
            long = model.get("long_notes") if isinstance(model, dict) else None
            windows = isinstance(long, dict) and long.get("aggregate") == "none"
            classify = {**classify, "aggregate": "none" if windows else "mean"}
            data = {**data, "heads": {**heads, "classify": classify}}
        return data

    @model_validator(mode="after")
    def _classify_rows(self) -> JobSpec:
        """A part has one row per note, or per window (model.long_notes.aggregate none): the
        classifier's aggregate must agree."""
        classify, windows = self.heads.classify, self.model.long_notes.aggregate == "none"
        if classify is not None and (classify.aggregate == "none") != windows:
            rows = "per window" if windows else "per note"
            raise _fail(f"the output has one row {rows} (model.long_notes.aggregate "
                        f"{self.model.long_notes.aggregate}): use "
                        f"{'none' if windows else 'mean, max, first or huang'}",
                        "heads.classify.aggregate", classify.aggregate)  # fmt: skip
        if self.heads.tokens is not None and windows:
            raise _fail("entities are the whole note's (offsets into it, stitched over its "
                        "windows): heads.tokens needs one row per note (model.long_notes."
                        "aggregate mean or first)", "heads.tokens", "set")  # fmt: skip
        return self

    def staging_dir(self) -> str:
        """run.staging_dir, or the default beside the output: '<output.path>.staging'."""
        if self.run.staging_dir:
            return self.run.staging_dir
        path, sep, query = self.output.path.partition("?")  # s3://b/out?endpoint_override=..
        return path.rstrip("/") + ".staging" + sep + query

    def resolved_json(self) -> dict[str, Any]:
        """The spec with every default filled in and paths resolved, as JSON-ready data."""
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        """sha256 of the canonical JSON of the fields that change the output (see HASH_EXCLUDED).
        Corpus paths count without their mount point (`/mnt/a/notes/*.parquet` and
        `s3://b/notes/*.parquet` are both `notes/*.parquet`): moving the archive is the same job."""
        data = self.resolved_json()
        data["corpus"]["paths"] = [mount_free(p) for p in data["corpus"]["paths"]]
        for path in HASH_EXCLUDED:
            node = data
            for key in path[:-1]:
                node = node[key]
            node.pop(path[-1])
        for section, key in HASH_WHEN_SET:  # heads added later: off, the hash is as before
            if data[section][key] is None:
                del data[section][key]
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


def json_schema() -> dict[str, Any]:
    """The JSON Schema of JobSpec (for editors validating YAML specs)."""
    schema = JobSpec.model_json_schema()
    schema["$defs"]["ModelSpec"]["properties"]["variant"]["enum"] = list(VARIANTS)
    return schema
