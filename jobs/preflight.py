"""Checks of a job spec against its data, its model and its cluster, before any Ray work.

`validate` runs them all; `run` runs the corpus and model checks before it starts Ray and the
pool check right after. Each returns problems as lines naming the spec field (and the file),
never note text: the corpus is read only as far as its column names (Parquet footer, CSV
header line, first JSONL record) and, for `where`, a sample of the filtered columns.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pa_fs

from clinicalbert_core.errors import describe, message_line
from clinicalbert_core.limits import max_seq_problem

from .corpus import (
    FORMATS,
    RepeatedIds,
    as_plain_text,
    list_sources,
    plan_shards,
    repeated_column,
    repeated_ids,
)
from .corpus.values import is_text, shown_columns
from .fs import filesystem
from .lock import OutputLock
from .model import model_source
from .output import OutputDir, foreign_problem, should_resume
from .spec import JobSpec, PoolSpec
from .spec.fields import hint

SAMPLE_ROWS = 10_000  # rows of the first file preflight looks at for warnings
MASK_TEXT = "[MASK]"  # the mask token of every BERT and ModernBERT tokenizer here


def check_corpus(spec: JobSpec) -> list[str]:
    """Every input file has the id, text, keep and where columns; `where` values occur."""
    corpus = spec.corpus
    fmt = FORMATS[corpus.format]
    if fmt.NOTE_PER_FILE:  # each file is one note: no columns to check
        return []
    problems: list[str] = []
    roles = [("id_column", corpus.id_column), ("text_column", corpus.text_column)]
    roles += [(f"keep_columns[{i}]", c) for i, c in enumerate(corpus.keep_columns)]
    roles += [(f"where.{c}", c) for c in corpus.where or {}]
    try:
        sources = list_sources(corpus, spec.run.shard_rows)
    except (OSError, ValueError) as e:
        return [f"corpus.paths: {e}"]
    reported: set[str] = set()
    for source in sources:
        if source.size == 0:  # an empty file is zero rows, whatever its format
            continue
        try:
            names = fmt.columns(source, corpus)
        except (OSError, ValueError, pa.ArrowException) as e:
            problems.append(f"corpus.paths: {source.path}: cannot read its columns: "
                            f"{message_line(e)}")  # fmt: skip
            continue
        for role, column in roles:
            if role in reported:
                continue
            if column not in names:
                reported.add(role)
                problems.append(
                    f"corpus.{role}: column {column!r} is not in {source.path}"
                    f"{hint(column, names) or fmt.columns_hint(corpus, names)}; its columns: "
                    f"{shown_columns(names)}"
                )
            elif (times := names.count(column)) > 1:
                reported.add(role)
                problems.append(repeated_column(source.path, role, column, times))
    return problems


def check_output(spec: JobSpec) -> list[str]:
    """The output and staging dirs can be made: neither is (or lies under) a file, and on a
    local disk the nearest existing parent is writable."""
    problems = []
    if spec.run.staging_dir:
        dirs = [("output.path", spec.output.path), ("run.staging_dir", spec.run.staging_dir)]
    else:
        dirs = [("output.path", spec.output.path), ("output.path", spec.staging_dir())]
    for field, uri in dirs:
        if problems and field == "output.path":  # the default staging dir is beside it
            break
        fs, path = filesystem(uri)
        here = path.rstrip("/") or path
        while True:
            try:
                kind = fs.get_file_info(here).type
            except (OSError, pa.ArrowException) as e:
                problems.append(f"{field}: {uri}: cannot be checked: {describe(e)}")
                break
            if kind == pa_fs.FileType.File:
                what = "is a file" if here == path.rstrip("/") else f"lies under a file, {here}"
                problems.append(f"{field}: {uri} {what}, not a directory")
                break
            if kind == pa_fs.FileType.Directory:
                local = isinstance(fs, pa_fs.LocalFileSystem)
                if local and not os.access(here, os.W_OK | os.X_OK):
                    problems.append(f"{field}: {uri}: {here} is not writable by this user")
                break
            parent = here.rsplit("/", 1)[0]
            if not parent or parent == here:
                break
            here = parent
    return problems or _foreign_files(spec.output.path)


def output_state_problems(spec: JobSpec) -> list[str]:
    """What `run` would refuse about the output dir as it is now (read only): another spec's
    output, an unreadable _job.json, a lock another live run holds."""
    out = OutputDir(spec.output.path)
    try:
        if out.fs.get_file_info(out.root).type != pa_fs.FileType.Directory:
            return []
        job = out.read_json("_job.json")
        if job is not None and not isinstance(job, dict):
            job = []  # should_resume names it
        should_resume(out.uri, job, out.committed(), spec.spec_hash(), None, overwrite=False)
        busy = OutputLock(out, spec.name).busy()
    except ValueError as e:
        return [f"output.path: {e}"]
    except (OSError, pa.ArrowException):
        return []  # check_output names what cannot be reached
    return [f"output.path: {busy}"] if busy else []


def _foreign_files(uri: str) -> list[str]:
    """An existing output dir that holds files no job of ours wrote is refused (`run` would)."""
    out = OutputDir(uri)
    with contextlib.suppress(OSError, pa.ArrowException):
        is_dir = out.fs.get_file_info(out.root).type == pa_fs.FileType.Directory
        if is_dir and (foreign := out.foreign()):
            return [f"output.path: {foreign_problem(uri, foreign)}"]
    return []


def repeated_ids_problem(spec: JobSpec, repeated: RepeatedIds, hint: bool = True) -> str:
    """The one line that names an id column holding an id on more than one row."""
    line = (
        f"corpus.id_column: {spec.corpus.id_column!r} is not unique: {repeated.ids:,} "
        f"{'id is' if repeated.ids == 1 else 'ids are'} on more than one row "
        f"({repeated.extra_rows:,} extra rows; e.g. "
        f"{repeated.example!r} in {repeated.source})"
    )
    if hint:
        line += ("; output rows are known by their id only: pick a unique id column, or set "
                 "run.allow_duplicate_ids: true to write every row anyway")  # fmt: skip
    return line


def check_plan(spec: JobSpec) -> list[str]:
    """Parquet corpora (nothing to stage): the shards plan (every input gives the id and kept
    columns one type), and every id is on one row unless allowed (the files' ids read in
    threads). `run` checks every format once its inputs are staged."""
    if FORMATS[spec.corpus.format].STAGED:
        return []
    unreadable: list[str] = []
    try:
        shards = plan_shards(spec.corpus, spec.staging_dir(), spec.run.shard_rows)
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            repeated = (None if spec.run.allow_duplicate_ids
                        else repeated_ids(shards, spec.corpus, unreadable, pool.map))  # fmt: skip
    except (OSError, ValueError, pa.ArrowException) as e:
        return [f"corpus: {e}"]
    problems = [f"corpus: {line}" for line in unreadable]
    return problems + ([repeated_ids_problem(spec, repeated)] if repeated else [])


def corpus_warnings(spec: JobSpec) -> list[str]:
    """What the first rows of the first file suggest the spec gets wrong (`where` values that
    match none of them, MLM at [MASK] over notes that hold none). Warnings, not problems: the
    rest of the corpus may differ."""
    return where_warnings(spec) + mlm_warnings(spec)


def _first_rows(spec: JobSpec, columns: list[str], rows: int) -> tuple[str, pa.RecordBatch] | None:
    """(file, `columns` of its first rows) for the corpus's first file, where its format can
    sample it cheaply; None otherwise (no file, no sample, unreadable: the job names those)."""
    try:
        source = next(iter(list_sources(spec.corpus, spec.run.shard_rows)), None)
        if source is None:
            return None
        batch = FORMATS[spec.corpus.format].sample(source, spec.corpus, columns, rows)
    except (OSError, ValueError, pa.ArrowException):
        return None
    return (source.path, batch) if batch is not None and batch.num_rows else None


def where_warnings(spec: JobSpec) -> list[str]:
    """`where` values that match none of the first rows of the first file, with near misses
    among the values that do occur (MIMIC's CATEGORY values carry trailing spaces)."""
    corpus = spec.corpus
    if not corpus.where or not (first := _first_rows(spec, list(corpus.where), SAMPLE_ROWS)):
        return []
    path, batch = first
    problems = []
    for column, wanted in (corpus.where or {}).items():
        values = wanted if isinstance(wanted, tuple) else (wanted,)
        present = set(batch.column(column).to_pylist())
        if any(v in present for v in values):
            continue
        strings = sorted({p for p in present if isinstance(p, str)})
        near = [m for v in values if isinstance(v, str) for m in strings if m.strip() == v.strip()]
        near_text = f"; values there that differ only in spaces: {near[:3]!r}" if near else ""
        problems.append(
            f"corpus.where.{column}: {wanted!r} matches none of the first {batch.num_rows:,} "
            f"rows of {path}{near_text}"
        )
    return problems


def mlm_warnings(spec: JobSpec) -> list[str]:
    """MLM at the notes' own [MASK] tokens (`positions: mask`) over notes that hold none: every
    row's MLM lists would be empty (clinical notes are not masked; MIMIC's de-identified spans
    are '___')."""
    mlm, text = spec.heads.mlm, spec.corpus.text_column
    if not (mlm.enabled and mlm.positions == "mask") or not (
        first := _first_rows(spec, [text], SAMPLE_ROWS)
    ):
        return []
    path, batch = first
    texts = as_plain_text(batch.column(0))
    if is_text(texts.type) and pc.any(pc.match_substring(texts, MASK_TEXT)).as_py():
        return []
    return [f"heads.mlm.positions: 'mask' predicts only at {MASK_TEXT} tokens in the notes, and "
            f"none of the first {batch.num_rows:,} notes of {path} holds one: their MLM lists "
            "would be empty. Use positions: all, mask the notes first, or turn MLM off"]  # fmt: skip


def model_fit_problems(
    spec: JobSpec,
    max_positions: int,
    heads: dict[str, bool],
    mask_token: int | None,
    variant: str,
    classifier: dict[str, Any] | None = None,
) -> list[str]:
    """What the spec asks of the model that the checkpoint cannot give (`classifier`: what
    its fine-tuned classifier predicts, hub.Checkpoint.classifier)."""
    problems = classify_problems(spec, heads, classifier)
    if problem := max_seq_problem(spec.model.max_seq, max_positions, variant=variant):
        problems.append(problem)
    if spec.heads.embeddings and spec.heads.pooling == "pooler" and not heads["pooler"]:
        problems.append(
            "heads.pooling: 'pooler' needs trained pooler weights and this checkpoint has none; "
            "use cls or mean"
        )
    mlm = spec.heads.mlm
    if mlm.enabled and not heads["mlm"]:
        problems.append("heads.mlm.enabled: this checkpoint has no masked-LM head")
    if mlm.enabled and mlm.positions == "mask" and mask_token is None:
        problems.append(
            "heads.mlm.positions: 'mask' needs a mask token and this tokenizer has none; "
            "use positions: all"
        )
    return problems


def classify_problems(
    spec: JobSpec, heads: dict[str, bool], classifier: dict[str, Any] | None
) -> list[str]:
    """heads.classify / heads.tokens against the checkpoint's classifier, naming what the
    checkpoint has."""
    field, kind, per = (("heads.classify", "sequence", "one prediction per note")
                        if spec.heads.tokens is None else
                        ("heads.tokens", "token", "a label per token"))  # fmt: skip
    if getattr(spec.heads, field.split(".")[1]) is None:
        return []
    if classifier is None:
        has = ", ".join(h for h, present in heads.items() if present) or "none"
        return [f"{field}: this checkpoint has no fine-tuned classifier (its heads: {has})"]
    if classifier["kind"] != kind:
        return [f"{field}: this checkpoint's classifier is a {classifier['description']}: "
                f"{field} needs a {kind} classifier ({per})"]  # fmt: skip
    asked = spec.heads.classify
    one_logit = len(classifier["labels"]) == 1 and classifier["score"] == "sigmoid"
    if asked is not None and asked.aggregate == "huang" and not one_logit:
        return [f"heads.classify.aggregate: 'huang' needs a one-logit head scored by sigmoid (a "
                f"binary readmission model); this checkpoint's is a {classifier['description']}"]  # fmt: skip
    return []


def check_model(spec: JobSpec) -> list[str]:
    """The model opens (config, variant preset, tokenizer, manifest sha256s, weights that load:
    complete, every tensor of its shape, finite) and fits the spec. A hub model is checked
    only when it is in the local cache."""
    from clinicalbert_core.hub import open_checkpoint

    source, revision = model_source(spec)
    m = spec.model
    try:
        ck = open_checkpoint(source, m.variant, m.lowercase, revision, offline=True)
        _, heads, classifier = ck.checked_state()
    except FileNotFoundError as e:
        return [f"model: not checked here ({e})"] if "cache" in str(e) else [f"model: {e}"]
    except (ValueError, RuntimeError) as e:
        return [f"model{'.path' if m.path else ''}: {e}"]
    return model_fit_problems(spec, ck.config.max_position_embeddings, heads, ck.specials.mask,
                              ck.variant.name, classifier)  # fmt: skip


def pool_problems(pools: tuple[PoolSpec, ...], nodes: list[dict[str, Any]]) -> list[str]:
    """Pools one actor of which fits on no alive node (Ray would wait for it forever), all
    named at once: GPU pools on a cluster without GPUs in one line, then each other pool."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", True))]
    problems = []
    need_gpu = sum(p.actors for p in pools if p.device == "cuda")
    no_gpu = need_gpu > 0 and not any(res.get("GPU", 0) for res in alive)
    if no_gpu:
        problems.append(
            f"device_pool: the spec's GPU pools need {need_gpu} GPU(s) but this Ray cluster has "
            "none; run on a cluster with GPU workers, or use --dry-run to test on this machine"
        )
    for i, pool in enumerate(pools):
        if no_gpu and pool.device == "cuda":
            continue
        need = {"CPU": pool.cpus_per_actor}
        if pool.device == "cuda":
            need["GPU"] = 1
            if pool.accelerator_type:
                need[f"accelerator_type:{pool.accelerator_type}"] = 0.001
        if any(all(res.get(k, 0) >= v for k, v in need.items()) for res in alive):
            continue
        best_cpu = max((res.get("CPU", 0) for res in alive), default=0)
        gpus = max((res.get("GPU", 0) for res in alive), default=0)
        problems.append(
            f"device_pool[{i}] ({pool.name}): one actor needs "
            + ", ".join(f"{v:g} {k}" for k, v in need.items())
            + f" but no node of this Ray cluster has that (largest node: {best_cpu:g} CPU, "
            f"{gpus:g} GPU); lower cpus_per_actor or add nodes"
        )
    return problems
