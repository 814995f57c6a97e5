"""Reading a spec: YAML (duplicate keys refused), `--set` overrides, validation, and
pydantic's errors as one line per problem naming the field path."""

from __future__ import annotations

import os
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from .fields import MAX_PROBLEMS, SpecError, hint, short
from .job import JobSpec

MAX_SPEC_BYTES = 1 << 20  # a spec file; list many inputs with a glob or a directory instead
MAX_SPEC_VALUES = 100_000  # values in the spec, YAML aliases expanded
MAX_STRING_CHARS = 4096  # one string value (a path is at most 4,096 bytes on Linux)
MAX_KEY_CHARS = 80  # a longer key is shown cut in a problem's field path
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where installed


def _field_path(loc: tuple[Any, ...], sub: str = "") -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{_key(part)}" if out else _key(part))
    if sub:
        sub = _key(sub)
        out += sub if sub.startswith("[") or not out else f".{sub}"
    return out or "(top level)"


def _key(part: Any) -> str:
    """A key as a field path shows it: as written when it is a short printable name, else
    quoted and cut like a value (a key in the spec never breaks a problem's line)."""
    text = str(part)
    return text if text.isprintable() and 0 < len(text) <= MAX_KEY_CHARS else short(text)


_MESSAGES = {"extra_forbidden": "unknown key", "missing": "required field is missing"}


def _section_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The spec section (a pydantic model) at a field path, or None."""
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part)) if model else None
        if field is None:
            return None
        model = next(_models(field.annotation), None)
    return model


def _models(annotation: Any):
    """The pydantic models an annotation names (through Optional, list, dict, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models(arg)


def _unknown_key_hint(loc: tuple[int | str, ...]) -> str:
    section = _section_at(loc[:-1])
    return hint(str(loc[-1]), list(section.model_fields)) if section else ""


def _problems(error: ValidationError, source: str) -> list[str]:
    lines = []
    for e in error.errors(include_url=False)[:MAX_PROBLEMS]:
        ctx = e.get("ctx") or {}
        path = _field_path(e["loc"], ctx.get("sub", "") if e["type"] == "spec" else "")
        msg = _MESSAGES.get(e["type"], e["msg"]).removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg += _unknown_key_hint(e["loc"])
        line = f"{source}: {path}: {msg}"
        if e["type"] != "missing":  # the input of a missing field is its parent mapping
            bad = ctx.get("value", e["input"]) if e["type"] == "spec" else e["input"]
            line += f" (got {short(bad)})"
        lines.append(line)
    return lines


def parse_spec(
    data: Any, base_dir: str | Path, *, check_paths: bool = True, source: str = "<spec>"
) -> JobSpec:
    """Validate a spec mapping; relative paths resolve against `base_dir`.

    check_paths: also require local corpus paths (globs: at least one match) and a local
    model.path to exist. URIs are never checked here.
    """
    _check_bounded(data, source)
    if not isinstance(data, dict):
        raise SpecError(
            [f"{source}: the top level must be a mapping of sections, got {short(data)}"]
        )
    context = {"base_dir": os.path.abspath(base_dir), "check_paths": check_paths}
    try:
        return JobSpec.model_validate(data, context=context)
    except ValidationError as e:
        problems = _problems(e, source)
        raise SpecError(problems, more=e.error_count() - len(problems)) from None


def _check_bounded(data: Any, source: str) -> None:
    """Refuse a spec too big to be one: a string over MAX_STRING_CHARS, more than
    MAX_SPEC_VALUES values once YAML aliases are expanded (a few nested aliases can stand for
    billions), or a value that contains itself. Each container is visited once."""
    sizes: dict[int, int] = {}  # id of a list or mapping -> its values, aliases expanded
    open_ids: set[int] = set()
    stack: list[tuple[Any, tuple[Any, ...], bool]] = [(data, (), False)]
    while stack:
        node, path, closing = stack.pop()
        if isinstance(node, str) and len(node) > MAX_STRING_CHARS:
            raise SpecError([f"{source}: {_field_path(path)}: a string of {len(node):,} "
                             f"characters; at most {MAX_STRING_CHARS:,}"])  # fmt: skip
        if not isinstance(node, dict | list):
            continue
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if closing:
            open_ids.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[id(node)] > MAX_SPEC_VALUES:
                raise SpecError([f"{source}: more than {MAX_SPEC_VALUES:,} values once YAML "
                                 "aliases are expanded"])  # fmt: skip
        elif id(node) in open_ids:
            raise SpecError([f"{source}: {_field_path(path)}: a value that contains itself "
                             "(a recursive YAML alias)"])  # fmt: skip
        elif id(node) not in sizes:
            open_ids.add(id(node))
            stack.append((node, path, True))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for key, child in items:
                stack.append((key, path, False))
                stack.append((child, (*path, key), False))


def _tag(tag: str) -> str:
    return tag.replace("tag:yaml.org,2002:", "!!")


class _UniqueKeyLoader(_Loader):
    """A safe loader that rejects a key given twice in one mapping (a silent override
    otherwise), a key that is a list, mapping or set (YAML's complex keys, `!!set`) and a value
    that does not fit its explicit tag, each as a YAML error with its line."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, LookupError, AttributeError, OverflowError):
            # PyYAML's scalar constructors fail in plain Python errors on a value that does
            # not fit its explicit tag (`!!float name`, `!!bool maybe`, `!!timestamp x`)
            raise yaml.constructor.ConstructorError(
                None, None, f"the value does not fit its tag {_tag(node.tag)}", node.start_mark
            ) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # `!!set 60`: PyYAML's error names it
            return super().construct_mapping(node, deep=deep)
        seen = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a name, not a list or mapping", key_node.start_mark
                )
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # a scalar tagged !!set is a set
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a name, not a set", key_node.start_mark
                )
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
        if (size := path.stat().st_size) > MAX_SPEC_BYTES:
            raise SpecError([f"{path}: the spec is {size:,} bytes; at most {MAX_SPEC_BYTES:,} "
                             "(list many inputs with a glob or a directory)"])  # fmt: skip
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError([f"{path}: cannot read the spec: {e.strerror or e}"]) from e
    except UnicodeDecodeError as e:
        raise SpecError([f"{path}: not a YAML text file (byte {e.start} is not UTF-8)"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if isinstance(e, yaml.reader.ReaderError):  # a control character: no mark, an offset
            at = e.position
            line, start = text.count("\n", 0, at), text.rfind("\n", 0, at) + 1
            mark = yaml.Mark("", at, line, at - start, None, None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).partition("\n")[0]
        raise SpecError([f"{path}: {where}invalid YAML: {problem}"]) from None
    except RecursionError:
        raise SpecError([f"{path}: invalid YAML: nested too deeply"]) from None
    if overrides:
        data = apply_overrides(data if data is not None else {}, overrides, str(path))
    return parse_spec(data, path.resolve().parent, check_paths=check_paths, source=str(path))
