"""The YAML job spec: typed, validated before any work, every error naming its field path.

`load_spec(path)` reads a YAML file, `parse_spec(data, base_dir)` a dict; both return a frozen
`JobSpec` or raise `SpecError` with one line per problem (`file: field.path: what (got value)`).
Relative paths resolve against the spec file's directory; URIs (`s3://`, `gs://`, `file://`)
are kept as given. `json_schema()` is the published JSON Schema (`clinicalbert schema`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# Variant name -> hub id, used when clinicalbert_core cannot be imported (see `_variant_hubs`).
_FALLBACK_VARIANTS: dict[str, str | None] = {
    "huang_clinicalbert": None,
    "bio_clinicalbert": "emilyalsentzer/Bio_ClinicalBERT",
    "bio_discharge_summary_bert": "emilyalsentzer/Bio_Discharge_Summary_BERT",
    "clinical_modernbert": "Simonlee711/Clinical_ModernBERT",
    "bioclinical_modernbert_base": "thomas-sounack/BioClinical-ModernBERT-base",
    "bioclinical_modernbert_large": "thomas-sounack/BioClinical-ModernBERT-large",
    "modernbert_base": "answerdotai/ModernBERT-base",
    "custom": None,
}
# Column names the job reads or writes itself (every column a part file can have, for any
# heads); `keep_columns` may not use them.
RESERVED_COLUMNS = (
    "id", "text", "row_index", "embedding", "n_tokens", "n_windows", "truncated",
    "window_index", "char_start", "char_end", "mlm_window", "mlm_position", "mlm_char_start",
    "mlm_top_ids", "mlm_top_tokens", "mlm_top_logprobs",
)  # fmt: skip
# Fields that do not change what the job writes; left out of `spec_hash`.
HASH_EXCLUDED = (
    ("device_pool",),
    ("output", "path"),
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
_VALUE_CHARS = 80
STRIDE = 128  # default long_notes.stride (clinicalbert_core.tokenizer.STRIDE)


class SpecError(ValueError):
    """An invalid job spec; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _fail(reason: str, sub: str = "", value: Any = ...) -> PydanticCustomError:
    """An error for a cross-field check; `sub` extends the field path, `value` is the bad value."""
    ctx: dict[str, Any] = {"reason": reason, "sub": sub}
    if value is not ...:
        ctx["value"] = value
    return PydanticCustomError("spec", "{reason}", ctx)


def is_uri(path: str) -> bool:
    """True for `scheme://...` paths (s3, gs, file, ...), which are not resolved or checked."""
    return "://" in path


def has_glob(path: str) -> bool:
    """True when a path holds glob characters (`*`, `?`, `[`)."""
    return any(c in path for c in "*?[")


def mount_free(path: str) -> str:
    """A corpus path without where it is mounted: its last component, or from the component
    before the first glob on (`/mnt/a/notes/*.csv.gz` -> `notes/*.csv.gz`)."""
    parts = [p for p in path.split("://", 1)[-1].split("/") if p]
    first_glob = next((i for i, p in enumerate(parts) if has_glob(p)), None)
    if first_glob is None:
        return "/".join(parts[-1:])
    return "/".join(parts[max(first_glob - 1, 0) :])


def _resolve(path: str, info: ValidationInfo) -> str:
    """Resolve a relative local path against the spec's directory (from the validation context)."""
    base = (info.context or {}).get("base_dir")
    if is_uri(path) or base is None:
        return path
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _check_paths(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("check_paths"))


def _resolved_note(path: str, resolved: str) -> str:
    return "" if path == resolved else f" (resolved to {resolved!r})"


