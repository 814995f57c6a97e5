"""EncoderActor: one per device slot; processes one shard at a time.

`ShardProcessor` is everything an actor does, without Ray: read the shard as Arrow record
batches -> classify bad rows (errors part, by reason code, never the text) -> cut each batch's
notes into units of at most `Feed.unit_chars` characters (a longer note alone) -> tokenize
units in a background thread, `Feed.depth` ahead of the one being encoded -> token-budget
batches -> encode -> output rows (written once per record batch) -> write the part file
atomically. Beyond the model and one batch's activations, memory is bounded by
`depth + 1` units of tokens and one record batch (`run.batch_bytes` of text), whatever the
shard size; a single note by `run.max_note_chars` (README: "What bounds an actor's memory").
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clinicalbert_core.hub import ModelBundle
from clinicalbert_core.runner import ClinicalBertRunner
from clinicalbert_core.tokenizer import Windows

from .corpus import ROW_REASON, Shard, as_plain_text, injected_delay, missing_ids, read_shard
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
    texts = as_plain_text(texts)
    binary = pa.types.is_binary(texts.type) or pa.types.is_large_binary(texts.type)
    stringy = pa.types.is_string(texts.type) or pa.types.is_large_string(texts.type)
    id_null = missing_ids(ids).to_pylist()
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
    runner: ClinicalBertRunner,
    notes: list[str | None],
    reasons: list[str | None],
    rows: Iterable[int] | None = None,
) -> tuple[np.ndarray, Windows]:
    """Tokenize `rows` (default: every row with no error reason yet). A note that yields no
    token at all (only control characters, zero-width spaces, a BOM) gets reason `empty` in
    `reasons`. Returns the indices of the rows that were encoded and their windows."""
    if rows is None:
        rows = [i for i, r in enumerate(reasons) if r is None]
    rows = np.fromiter(rows, np.int64)
    kept, windows = runner.tokenizer.nonempty([notes[i] for i in rows])
    for i in np.setdiff1d(rows, rows[kept]):
        reasons[i] = str(ReasonCode.EMPTY.value)
    return rows[kept], windows


def non_finite_notes(windows: Windows, vectors: np.ndarray | None, mlm: Any = None) -> np.ndarray:
    """bool[notes]: the notes whose output holds NaN or inf, in `vectors` (one row per note,
    or per window when there is one per window) or in the MLM log-probabilities `mlm` (MlmRows,
    by window). Such a note gets reason `non_finite` instead of an output row."""
    bad_windows = np.zeros(windows.num_windows, bool)
    bad_notes = np.zeros(windows.num_notes, bool)
    if vectors is not None:
        finite = np.isfinite(vectors).all(axis=1)
        if len(finite) == windows.num_notes:
            bad_notes |= ~finite
        else:
            bad_windows |= ~finite
    if mlm is not None and len(mlm.window):
        bad_windows[mlm.window[~np.isfinite(mlm.top_logprobs).all(axis=1)]] = True
    bad_notes[windows.note[bad_windows]] = True
    return bad_notes


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


GPU_DEPTH = 4  # units a cuda actor keeps tokenized ahead of the one being encoded
UNIT_BATCHES = 64  # a unit holds up to UNIT_BATCHES x batch_tokens characters of notes


@dataclass(frozen=True)
class Feed:
    """How an actor keeps its encoder fed (README: "What bounds an actor's memory").

    The notes of each record batch are cut into units of at most `unit_chars` characters (a
    longer note is a unit of its own) and tokenized in a background thread at most `depth`
    units ahead of the one being encoded, `threads` tokenizer threads at a time.
    """

    depth: int = 1  # units tokenized ahead (memory: depth + 1 units of tokens at most)
    threads: int = 1  # tokenizer threads (`tokenizers`' pool: RAYON_NUM_THREADS)
    unit_chars: int = UNIT_BATCHES * 8192

    def __post_init__(self) -> None:
        if self.depth < 0 or self.threads < 1 or self.unit_chars < 1:
            raise ValueError(f"feed needs depth >= 0, threads >= 1, unit_chars >= 1: {self}")

    @classmethod
    def for_pool(cls, pool: PoolSpec, cpus: int | None = None) -> Feed:
        """CPU (and mps) actors: one unit ahead, one tokenizer thread (the other CPUs run
        torch). cuda actors: GPU_DEPTH units ahead, tokenized on `cpus` threads (default the
        pool's cpus_per_actor)."""
        unit = UNIT_BATCHES * pool.batch_tokens
        if pool.device == "cuda":
            return cls(depth=GPU_DEPTH, threads=cpus or pool.cpus_per_actor, unit_chars=unit)
        return cls(depth=1, threads=1, unit_chars=unit)


@dataclass
class Unit:
    """Some notes of one record batch, tokenized: what one encoder call takes."""

    batch: pa.RecordBatch  # the record batch they come from
    rows: np.ndarray  # int64[n] their rows in `batch` (notes that yielded tokens)
    windows: Windows
    errors: pa.Table | None = None  # the batch's error rows, on its last unit
    last: bool = False  # the batch's last unit


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
        feed: Feed | None = None,
    ):
        self.spec, self.pool, self.actor_name = spec, pool, actor_name
        self.runner = runner_for(bundle, spec, pool)
        self.feed = feed or Feed.for_pool(pool)
        self.runner.tokenizer.threads = self.feed.threads
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
            shard_id=shard.id,
            pool=self.pool.name,
            actor=self.actor_name,
            precision=self.runner.precision,
            attempt=attempt,
        )
        run = self.spec.run
        reader = read_shard(shard, self.spec.corpus, run.batch_rows, run.batch_bytes)
        errors: list[pa.Table] = []
        self._shard_id, self._out_schema = shard.id, self._schema(shard)
        with (
            closing(prefetch(self._units(reader), self.feed.depth)) as units,
            self.out.part_writer(shard.id, self._out_schema, self.metadata) as writer,
        ):
            n_errors, batches, rows_out = 0, 0, []
            for unit in units:
                if len(unit.rows):
                    table, bad = self._encode(unit.batch, unit.rows, unit.windows, result)
                    rows_out.append(table)
                    if bad is not None:
                        errors.append(bad)
                        n_errors += bad.num_rows
                if unit.last:  # one write per record batch: row groups as the input's
                    if rows_out:
                        writer.write(pa.concat_tables(rows_out))
                        rows_out = []
                    if unit.errors is not None:
                        errors.append(unit.errors)
                        n_errors += unit.errors.num_rows
                    batches += 1
                self.live = {
                    "shard": shard.id, "rows_in": reader.rows_in, "rows_out": result.rows_out,
                    "error_rows": n_errors, "filtered_rows": reader.rows_filtered,
                    "batches": batches,
                }  # fmt: skip
                if unit.last and self.slowdown_s:
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
            result.batches = batches
            writer.commit(error_table, result.stats(), may_commit)
        self.live = {}
        return result

    # ---- steps -------------------------------------------------------------------------------
    def _schema(self, shard: Shard) -> pa.Schema:
        from .corpus import filesystem, plain_type

        fs, path = filesystem(shard.path)
        with fs.open_input_file(path) as f:
            schema = pq.ParquetFile(f).schema_arrow
        corpus, long = self.spec.corpus, self.spec.model.long_notes
        self.id_type = plain_type(schema.field(corpus.id_column).type)
        keep = [schema.field(c) for c in corpus.keep_columns]
        return output_schema(
            id_type=self.id_type,
            keep_fields=[f.with_type(plain_type(f.type)) for f in keep],
            hidden=self.runner.config.hidden_size,
            vector_dtype=self.spec.output.vector_dtype,
            embeddings=self.spec.heads.embeddings,
            windows=long.aggregate == "none",
            mlm=self.spec.heads.mlm.enabled,
        )

    def _units(self, reader: Iterator[pa.RecordBatch]) -> Iterator[Unit]:
        """Each record batch's notes, classified and tokenized in units (runs ahead, in the
        tokenizer thread); the batch's error rows come with its last unit."""
        for batch in reader:
            notes, reasons = classify(batch["text"], batch["id"], self.spec.run.max_note_chars)
            if ROW_REASON in batch.schema.names:  # a JSONL line staging could not read
                for i, why in enumerate(batch[ROW_REASON].to_pylist()):
                    if why is not None:
                        notes[i], reasons[i] = None, why
            marks = [[c for c in (m or "").split(",") if c] for m in _marks(batch)]
            id_column = self.spec.corpus.id_column
            for i, columns in enumerate(marks):  # an id that was not UTF-8: the row is an error
                if id_column in columns and reasons[i] in (None, str(ReasonCode.NULL_ID.value)):
                    reasons[i] = str(ReasonCode.UNDECODABLE.value)
                    notes[i] = None
            todo = [i for i, r in enumerate(reasons) if r is None]
            groups = _groups(todo, [len(notes[i]) for i in todo], self.feed.unit_chars)
            encoded: list[np.ndarray] = []
            for k, rows in enumerate(groups or [[]]):
                good, windows = tokenize_rows(self.runner, notes, reasons, rows)
                encoded.append(good)
                last = k == max(len(groups) - 1, 0)
                errors = (
                    self._errors(batch, reasons, marks, np.concatenate(encoded)) if last else None
                )
                yield Unit(batch, good, windows, errors, last)

    def _errors(
        self, batch: pa.RecordBatch, reasons: list[str | None], marks: list[list[str]],
        encoded: np.ndarray,
    ) -> pa.Table | None:  # fmt: skip
        """The batch's error rows: a reason per bad row, and per encoded row each kept column
        whose value was not UTF-8 (written as null, named here)."""
        id_column = self.spec.corpus.id_column
        rows = [(i, reasons[i], None) for i in range(len(reasons)) if reasons[i] is not None]
        rows += [
            (i, str(ReasonCode.UNDECODABLE_VALUE.value), c)
            for i in encoded
            for c in marks[i]
            if c != id_column
        ]
        return self._error_table(batch, rows)

    def _error_table(
        self, batch: pa.RecordBatch, rows: list[tuple[int, str, str | None]]
    ) -> pa.Table | None:
        """Errors-part rows for (row in `batch`, reason, column) triples; None when empty."""
        if not rows:
            return None
        take = pa.array([i for i, _, _ in rows], pa.int64())
        return pa.table(
            {
                "id": batch["id"].take(take),
                "shard": pa.array([self._shard_id] * len(rows), pa.string()),
                "row_index": batch["row_index"].take(take),
                "reason": pa.array([r for _, r, _ in rows], pa.string()),
                "column": pa.array([c for _, _, c in rows], pa.string()),
            },
            schema=errors_schema(self.id_type),
        )

    def _encode(
        self, batch: pa.RecordBatch, rows: np.ndarray, windows: Windows, result: ShardResult
    ) -> tuple[pa.Table, pa.Table | None]:
        """The output rows of `rows` (encoded as `windows`), and the errors-part rows of the
        notes whose output was not finite (None when every one was)."""
        spec, runner = self.spec, self.runner
        mlm = spec.heads.mlm
        out = runner.encode_windows(windows, mlm_positions=mlm.positions, top_k=mlm.top_k)
        per_window = spec.model.long_notes.aggregate == "none"
        lengths = windows.lengths
        vectors = None
        if spec.heads.embeddings:
            vectors = runner.aggregate_vectors(windows, out.vectors)
            with np.errstate(over="ignore"):  # float16 may overflow: those notes are errors
                vectors = vectors.astype(np.dtype(spec.output.vector_dtype))
        bad = non_finite_notes(windows, vectors, out.mlm if mlm.enabled else None)
        result.windows += windows.num_windows
        result.tokens += int(lengths.sum())
        result.truncated += int(windows.truncated[~bad].sum())
        if self.collect_lengths:
            result.token_lengths.extend(windows.note_tokens.tolist())
        # one output row per note, or per window
        take = rows[windows.note] if per_window else rows
        cols: dict[str, pa.Array] = {"id": batch["id"].take(pa.array(take))}
        for c in spec.corpus.keep_columns:
            cols[c] = batch[c].take(pa.array(take))
        if vectors is not None:
            cols["embedding"] = _fixed_list(vectors)
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
        table = pa.table(cols, schema=self._out_schema)
        errors = None
        if bad.any():
            table = table.filter(pa.array(~(bad[windows.note] if per_window else bad)))
            reason = str(ReasonCode.NON_FINITE.value)
            errors = self._error_table(batch, [(int(i), reason, None) for i in rows[bad]])
            log.warning(
                "shard %s: %d notes gave NaN or inf (first id %s): error rows, reason %s",
                self._shard_id, int(bad.sum()), batch["id"][int(rows[bad][0])], reason,
            )  # fmt: skip
        result.rows_out += int((~bad).sum())
        result.output_rows += table.num_rows
        return table, errors

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


