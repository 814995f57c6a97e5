"""The `corpus` section: where the notes are and which columns to use."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from .fields import RESERVED_COLUMNS, ColumnName, CorpusPath, Scalar, _fail, _Section


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