def _corpus_path(path: str, info: ValidationInfo) -> str:
    if not path:
        raise ValueError("must not be empty")
    fmt = info.data.get("format")
    if fmt == "parquet" and path.endswith(".gz"):
        raise ValueError("parquet inputs cannot be gzipped (Parquet compresses internally)")
    resolved = _resolve(path, info)
    if _check_paths(info) and not is_uri(resolved):
        if has_glob(resolved):
            if not glob.glob(resolved, recursive=True):
                raise ValueError("glob matches no file" + _resolved_note(path, resolved))
        elif not os.path.exists(resolved):
            raise ValueError("does not exist" + _resolved_note(path, resolved))
    return resolved


def _output_path(path: str, info: ValidationInfo) -> str:
    if not path:
        raise ValueError("must not be empty")
    return _resolve(path, info)


def _model_path(path: str, info: ValidationInfo) -> str:
    if not path:
        raise ValueError("must not be empty")
    resolved = _resolve(path, info)
    if _check_paths(info) and not is_uri(resolved):
        if not os.path.exists(resolved):
            raise ValueError("does not exist" + _resolved_note(path, resolved))
        if os.path.isfile(resolved) and not resolved.endswith(".safetensors"):
            raise ValueError("a model file must be a .safetensors file (or give the model dir)")
    return resolved


CorpusPath = Annotated[str, AfterValidator(_corpus_path)]
ColumnName = Annotated[str, Field(min_length=1)]
Scalar = str | int | float | bool | None


class _Section(BaseModel):
    # strict: YAML already types its values; no "5" -> 5 or true -> 1 coercion.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CsvOptions(_Section):
    """CSV parsing options (format csv only)."""

    delimiter: str = Field(",", min_length=1, max_length=1, description="Field delimiter.")
    quote_char: str = Field('"', min_length=1, max_length=1, description="Quote character.")
    column_types: dict[
        str, Literal["string", "int64", "float64", "bool", "date32", "timestamp"]
    ] = Field(
        default_factory=dict,
        description="Pin column types instead of inferring them from the first 16 MiB "
        "(default {}). Columns inferred as all-null are read as string. Unquoted empty fields "
        'are null, a quoted "" is an empty string. The text column is always read as raw '
        "bytes, so undecodable notes reach the job as error rows instead of failing it.",
    )