def _fixed_list(vectors: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1])


def _groups(rows: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """`rows` in order, cut into runs whose `sizes` add up to at most `budget` (a row whose
    size alone is larger: a run of its own)."""
    groups: list[list[int]] = []
    used = 0
    for row, size in zip(rows, sizes):
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += size
    return groups


T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Yield `items` in order, made by a background thread at most `depth` items ahead of
    the one the caller holds (an item is released when the caller asks for the next): at
    most depth + 1 items exist at once. The producer's exception is raised here; closing
    this generator early stops the producer after the item it is making."""
    slots = threading.Semaphore(depth + 1)
    made: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            it = iter(items)
            while slots.acquire() and not stop.is_set():
                item = next(it, end)
                made.put((item, None))
                if item is end:
                    return
        except BaseException as e:  # handed to the consumer, raised there
            made.put((end, e))

    thread = threading.Thread(target=produce, name="tokenize", daemon=True)
    thread.start()
    try:
        while True:
            item, error = made.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
            slots.release()
    finally:
        stop.set()
        slots.release()  # wakes a producer waiting for a slot, so it sees `stop`
        thread.join()


class EncoderActor:
    """The Ray actor (wrapped with ray.remote by the driver): one per device slot."""

    def __init__(
        self,
        bundle: ModelBundle,
        spec: JobSpec,
        pool_name: str,
        actor_name: str,
        collect_lengths: bool = False,
        cpus: int | None = None,
    ):
        """cpus: the CPUs Ray gave this actor (default the pool's cpus_per_actor): torch
        threads on a CPU actor, tokenizer threads on a cuda one."""
        import torch

        pool = next(p for p in spec.device_pool if p.name == pool_name)
        cpus = cpus or pool.cpus_per_actor
        if pool.device == "cpu":
            torch.set_num_threads(cpus)
        slow = injected_delay(pool_name)
        feed = Feed.for_pool(pool, cpus)
        self.processor = ShardProcessor(bundle, spec, pool, actor_name, slow, collect_lengths, feed)
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
