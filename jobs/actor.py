"""EncoderActor: one per device slot; processes one shard at a time.

`ShardProcessor` is everything an actor does, without Ray: read the shard as Arrow record
batches -> classify bad rows (errors part, by reason code, never the text) -> tokenize the
next batch in a background thread while this one encodes -> token-budget batches -> encode ->
output rows -> write the part file atomically. Memory stays bounded by the token budget and a
few record batches whatever the shard size; a note is bounded by `run.max_note_chars`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clinicalbert_core.hub import ModelBundle
from clinicalbert_core.runner import ClinicalBertRunner
from clinicalbert_core.tokenizer import Windows

from .corpus import Shard, read_shard
from .dispatch import ShardResult
from .output import OutputDir, ReasonCode, StaleAttempt, errors_schema, output_schema
from .spec import JobSpec, PoolSpec

log = logging.getLogger(__name__)


def classify(
    texts: pa.Array, ids: pa.Array, max_chars: int
) -> tuple[list[str | None], list[str | None]]:
    """Per row: the note as str (or None) and the error reason (or None). Never logs text."""
    notes: list[str | None] = []
    reasons: list[str | None] = []
    binary = pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type)
    stringy = pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
    id_null = ids.is_null().to_pylist()
    for i, value in enumerate(texts.to_pylist() if (binary or stringy) else [None] * len(texts)):
        reason = None
        if id_null[i]:
            reason = ReasonCode.NULL_ID
        elif not (binary or stringy):
            reason = ReasonCode.NOT_TEXT if texts[i].is_valid else ReasonCode.NULL
        elif value is None:
            reason = ReasonCode.NULL
        elif binary:
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                reason = ReasonCode.UNDECODABLE
        if reason is None:
            if "\x00" in value:
                reason = ReasonCode.NOT_TEXT  # NUL bytes: a binary blob, not a note
            elif not value.strip():
                reason = ReasonCode.EMPTY
            elif len(value) > max_chars:
                reason = ReasonCode.TOO_LONG
        notes.append(None if reason else value)
        reasons.append(None if reason is None else str(reason.value))
    return notes, reasons


def tokenize_rows(
    runner: ClinicalBertRunner, notes: list[str | None], reasons: list[str | None]
) -> tuple[np.ndarray, Windows]:
    """Tokenize the rows that have no error reason yet. A note that yields no token at all
    (only control characters, zero-width spaces, a BOM) gets reason `empty` in `reasons`.
    Returns the indices of the rows that were encoded and their windows."""
    good = np.flatnonzero([r is None for r in reasons])
    windows = runner.tokenize([notes[i] for i in good])
    zero = windows.note_tokens == 0
    if zero.any():
        for i in good[zero]:
            reasons[i] = str(ReasonCode.EMPTY.value)
        good = good[~zero]
        windows = runner.tokenize([notes[i] for i in good])
    return good, windows


def runner_for(bundle: ModelBundle, spec: JobSpec, pool: PoolSpec) -> ClinicalBertRunner:
    """The runner an actor of `pool` uses; precision/mlm `auto` resolve for its device."""
    long = spec.model.long_notes
    return ClinicalBertRunner.from_bundle(
        bundle,
        device=pool.device,
        precision=pool.precision,
        allow_int8=pool.allow_int8,
        max_seq=spec.model.max_seq,
        pooling=spec.heads.pooling,
        embeddings=spec.heads.embeddings,
        mlm=spec.heads.mlm.enabled,
        mlm_mode=pool.mlm_mode,
        long_notes=long.strategy,
        stride=long.stride,
        aggregate=long.aggregate,
        normalize=spec.heads.normalize,
        batch_tokens=max(pool.batch_tokens, spec.model.max_seq),
    )


class ShardProcessor:
    """One shard in, one committed part file (+ errors part) out. No Ray needed."""

    def __init__(
        self,
        bundle: ModelBundle,
        spec: JobSpec,
        pool: PoolSpec,
        actor_name: str = "local",
        slowdown_s: float = 0.0,
        collect_lengths: bool = False,
    ):
        self.spec, self.pool, self.actor_name = spec, pool, actor_name
        self.runner = runner_for(bundle, spec, pool)
        self.out = OutputDir(spec.output.path)
        self.slowdown_s, self.collect_lengths = slowdown_s, collect_lengths
        self.live: dict[str, Any] = {}  # the shard in progress, counts so far (see `progress`)
        long = spec.model.long_notes
        self.metadata = {
            "id_column": spec.corpus.id_column,  # the output's `id` is this input column
            "variant": bundle.variant,
            "architecture": bundle.architecture,
            "tokenizer": bundle.tokenizer_kind,
            "weights_sha256": bundle.weights_sha256,
            "casing": "uncased" if bundle.lowercase else "cased",
            "pooling": self.runner.pooling,
            "normalize": str(spec.heads.normalize).lower(),
            "precision": self.runner.precision,
            "max_seq": str(spec.model.max_seq),
            "long_notes": f"{long.strategy}/stride={long.stride}/aggregate={long.aggregate}",
            "spec_hash": spec.spec_hash(),
        }

    def describe(self) -> dict[str, Any]:
        r = self.runner
        return {"device": str(r.device), "precision": r.precision, "mlm_mode": r.mlm_mode.value}

    def process(
        self,
        shard: Shard,
        attempt: str = "",
        may_commit: Callable[[], bool] | None = None,
        may_start: Callable[[], bool] | None = None,
    ) -> ShardResult:
        """Encode one shard into its part file. Fencing (see output.CommitGate): `may_start`
        is asked before anything is written, `may_commit` before the part is committed."""
        if may_start is not None and not may_start():
            raise StaleAttempt(f"shard {shard.id}: attempt {attempt} is not trusted any more")
        t0 = time.perf_counter()
        result = ShardResult(
            shard_id=shard.id, pool=self.pool.name, actor=self.actor_name, attempt=attempt
        )
        run = self.spec.run
        reader = read_shard(shard, self.spec.corpus, run.batch_rows, run.batch_bytes)
        errors: list[pa.Table] = []
        self._shard_id, self._out_schema = shard.id, self._schema(shard)
        with (
            ThreadPoolExecutor(1, thread_name_prefix="tokenize") as ahead,
            self.out.part_writer(shard.id, self._out_schema, self.metadata) as writer,
        ):
            n_errors = 0
            for batch, rows, windows, bad in _prefetch(ahead, reader, self._prepare):
                if bad is not None:
                    errors.append(bad)
                    n_errors += bad.num_rows
                if len(rows):
                    writer.write(self._encode(batch, rows, windows, result))
                self.live = {
                    "shard": shard.id, "rows_in": reader.rows_in, "rows_out": result.rows_out,
                    "error_rows": n_errors, "filtered_rows": reader.rows_filtered,
                    "batches": self.live.get("batches", 0) + 1 if self.live else 1,
                }  # fmt: skip
                if self.slowdown_s:
                    time.sleep(self.slowdown_s)
            error_table = pa.concat_tables(errors) if errors else None
            result.rows_in = reader.rows_in
            result.filtered_rows = reader.rows_filtered
            if error_table is not None:
                nulled = pc.equal(error_table["reason"], ReasonCode.UNDECODABLE_VALUE.value)
                for column in error_table.filter(nulled)["column"].to_pylist():
                    result.nulled[column] = result.nulled.get(column, 0) + 1
                row_errors = error_table.filter(pc.invert(nulled))
                result.error_rows = row_errors.num_rows
                reasons = row_errors["reason"].to_numpy(False)
                for reason, count in zip(*np.unique(reasons, return_counts=True)):
                    result.reasons[str(reason)] = int(count)
            result.seconds = time.perf_counter() - t0
            result.batches = self.live.get("batches", 0)
            writer.commit(error_table, result.stats(), may_commit)
        self.live = {}
        return result

    # ---- steps -------------------------------------------------------------------------------
    def _schema(self, shard: Shard) -> pa.Schema:
        from .corpus import filesystem

        fs, path = filesystem(shard.path)
        with fs.open_input_file(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
        corpus, long = self.spec.corpus, self.spec.model.long_notes
        self.id_type = schema.field(corpus.id_column).type
        return output_schema(
            id_type=self.id_type,
            keep_fields=[schema.field(c) for c in corpus.keep_columns],
            hidden=self.runner.config.hidden_size,
            vector_dtype=self.spec.output.vector_dtype,
            embeddings=self.spec.heads.embeddings,
            windows=long.aggregate == "none",
            mlm=self.spec.heads.mlm.enabled,
        )

    def _prepare(
        self, batch: pa.RecordBatch
    ) -> tuple[pa.RecordBatch, np.ndarray, Windows, pa.Table | None]:
        """Classify rows and tokenize the good ones (runs ahead, in the tokenizer thread)."""
        notes, reasons = classify(batch["text"], batch["id"], self.spec.run.max_note_chars)
        marks = [[c for c in (m or "").split(",") if c] for m in _marks(batch)]
        id_column = self.spec.corpus.id_column
        for i, columns in enumerate(marks):  # an id that was not UTF-8: the row is an error
            if id_column in columns and reasons[i] in (None, str(ReasonCode.NULL_ID.value)):
                reasons[i] = str(ReasonCode.UNDECODABLE.value)
                notes[i] = None
        good, windows = tokenize_rows(self.runner, notes, reasons)
        rows = [(i, reasons[i], None) for i in range(len(reasons)) if reasons[i] is not None]
        rows += [  # a kept value that was not UTF-8: written as null, named here
            (i, str(ReasonCode.UNDECODABLE_VALUE.value), c)
            for i in good
            for c in marks[i]
            if c != id_column
        ]
        errors = None
        if rows:
            take = pa.array([i for i, _, _ in rows], pa.int64())
            errors = pa.table(
                {
                    "id": batch["id"].take(take),
                    "shard": pa.array([self._shard_id] * len(rows), pa.string()),
                    "row_index": batch["row_index"].take(take),
                    "reason": pa.array([r for _, r, _ in rows], pa.string()),
                    "column": pa.array([c for _, _, c in rows], pa.string()),
                },
                schema=errors_schema(self.id_type),
            )
        return batch, good, windows, errors

    def _encode(
        self, batch: pa.RecordBatch, rows: np.ndarray, windows: Windows, result: ShardResult
    ) -> pa.Table:
        spec, runner = self.spec, self.runner
        mlm = spec.heads.mlm
        out = runner.encode_windows(windows, mlm_positions=mlm.positions, top_k=mlm.top_k)
        per_window = spec.model.long_notes.aggregate == "none"
        lengths = windows.lengths
        result.rows_out += len(rows)
        result.windows += windows.num_windows
        result.tokens += int(lengths.sum())
        result.truncated += int(windows.truncated.sum())
        if self.collect_lengths:
            result.token_lengths.extend(windows.note_tokens.tolist())
        # one output row per note, or per window
        take = rows[windows.note] if per_window else rows
        result.output_rows += len(take)
        cols: dict[str, pa.Array] = {"id": batch["id"].take(pa.array(take))}
        for c in spec.corpus.keep_columns:
            cols[c] = batch[c].take(pa.array(take))
        if spec.heads.embeddings:
            vectors = runner.aggregate_vectors(windows, out.vectors)
            cols["embedding"] = _fixed_list(vectors, spec.output.vector_dtype)
        if per_window:
            cols["n_tokens"] = pa.array(lengths - 2, pa.int64())
            cols["n_windows"] = pa.array(windows.windows_per_note()[windows.note], pa.int32())
            cols["truncated"] = pa.array(windows.truncated[windows.note])
            cols["window_index"] = pa.array(windows.window_index, pa.int32())
            cols["char_start"] = pa.array(windows.char_start, pa.int64())
            cols["char_end"] = pa.array(windows.char_end, pa.int64())
        else:
            cols["n_tokens"] = pa.array(windows.note_tokens, pa.int64())
            cols["n_windows"] = pa.array(windows.windows_per_note(), pa.int32())
            cols["truncated"] = pa.array(windows.truncated)
        if mlm.enabled:
            cols |= self._mlm_columns(out.mlm, windows, per_window, len(take))
        return pa.table(cols, schema=self._out_schema)

    def _mlm_columns(
        self, rows: Any, windows: Windows, per_window: bool, n_out: int
    ) -> dict[str, pa.Array]:
        """MLM predictions as list columns, grouped by output row (note or window)."""
        vocab = self.runner.tokenizer.tokenizer
        if rows is None or len(rows.window) == 0:
            owner = np.zeros(0, np.int64)
            order = owner
        else:
            owner = rows.window if per_window else windows.note[rows.window]
            order = np.lexsort((rows.position, windows.window_index[rows.window], owner))
        counts = np.bincount(owner, minlength=n_out)
        offsets = pa.array(np.concatenate(([0], np.cumsum(counts))).astype(np.int32))
        if len(order):
            w, p = rows.window[order], rows.position[order]
            ids, lps = rows.top_ids[order], rows.top_logprobs[order]
            chars = windows.token_char[windows.bounds[w] + p]
            k = ids.shape[1]
            inner = pa.array(np.arange(0, ids.size + 1, k, dtype=np.int32))
            top_ids = pa.ListArray.from_arrays(inner, pa.array(ids.ravel().astype(np.int32)))
            tokens = [vocab.id_to_token(int(i)) for i in ids.ravel()]
            top_tokens = pa.ListArray.from_arrays(inner, pa.array(tokens, pa.string()))
            top_lps = pa.ListArray.from_arrays(inner, pa.array(lps.ravel().astype(np.float32)))
        else:
            w = p = chars = np.zeros(0, np.int64)
            empty = pa.array([], pa.list_(pa.int32()))
            top_ids, top_tokens, top_lps = (
                empty, pa.array([], pa.list_(pa.string())), pa.array([], pa.list_(pa.float32())),
            )  # fmt: skip
        as_list = lambda values: pa.ListArray.from_arrays(offsets, values)  # noqa: E731
        return {
            "mlm_window": as_list(pa.array(windows.window_index[w] if len(w) else [], pa.int32())),
            "mlm_position": as_list(pa.array(p, pa.int32())),
            "mlm_char_start": as_list(pa.array(chars, pa.int64())),
            "mlm_top_ids": as_list(top_ids),
            "mlm_top_tokens": as_list(top_tokens),
            "mlm_top_logprobs": as_list(top_lps),
        }


def _marks(batch: pa.RecordBatch) -> list[str | None]:
    """Per row, the id/kept columns staging could not decode (comma-joined), or None."""
    if "_undecodable" not in batch.schema.names:
        return [None] * batch.num_rows
    return batch["_undecodable"].to_pylist()


def _fixed_list(vectors: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    flat = vectors.astype(np.float16 if dtype == "float16" else np.float32).ravel()
    return pa.FixedSizeListArray.from_arrays(pa.array(flat), vectors.shape[1])


def _prefetch(
    executor: ThreadPoolExecutor, batches: Iterator[pa.RecordBatch], prepare: Any
) -> Iterator[Any]:
    """Yield prepare(batch) for each batch, computing the next one while the caller works."""
    it = iter(batches)

    def step() -> Any:
        try:
            return prepare(next(it))
        except StopIteration:
            return None

    future = executor.submit(step)
    while (item := future.result()) is not None:
        future = executor.submit(step)
        yield item


class EncoderActor:
    """The Ray actor (wrapped with ray.remote by the driver): one per device slot."""

    def __init__(
        self,
        bundle: ModelBundle,
        spec: JobSpec,
        pool_name: str,
        actor_name: str,
        collect_lengths: bool = False,
    ):
        import torch

        pool = next(p for p in spec.device_pool if p.name == pool_name)
        if pool.device == "cpu":
            torch.set_num_threads(pool.cpus_per_actor)
        slow = _test_slowdown(pool_name)
        self.processor = ShardProcessor(bundle, spec, pool, actor_name, slow, collect_lengths)
        log.info("actor %s ready: %s", actor_name, self.processor.describe())

    def describe(self) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {**self.processor.describe(), "pid": os.getpid(), "node_id": node}

    def process(self, shard: Shard, attempt: str = "", gate: Any = None) -> ShardResult:
        """`gate`: the run's CommitGate actor; only the attempt it trusts may commit."""
        if gate is None:
            return self.processor.process(shard, attempt)
        import ray

        ask = lambda method: lambda: ray.get(method.remote(shard.id, attempt))  # noqa: E731
        return self.processor.process(shard, attempt, ask(gate.claim), ask(gate.may_start))

    def progress(self) -> dict[str, Any]:
        """Counts of the shard in progress (called in the `monitor` concurrency group, so it
        answers while `process` runs)."""
        return dict(self.processor.live)


def _test_slowdown(pool_name: str) -> float:
    """Test-only knob: CLINICALBERT_TEST_SLOWDOWN='pool=seconds,...' sleeps per record batch."""
    for item in os.environ.get("CLINICALBERT_TEST_SLOWDOWN", "").split(","):
        name, _, seconds = item.partition("=")
        if name == pool_name and seconds:
            return float(seconds)
    return 0.0