class CorpusSpec(_Section):
    """Where the notes are and which columns to use."""

    format: Literal["parquet", "jsonl", "csv", "text"] = Field(
        description="Input format. jsonl/csv/text inputs may be compressed (.gz); they are "
        "staged once into Parquet under the output dir before sharding."
    )
    paths: tuple[CorpusPath, ...] = Field(
        strict=False,
        description="Files, directories (recursive; names starting with '.' or '_' are skipped), "
        "globs, or URIs pyarrow.fs understands (s3://, gs://, file://). Relative paths resolve "
        "against the spec file's directory. For format text: directories of one note per file.",
    )
    id_column: ColumnName = Field(
        "id",
        description="Note id column (default 'id'), copied to the output with its type. For "
        "format text the id is the file's path relative to the given directory (leave unset).",
    )
    text_column: ColumnName = Field(
        "text", description="Note text column (default 'text'). Leave unset for format text."
    )
    where: dict[str, Any] | None = Field(
        None,
        description="Row filter (default none): column -> value (equality; null = is null) or "
        "list of values (membership; null in the list matches nulls). Conditions are ANDed.",
    )
    keep_columns: tuple[ColumnName, ...] = Field(
        (), strict=False, description="Input columns copied to the output (default [])."
    )
    limit: int | None = Field(
        None,
        ge=1,
        description="Use only the first N rows passing `where`, in deterministic shard order "
        "(default: all rows).",
    )
    csv: CsvOptions | None = Field(None, description="CSV options (format csv only).")

    @field_validator("paths", mode="before")
    @classmethod
    def _some_paths(cls, paths: Any) -> Any:
        if isinstance(paths, list | tuple) and not paths:
            raise ValueError("give at least one path")
        return paths

    @field_validator("where")
    @classmethod
    def _where(cls, where: dict[str, Any] | None) -> dict[str, Any] | None:
        if where is None:
            return None
        if not where:
            raise _fail("must name at least one column (or leave where unset)", value=where)
        for column, value in where.items():
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and not value:
                raise _fail("an empty list matches nothing", f"{column}", value)
            for v in values:
                if not isinstance(v, Scalar):
                    raise _fail("must be a scalar or a list of scalars", f"{column}", value)
        return {c: tuple(v) if isinstance(v, list) else v for c, v in where.items()}

    @model_validator(mode="after")
    def _columns(self) -> CorpusSpec:
        fields = self.model_fields_set
        if self.format == "text":
            for name in ("id_column", "text_column", "where", "csv"):
                if name in fields and getattr(self, name) != type(self).model_fields[name].default:
                    raise _fail(
                        "not used with format text; leave it unset", name, getattr(self, name)
                    )
            if self.keep_columns:
                raise _fail(
                    "format text has no other columns to keep", "keep_columns", self.keep_columns
                )
        if self.csv is not None and self.format != "csv":
            raise _fail(
                f"csv options need format csv, not {self.format!r}", "csv", self.csv.model_dump()
            )
        if self.id_column == self.text_column:
            raise _fail("id_column and text_column must differ", "text_column", self.text_column)
        seen: set[str] = set()
        for i, column in enumerate(self.keep_columns):
            if column in (self.id_column, self.text_column):
                raise _fail(
                    "is the id or text column, already in the output", f"keep_columns[{i}]", column
                )
            if column in RESERVED_COLUMNS:
                raise _fail(
                    f"is a column the job writes ({', '.join(RESERVED_COLUMNS)})",
                    f"keep_columns[{i}]",
                    column,
                )
            if column in seen:
                raise _fail("listed twice", f"keep_columns[{i}]", column)
            seen.add(column)
        return self

    def read_columns(self) -> tuple[str, ...]:
        """Input columns a reader needs: id, text, keep columns, then `where` columns."""
        names = (self.id_column, self.text_column, *self.keep_columns, *(self.where or {}))
        return tuple(dict.fromkeys(names))


class HubSpec(_Section):
    """A Hugging Face hub repo to download (once, by the driver)."""

    repo: str = Field(
        min_length=1, description="Hub repo id, e.g. emilyalsentzer/Bio_ClinicalBERT."
    )
    revision: str | None = Field(
        None,
        description="Branch, tag or commit (default: the variant's pinned revision, else main).",
    )


class LongNotes(_Section):
    """What to do with notes longer than max_seq tokens."""

    strategy: Literal["truncate", "windows"] = Field(
        "windows",
        description="truncate: keep the first window; windows: cover the whole note (default).",
    )
    stride: int = Field(
        STRIDE,
        ge=0,
        description="Tokens shared by consecutive windows (< max_seq - 2; default 128, or "
        "(max_seq - 2) // 2 where that is less).",
    )
    aggregate: Literal["mean", "first", "none"] = Field(
        "mean",
        description="Combine window vectors per note: mean (default), first, or none (one output "
        "row per window, with char offsets).",
    )


