"""The YAML job spec: typed, validated before any work, every error naming its field path.

`load_spec(path)` reads a YAML file, `parse_spec(data, base_dir)` a dict; both return a frozen
`JobSpec` or raise `SpecError` with one line per problem (`file: field.path: what (got value)`).
Relative paths resolve against the spec file's directory; URIs (`s3://`, `gs://`, `file://`)
are kept as given. `json_schema()` is the published JSON Schema (`clinicalbert schema`).
"""

from ..fs import is_uri
from .corpus import CorpusSpec, CsvOptions
from .fields import RESERVED_COLUMNS, SpecError, has_glob, mount_free
from .job import HASH_EXCLUDED, JobSpec, json_schema
from .load import apply_overrides, load_spec, parse_spec
from .sections import (
    STRIDE,
    ClassifySpec,
    HeadsSpec,
    HubSpec,
    LongNotes,
    MlmSpec,
    ModelSpec,
    OutputSpec,
    PoolSpec,
    RunSpec,
    TokensSpec,
)

__all__ = [
    "ClassifySpec",
    "HASH_EXCLUDED", "RESERVED_COLUMNS", "STRIDE", "CorpusSpec", "CsvOptions", "HeadsSpec",
    "HubSpec", "JobSpec", "LongNotes", "MlmSpec", "ModelSpec", "OutputSpec", "PoolSpec",
    "RunSpec", "SpecError", "apply_overrides", "has_glob", "is_uri", "json_schema",
    "load_spec", "mount_free", "parse_spec", "TokensSpec",
]  # fmt: skip
