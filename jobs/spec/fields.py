"""What every section of the job spec is made of: the strict base model, the error a
cross-field check raises (`SpecError`, `_fail`), and the path fields (resolved against the
spec's directory, checked to exist where asked)."""

from __future__ import annotations

import difflib
import glob
import os
import reprlib
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError

from ..fs import is_uri
from ..rows import PART_COLUMNS

# Column names the job reads or writes itself (every column a part file can have, for any
# heads); `keep_columns` may not use them.
RESERVED_COLUMNS = (PART_COLUMNS[0], "text", "row_index", *PART_COLUMNS[1:])
_VALUE_CHARS = 80
_PATH_CHARS = 300  # a resolved path shown in a problem, cut beyond


class _Repr(reprlib.Repr):
    def repr_dict(self, x: dict, level: int) -> str:  # keys in the spec's order, not sorted
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in list(x.items())[: self.maxdict]]  # fmt: skip
        return "{" + ", ".join(items + ["..."] * (len(x) > self.maxdict)) + "}"


_REPR = _Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, _VALUE_CHARS, _VALUE_CHARS, 40
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 4
MAX_PROBLEMS = 20  # lines one error lists; the rest are counted


class SpecError(ValueError):
    """An invalid job spec; `problems` holds one line per problem (at most MAX_PROBLEMS, then
    one line counting the rest)."""

    def __init__(self, problems: list[str], more: int = 0):
        more += max(len(problems) - MAX_PROBLEMS, 0)
        problems = problems[:MAX_PROBLEMS] + [f"... and {more:,} more problems"] * bool(more)
        self.problems = problems
        super().__init__("\n".join(problems))


def short(value: Any, chars: int = _VALUE_CHARS) -> str:
    """A bounded repr of a spec value: never builds more than a few hundred characters, however
    big or deeply nested the value is."""
    text = repr(value[:chars]) if isinstance(value, str) else _REPR.repr(value)
    return text if len(text) <= chars else text[: chars - 3] + "..."


def hint(name: str, available: list[str]) -> str:
    """' (did you mean ...?)' for a near miss: case, surrounding spaces, or a close spelling."""
    key = name.strip().casefold()
    near = [a for a in available if a.strip().casefold() == key]
    near = near or difflib.get_close_matches(name, available, n=2, cutoff=0.75)
    return f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""


def _fail(reason: str, sub: str = "", value: Any = ...) -> PydanticCustomError:
    """An error for a cross-field check; `sub` extends the field path, `value` is the bad value."""
    ctx: dict[str, Any] = {"reason": reason, "sub": sub}
    if value is not ...:
        ctx["value"] = value
    return PydanticCustomError("spec", "{reason}", ctx)


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
    return "" if path == resolved else f" (resolved to {short(resolved, _PATH_CHARS)})"


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