class ModelSpec(_Section):
    """Which checkpoint to run and how to tokenize for it."""

    variant: str = Field(
        description="Preset: huang_clinicalbert | bio_clinicalbert | bio_discharge_summary_bert | "
        "clinical_modernbert | bioclinical_modernbert_base | bioclinical_modernbert_large | "
        "modernbert_base | custom. The architecture (bert, modernbert) always comes from the "
        "checkpoint's config.json; a preset only checks it."
    )
    path: Annotated[str, AfterValidator(_model_path)] | None = Field(
        None,
        description="Local model dir (prepared or raw HF snapshot) or a model.safetensors file; "
        "relative paths resolve against the spec file's directory.",
    )
    hub: HubSpec | None = Field(
        None,
        description="Download from the hub instead of `path`. Give exactly one of path/hub, or "
        "neither when the variant has a hub id (then that repo is used).",
    )
    lowercase: bool | None = Field(
        None,
        description="Lowercase before tokenizing (default null: the variant's trained casing, "
        "else the tokenizer's own). Only BERT WordPiece tokenizers can be re-cased.",
    )
    max_seq: int = Field(
        512,
        ge=8,
        description="Tokens per window incl. the framing tokens ([CLS]/[SEP]); default 512, at "
        "most the model's max_position_embeddings (checked against the checkpoint before the "
        "job starts; 8192 for the ModernBERT variants).",
    )
    long_notes: LongNotes = Field(default_factory=LongNotes, description="Long-note policy.")

    @model_validator(mode="before")
    @classmethod
    def _default_stride(cls, data: Any) -> Any:
        """A stride left out follows max_seq (as `clinicalbert_core.tokenizer.default_stride`):
        `max_seq: 128` alone must not be an error about a field the spec never set."""
        if not isinstance(data, dict):
            return data
        max_seq, long = data.get("max_seq", 512), data.get("long_notes", {})
        if type(max_seq) is int and isinstance(long, dict) and "stride" not in long:
            data = {**data, "long_notes": {**long, "stride": min(STRIDE, max(max_seq - 2, 0) // 2)}}
        return data

    @field_validator("variant")
    @classmethod
    def _variant(cls, name: str) -> str:
        names = _variant_hubs()
        if name not in names:
            raise _fail(f"unknown variant; expected one of {', '.join(names)}", value=name)
        return name

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if self.path is not None and self.hub is not None:
            raise _fail("give either path or hub, not both", "hub", self.hub.model_dump())
        if self.path is None and self.hub is None and _variant_hubs().get(self.variant) is None:
            raise _fail(f"variant {self.variant!r} has no hub id: give path or hub", "path", None)
        if self.long_notes.strategy == "windows" and self.long_notes.stride >= self.max_seq - 2:
            raise _fail(
                f"must be < max_seq - 2 = {self.max_seq - 2}",
                "long_notes.stride",
                self.long_notes.stride,
            )
        return self


class MlmSpec(_Section):
    """Masked-LM head output."""

    enabled: bool = Field(False, description="Write MLM predictions (default false).")
    top_k: int = Field(5, ge=1, le=1000, description="Predictions per position (default 5).")
    positions: Literal["mask", "all"] = Field(
        "mask", description="mask: positions holding [MASK] tokens (default); all: every token."
    )


class HeadsSpec(_Section):
    """What to compute from the encoder's hidden states."""

    pooling: Literal["cls", "mean", "pooler"] | None = Field(
        None,
        description="cls | mean | pooler (needs trained pooler weights). Default null: the "
        "variant's (mean for clinical_modernbert, which has no trained pooler), else the "
        "architecture's (cls for BERT, mean for ModernBERT).",
    )
    embeddings: bool = Field(True, description="Write pooled vectors (default true).")
    normalize: bool = Field(
        False,
        description="L2-normalize each written vector (after window aggregation; default "
        "false). Recorded in the output metadata.",
    )
    mlm: MlmSpec = Field(default_factory=MlmSpec, description="Masked-LM outputs.")

    @model_validator(mode="after")
    def _some_output(self) -> HeadsSpec:
        if not self.embeddings and not self.mlm.enabled:
            raise _fail("nothing to write: enable embeddings or mlm.enabled", "embeddings", False)
        return self


class PoolSpec(_Section):
    """A group of identical actors: one per device slot."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]+$", description="Pool name (unique), used in reports."
    )
    device: Literal["cpu", "cuda", "mps"] = Field(
        description="cpu | cuda (one GPU per actor; AMD GPUs through torch's ROCm build are "
        "cuda too) | mps (Apple GPU: dry runs and small jobs on one machine)."
    )
    actors: int = Field(1, ge=1, description="Number of actors (default 1).")
    cpus_per_actor: int = Field(
        1,
        ge=1,
        description="Ray num_cpus per actor (default 1). CPU actors run this many torch "
        "threads; cuda actors tokenize on this many `tokenizers` threads (unset on a cuda pool: "
        "4, at most the CPUs per GPU of the smallest GPU node).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="auto (default: resolved in the actor for the device it got: bf16 on GPUs "
        "and CPUs with bf16 units, else fp32) | fp32 | bf16 | fp16 (cuda, mps) | int8 (cpu: "
        "int8 linear layers, the rest fp32; recorded in the output metadata).",
    )
    allow_int8: bool = Field(
        False,
        description="Let precision auto pick int8 on CPU actors (default false: auto never "
        "picks int8 unless allowed here).",
    )
    batch_tokens: int = Field(
        8192, ge=8, description="Token budget per encoder batch (default 8192; >= model.max_seq)."
    )
    mlm_mode: Literal["auto", "cpu", "in_graph"] = Field(
        "auto", description="Where the MLM head runs: auto (default) | cpu | in_graph."
    )
    accelerator_type: str | None = Field(
        None, min_length=1, description="Ray accelerator_type, e.g. H100 (cuda only; default any)."
    )

    @field_validator("precision")
    @classmethod
    def _precision(cls, precision: str, info: ValidationInfo) -> str:
        device = info.data.get("device")
        if precision == "fp16" and device == "cpu":
            raise ValueError("fp16 is not supported on cpu; use fp32, bf16, int8 or auto")
        if precision == "int8" and device != "cpu":
            raise ValueError(f"int8 runs on cpu only; on {device} use auto, bf16, fp16 or fp32")
        return precision

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("device") != "cuda":
            raise ValueError("needs device cuda")
        return value


class OutputSpec(_Section):
    """Where results go."""

    path: Annotated[str, AfterValidator(_output_path)] = Field(
        description="Output dir or URI; relative paths resolve against the spec file's directory."
    )
    vector_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Embedding element type (default float32)."
    )


class RunSpec(_Section):
    """Sharding, retries and limits."""

    shard_rows: int = Field(20000, ge=1, description="Input rows per shard (default 20000).")
    max_shard_attempts: int = Field(
        3, ge=1, description="Tries per shard before it fails (default 3)."
    )
    max_note_chars: int = Field(
        2_000_000,
        ge=1,
        le=2**31 - 1,  # the runtime's token offsets are int32
        description="Longer notes become error rows, reason too_long (default 2000000).",
    )
    batch_rows: int = Field(
        512, ge=1, description="Rows per Arrow record batch read from a shard (default 512)."
    )
    batch_bytes: int = Field(
        8_000_000,
        ge=1,
        description="Record batches are also cut so their note text stays under this many "
        "bytes (default 8000000; a longer single note is a batch of its own): memory follows "
        "this bound, not the notes' length.",
    )
    dry_run_notes: int = Field(300, ge=1, description="Notes a dry run samples (default 300).")
    progress_interval_s: float = Field(
        10, gt=0, description="Seconds between progress lines when not on a terminal (default 10)."
    )
    stall_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A shard attempt with no new record batch for this long has its actor "
        "killed and replaced and the shard re-queued. Default null: 10x the slowest record "
        "batch measured so far in this run, at least 120 s (600 s until a first shard is done, "
        "which covers model loading).",
    )
    staging_dir: Annotated[str, AfterValidator(_output_path)] | None = Field(
        None,
        description="Where jsonl/csv/text inputs are staged as Parquet (a copy of the notes): "
        "never inside output.path. Default null: '<output.path>.staging', beside the output "
        "(on the same storage, so every node can read it). Removed when the job succeeds.",
    )
    keep_staged: bool = Field(
        False, description="Keep the staged copy after a successful job (default false)."
    )
    allow_empty: bool = Field(
        False,
        description="Accept a job that writes no note (default false: when corpus.where keeps "
        "no row, the job ends non-zero with the counts and no _SUCCESS).",
    )
    allow_duplicate_ids: bool = Field(
        False,
        description="Run a corpus whose id column holds an id on more than one row (default "
        "false: such a job is refused before any encoding, naming the id column, how many ids "
        "repeat and one of them, since output rows are known by their id only). When true, "
        "every row is still written once; the report counts the repeated ids.",
    )


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
            if pool.batch_tokens < self.model.max_seq:
                raise _fail(
                    f"must be >= model.max_seq ({self.model.max_seq})",
                    f"device_pool[{i}].batch_tokens",
                    pool.batch_tokens,
                )
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
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()


def _variant_hubs() -> dict[str, str | None]:
    """Variant name -> hub id, from clinicalbert_core when importable (it imports torch)."""
    try:
        from clinicalbert_core.variants import VARIANTS
    except ImportError:
        return dict(_FALLBACK_VARIANTS)
    return {name: v.hub_id for name, v in VARIANTS.items()}


def json_schema() -> dict[str, Any]:
    """The JSON Schema of JobSpec (for editors validating YAML specs)."""
    schema = JobSpec.model_json_schema()
    schema["$defs"]["ModelSpec"]["properties"]["variant"]["enum"] = list(_variant_hubs())
    return schema


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."


def _field_path(loc: tuple[int | str, ...], sub: str = "") -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    if sub:
        out += sub if sub.startswith("[") or not out else f".{sub}"
    return out or "(top level)"


_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required field is missing"}


def _problems(error: ValidationError, source: str) -> list[str]:
    lines = []
    for e in error.errors():
        ctx = e.get("ctx") or {}
        path = _field_path(e["loc"], ctx.get("sub", "") if e["type"] == "spec" else "")
        msg = _MESSAGES.get(e["type"], e["msg"]).removeprefix("Value error, ")
        line = f"{source}: {path}: {msg}"
        if e["type"] != "missing":  # the input of a missing field is its parent mapping
            bad = ctx.get("value", e["input"]) if e["type"] == "spec" else e["input"]
            line += f" (got {_short(bad)})"
        lines.append(line)
    return lines


def parse_spec(
    data: Any, base_dir: str | Path, *, check_paths: bool = True, source: str = "<spec>"
) -> JobSpec:
    """Validate a spec mapping; relative paths resolve against `base_dir`.

    check_paths: also require local corpus paths (globs: at least one match) and a local
    model.path to exist. URIs are never checked here.
    """
    if not isinstance(data, dict):
        raise SpecError(
            [f"{source}: the top level must be a mapping of sections, got {_short(data)}"]
        )
    context = {"base_dir": os.path.abspath(base_dir), "check_paths": check_paths}
    try:
        return JobSpec.model_validate(data, context=context)
    except ValidationError as e:
        raise SpecError(_problems(e, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (a silent override otherwise)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def apply_overrides(data: Any, overrides: list[str], source: str) -> Any:
    """`key.path=value` overrides (`--set`), value parsed as YAML: `model.max_seq=256`,
    `device_pool[0].actors=8` (or `device_pool.0.actors=8`), `corpus.where.CATEGORY=null`."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = re.findall(r"[^.\[\]]+", key)
        if not sep or not parts:
            raise SpecError([f"{source}: --set {item!r}: expected key.path=value"])
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise SpecError([f"{source}: --set {key}: value is not valid YAML"]) from None
        node = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                where = ".".join(parts[: i + 1])
                raise SpecError([f"{source}: --set {key}: {where} is not a section of the spec"])
    return data


def load_spec(
    path: str | Path, *, check_paths: bool = True, overrides: list[str] | None = None
) -> JobSpec:
    """Read and validate a YAML job spec (see `parse_spec`), after `--set` overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"{path}: cannot read the spec: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise SpecError([f"{path}: not a YAML text file (byte {e.start} is not UTF-8)"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([f"{path}: {where}invalid YAML: {problem}"]) from None
    if overrides:
        data = apply_overrides(data if data is not None else {}, overrides, str(path))
    return parse_spec(data, path.resolve().parent, check_paths=check_paths, source=str(path))
