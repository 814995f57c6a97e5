"""EncoderActor: one per device slot; processes one shard at a time.

`ShardProcessor` is everything an actor does, without Ray: read the shard as Arrow record
batches -> classify bad rows (errors part, by reason code, never the text) -> cut each batch's
notes into units of at most `Feed.unit_chars` characters (a longer note alone) -> tokenize
units in a background thread, `Feed.depth` ahead of the one being encoded -> token-budget
batches -> encode -> output rows (written once per record batch) -> write the part file
atomically. Beyond the model and one batch's activations, memory is bounded by
`depth + 1` units of tokens and one record batch (`run.batch_bytes` of text), whatever the
shard size; a single note by `run.max_note_chars` (README: "What bounds an actor's memory").

The steps live in their rooms: notes.py (classify, tokenize), feed.py (units, prefetch),
rows.py (encoder outputs -> Arrow tables), parts.py (part writer, commit gate, counts).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clinicalbert_core.classify import note_classes
from clinicalbert_core.hub import ModelBundle
from clinicalbert_core.redact import redact_notes
from clinicalbert_core.runner import ClinicalBertRunner

from .corpus import Shard, plain_type, read_shard
from .feed import Feed, Unit, cut_runs, prefetch
from .fs import filesystem
from .notes import classify, classify_batch, error_rows, non_finite_notes, tokenize_rows
from .output import OutputDir
from .parts import PartWriter, ShardResult, StaleAttempt
from .reasons import ReasonCode
from .rows import as_vector_dtype, drop_notes, error_table, output_schema, output_table
from .spec import JobSpec, PoolSpec

__all__ = [
    "EncoderActor",
    "Feed",
    "ShardProcessor",
    "Unit",
    "classify",
    "non_finite_notes",
    "prefetch",
    "runner_for",
    "tokenize_rows",
]

log = logging.getLogger(__name__)


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
        batch_tokens=pool.batch_tokens,
        **_classify_options(spec),
    )


def _classify_options(spec: JobSpec) -> dict[str, Any]:
    """The runner options heads.classify sets (none when it is off)."""
    c = spec.heads.classify
    if c is None:
        return {} if spec.heads.tokens is None else {"classify": True}
    return {"classify": True, "class_aggregate": c.aggregate, "threshold": c.threshold,
            "huang_c": c.c}  # fmt: skip


def _head_metadata(spec: JobSpec) -> dict[str, str]:
    """How heads.classify aggregates, or how heads.tokens groups and filters."""
    if (t := spec.heads.tokens) is None:
        return {"class_aggregate": spec.heads.classify.aggregate}
    return {"entity_aggregation": t.aggregation, "ignore_labels": json.dumps(t.ignore_labels),
            "min_score": str(t.min_score), "redact": str(t.redact).lower()}  # fmt: skip


class ShardProcessor:
    """One shard in, one committed part file (+ errors part) out. No Ray needed.

    `spec_hash`: the job's (written in each part's metadata; None: `spec.spec_hash()`)."""

    def __init__(
        self,
        bundle: ModelBundle,
        spec: JobSpec,
        pool: PoolSpec,
        actor_name: str = "local",
        spec_hash: str | None = None,
        feed: Feed | None = None,
    ):
        self.spec, self.pool, self.actor_name = spec, pool, actor_name
        self.runner = runner_for(bundle, spec, pool)
        self.feed = feed or Feed.for_pool(pool)
        self.runner.tokenizer.threads = self.feed.threads
        self.out = OutputDir(spec.output.path)
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
            "spec_hash": spec.spec_hash() if spec_hash is None else spec_hash,
        }
        if (task := self.runner.task) is not None:  # the classifier's labels, how it scores
            self.metadata |= {
                "class_labels": json.dumps(list(task.labels)),
                "problem_type": task.problem_type or "none",
                "class_scores": task.score,
            } | _head_metadata(spec)

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
        """Encode one shard into its part file. Fencing (see parts.CommitGate): `may_start`
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
        self._shard_id, self._out_schema = shard.id, self._schema(shard)
        with (
            closing(prefetch(self._units(reader), self.feed.depth)) as units,
            self.out.part_writer(shard.id, self._out_schema, self.metadata) as writer,
        ):
            errors = self._write(units, writer, reader, result)
            shard_errors = pa.concat_tables(errors) if errors else None
            result.rows_in = reader.rows_in
            result.filtered_rows = reader.rows_filtered
            if shard_errors is not None:
                result.count_errors(shard_errors)
            result.seconds = time.perf_counter() - t0
            writer.commit(shard_errors, result.stats(), may_commit)
        self.live = {}
        return result

    # ---- steps -------------------------------------------------------------------------------
    def _schema(self, shard: Shard) -> pa.Schema:
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
            num_labels=self.runner.task.num_labels if self.spec.heads.classify else 0,
            entities=self.spec.heads.tokens is not None,
            redact=self.spec.heads.tokens is not None and self.spec.heads.tokens.redact,
        )

    def _units(self, reader: Iterator[pa.RecordBatch]) -> Iterator[Unit]:
        """Each record batch's notes, classified and tokenized in units (runs ahead, in the
        tokenizer thread); the batch's error rows come with its last unit."""
        id_column = self.spec.corpus.id_column
        for batch in reader:
            notes, reasons, marks = classify_batch(batch, self.spec.run.max_note_chars, id_column)
            todo = [i for i, r in enumerate(reasons) if r is None]
            groups = cut_runs(todo, [len(notes[i]) for i in todo], self.feed.unit_chars)
            encoded: list[np.ndarray] = []
            for k, rows in enumerate(groups or [[]]):
                good, windows = tokenize_rows(self.runner, notes, reasons, rows)
                encoded.append(good)
                last = k == max(len(groups) - 1, 0)
                errors = None
                if last:
                    bad = error_rows(reasons, marks, np.concatenate(encoded), id_column)
                    errors = error_table(batch, bad, self._shard_id, self.id_type)
                yield Unit(batch, good, windows, errors, last, [notes[i] for i in good])

    def _write(
        self, units: Iterator[Unit], writer: PartWriter, reader: Any, result: ShardResult
    ) -> list[pa.Table]:
        """Encode every unit and write each record batch's output rows; returns the shard's
        error rows (tables). Updates `live` (the counts so far) after each unit."""
        errors: list[pa.Table] = []
        n_errors, rows_out = 0, []
        for unit in units:
            if len(unit.rows):
                table, bad = self._encode(unit, result)
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
                result.batches += 1
            self.live = {
                "shard": result.shard_id, "rows_in": reader.rows_in, "rows_out": result.rows_out,
                "error_rows": n_errors, "filtered_rows": reader.rows_filtered,
                "batches": result.batches,
            }  # fmt: skip
        return errors

    def _encode(self, unit: Unit, result: ShardResult) -> tuple[pa.Table, pa.Table | None]:
        """The output rows of the unit's notes, and the errors-part rows of the notes whose
        output was not finite (None when every one was)."""
        spec, runner = self.spec, self.runner
        batch, rows, windows = unit.batch, unit.rows, unit.windows
        mlm = spec.heads.mlm
        out = runner.encode_windows(windows, mlm_positions=mlm.positions, top_k=mlm.top_k)
        vectors = None
        if spec.heads.embeddings:
            vectors = runner.aggregate_vectors(windows, out.vectors)
            vectors = as_vector_dtype(vectors, spec.output.vector_dtype)
        predictions = out.mlm if mlm.enabled else None
        classes = entities = redacted = None
        if (c := spec.heads.classify) is not None:
            classes = note_classes(
                out.class_logits, windows, runner.task, c.aggregate, c.threshold, c.c
            )
        if (t := spec.heads.tokens) is not None:
            entities = runner.group_entities(unit.texts, windows, out.token_logits,
                                             t.aggregation, t.ignore_labels, t.min_score)  # fmt: skip
            redacted = redact_notes(unit.texts, entities) if t.redact else None
        bad = non_finite_notes(
            windows, vectors, predictions, None if classes is None else classes[0],
            out.token_logits,
        )  # fmt: skip
        result.windows += windows.num_windows
        result.tokens += int(windows.lengths.sum())
        result.truncated += int(windows.truncated[~bad].sum())
        table = output_table(
            self._out_schema, batch, rows, windows, spec.corpus.keep_columns,
            vectors, predictions, runner.tokenizer.tokenizer.id_to_token, classes, entities,
            redacted,
        )  # fmt: skip
        errors = None
        if bad.any():
            per_window = spec.model.long_notes.aggregate == "none"
            table = drop_notes(table, bad, windows, per_window)
            reason = str(ReasonCode.NON_FINITE.value)
            failed = [(int(i), reason, None) for i in rows[bad]]
            errors = error_table(batch, failed, self._shard_id, self.id_type)
            log.warning(
                "shard %s: %d notes gave NaN or inf (first id %s): error rows, reason %s",
                self._shard_id, int(bad.sum()), batch["id"][int(rows[bad][0])], reason,
            )  # fmt: skip
        result.rows_out += int((~bad).sum())
        result.output_rows += table.num_rows
        return table, errors


