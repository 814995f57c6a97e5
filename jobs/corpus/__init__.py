"""Corpus readers, staging to Parquet, and shard planning.

Every input ends up as Parquet row groups. Parquet inputs are read in place; jsonl, csv and
text inputs (plain or compressed, e.g. `.gz`) are staged once into Parquet chunk files under a
staging dir, with row groups of `shard_rows` rows. A `Shard` is a deterministic slice of one
Parquet file: a run of its row groups or a row range of one larger than `shard_rows`,
optionally cut at `row_limit` rows (only for `corpus.limit`). Paths are local paths or URIs
`pyarrow.fs` understands.

Pure functions, no Ray: the driver passes its own `map_fn` to `plan_shards` to stage sources in
parallel tasks, and actors call `read_shard`. Nothing here logs or raises with note text.

    units.py     Source, ParquetInput, Shard: plain data
    formats.py   corpus.format -> its module: parquet.py jsonl.py csv.py text.py
    textfile.py  what csv and jsonl share: lines, sniffing, StartOver
    listing.py   spec paths -> Sources (globs, dirs, a job's own dirs left out)
    staging.py   a Source -> ParquetInputs, a chunk each (staged once, atomically); cleaning up
    arrivals.py  pipelined staging: each chunk as committed, its shards, types and ids checked
    shards.py    plan_shards, read_shard
    values.py    column checks, text layouts, missing ids, `where`, cutting by bytes
    ids.py       repeated ids; idscan.py: the hashing scan it shares with `verify`
"""

from .formats import FORMATS
from .ids import MapFn, RepeatedIds, cached_verdict, repeated_ids, verdict_json, verdict_key
from .listing import OWN_DIR_MARKERS, list_sources
from .shards import ShardReader, idle_actors_warning, limit_shards, plan_shards, read_shard
from .staging import STAGING_MARKER, clean_staging, remove_staged, stage_source
from .units import ParquetInput, Shard, Source
from .values import (
    ROW_REASON,
    UNDECODABLE,
    as_plain_text,
    check_columns,
    cut_by_bytes,
    missing_ids,
    plain_type,
    repeated_column,
    where_mask,
)

__all__ = [
    "FORMATS",
    "MapFn",
    "OWN_DIR_MARKERS",
    "ROW_REASON",
    "STAGING_MARKER",
    "UNDECODABLE",
    "ParquetInput",
    "RepeatedIds",
    "Shard",
    "ShardReader",
    "Source",
    "as_plain_text",
    "cached_verdict",
    "check_columns",
    "clean_staging",
    "cut_by_bytes",
    "idle_actors_warning",
    "list_sources",
    "missing_ids",
    "plain_type",
    "limit_shards",
    "plan_shards",
    "read_shard",
    "remove_staged",
    "repeated_column",
    "repeated_ids",
    "stage_source",
    "verdict_json",
    "verdict_key",
    "where_mask",
]
