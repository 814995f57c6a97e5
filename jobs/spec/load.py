"""Reading a spec: YAML (duplicate keys refused), `--set` overrides, validation, and
pydantic's errors as one line per problem naming the field path."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from .fields import _VALUE_CHARS, SpecError
from .job import JobSpec


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