class EncoderActor:
    """The Ray actor (wrapped with ray.remote by the driver): one per device slot."""

    def __init__(
        self,
        bundle: ModelBundle,
        spec: JobSpec,
        pool: PoolSpec,
        actor_name: str,
        spec_hash: str,
        cpus: int | None = None,
    ):
        """pool: this actor's pool of the spec; spec_hash: the job's. cpus: the CPUs Ray gave
        this actor (default the pool's cpus_per_actor): torch threads on a CPU actor,
        tokenizer threads on a cuda one."""
        import torch

        cpus = cpus or pool.cpus_per_actor
        os.umask(0o777 & ~spec.output.dir_mode)  # this process is the job's: see private_files
        if pool.device == "cpu":
            torch.set_num_threads(cpus)
        feed = Feed.for_pool(pool, cpus)
        self.processor = ShardProcessor(bundle, spec, pool, actor_name, spec_hash, feed)
        log.info("actor %s ready: %s", actor_name, self.processor.describe())

    def describe(self) -> dict[str, Any]:
        import ray

        node = ray.get_runtime_context().get_node_id()
        return {**self.processor.describe(), "pid": os.getpid(), "node_id": node}

    def process(
        self, shard: Shard, attempt: str = "", gate: Any = None, trusted: Any = None
    ) -> ShardResult:
        """`gate`: the run's CommitGate actor; only the attempt it trusts may commit.
        `trusted`: the gate's answer to the driver's trust() of this attempt, passed so that
        Ray runs this only after it (its value is not used)."""
        if gate is None:
            return self.processor.process(shard, attempt)
        import ray

        ask = lambda method: lambda: ray.get(method.remote(shard.id, attempt))  # noqa: E731
        return self.processor.process(shard, attempt, ask(gate.claim), ask(gate.may_start))

    def progress(self) -> dict[str, Any]:
        """Counts of the shard in progress (called in the `monitor` concurrency group, so it
        answers while `process` runs)."""
        return dict(self.processor.live)
