"""The `model`, `heads`, `device_pool`, `output` and `run` sections."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clinicalbert_core.limits import (
    STRIDE,
    default_stride,
    precision_problem,
    stride_problem,
)
from clinicalbert_core.variants import VARIANTS

from .fields import _fail, _model_path, _output_path, _Section


class HubSpec(_Section):
    """A Hugging Face hub repo to download (once, by the driver)."""

    repo: str = Field(
        min_length=1, description="Hub repo id, e.g. emilyalsentzer/Bio_ClinicalBERT."
    )
    revision: str | None = Field(
        None,
        description="Branch, tag or commit (default: the variant's pinned revision, else main).",
    )


class LongNotes(_Section):
    """What to do with notes longer than max_seq tokens."""

    strategy: Literal["truncate", "windows"] = Field(
        "windows",
        description="truncate: keep the first window; windows: cover the whole note (default).",
    )
    stride: int = Field(
        STRIDE,
        ge=0,
        description="Tokens shared by consecutive windows (< max_seq - 2; default 128, or "
        "(max_seq - 2) // 2 where that is less).",
    )
    aggregate: Literal["mean", "first", "none"] = Field(
        "mean",
        description="Combine window vectors per note: mean (default), first, or none (one output "
        "row per window, with char offsets).",
    )


class ModelSpec(_Section):
    """Which checkpoint to run and how to tokenize for it."""

    variant: str = Field(
        description="Preset: huang_clinicalbert | bio_clinicalbert | bio_discharge_summary_bert | "
        "clinical_modernbert | bioclinical_modernbert_base | bioclinical_modernbert_large | "
        "modernbert_base | custom. The architecture (bert, modernbert) always comes from the "
        "checkpoint's config.json; a preset only checks it."
    )
    path: Annotated[str, AfterValidator(_model_path)] | None = Field(
        None,
        description="Local model dir (prepared or raw HF snapshot) or a model.safetensors file; "
        "relative paths resolve against the spec file's directory.",
    )
    hub: HubSpec | None = Field(
        None,
        description="Download from the hub instead of `path`. Give exactly one of path/hub, or "
        "neither when the variant has a hub id (then that repo is used).",
    )
    lowercase: bool | None = Field(
        None,
        description="Lowercase before tokenizing (default null: the variant's trained casing, "
        "else the tokenizer's own). Only BERT WordPiece tokenizers can be re-cased.",
    )
    max_seq: int = Field(
        512,
        ge=8,
        description="Tokens per window incl. the framing tokens ([CLS]/[SEP]); default 512, at "
        "most the model's max_position_embeddings (checked against the checkpoint before the "
        "job starts; 8192 for the ModernBERT variants).",
    )
    long_notes: LongNotes = Field(default_factory=LongNotes, description="Long-note policy.")

    @model_validator(mode="before")
    @classmethod
    def _default_stride(cls, data: Any) -> Any:
        """A stride left out follows max_seq (`clinicalbert_core.limits.default_stride`):
        `max_seq: 128` alone must not be an error about a field the spec never set."""
        if not isinstance(data, dict):
            return data
        max_seq, long = data.get("max_seq", 512), data.get("long_notes", {})
        if type(max_seq) is int and isinstance(long, dict) and "stride" not in long:
            data = {**data, "long_notes": {**long, "stride": default_stride(max_seq)}}
        return data

    @field_validator("variant")
    @classmethod
    def _variant(cls, name: str) -> str:
        if name not in VARIANTS:
            raise _fail(f"unknown variant; expected one of {', '.join(VARIANTS)}", value=name)
        return name

    @model_validator(mode="after")
    def _source(self) -> ModelSpec:
        if self.path is not None and self.hub is not None:
            raise _fail("give either path or hub, not both", "hub", self.hub.model_dump())
        if self.path is None and self.hub is None and VARIANTS[self.variant].hub_id is None:
            raise _fail(f"variant {self.variant!r} has no hub id: give path or hub", "path", None)
        stride = self.long_notes.stride
        if self.long_notes.strategy == "windows" and (
            problem := stride_problem(stride, self.max_seq, spec=True)
        ):
            raise _fail(problem, "long_notes.stride", stride)
        return self


class MlmSpec(_Section):
    """Masked-LM head output."""

    enabled: bool = Field(False, description="Write MLM predictions (default false).")
    top_k: int = Field(5, ge=1, le=1000, description="Predictions per position (default 5).")
    positions: Literal["mask", "all"] = Field(
        "mask", description="mask: positions holding [MASK] tokens (default); all: every token."
    )


class ClassifySpec(_Section):
    """A fine-tuned sequence classifier's prediction per note (the checkpoint's own head:
    readmission, ICD or phenotype coding): class_logits, class_scores, labels."""

    aggregate: Literal["mean", "max", "first", "none", "huang"] | None = Field(
        None,
        description="A long note's windows -> its prediction: mean (of logits) | max (of "
        "scores) | first | none (one row per window, as model.long_notes.aggregate none) | "
        "huang (one-logit heads: Huang et al.'s readmission score over the windows). Default "
        "null: none where model.long_notes.aggregate is none, else mean.",
    )
    threshold: float = Field(
        0.5, ge=0, le=1, description="Multi-label and one-logit heads: the labels scoring at "
        "least this (default 0.5).",
    )  # fmt: skip
    c: float = Field(2.0, gt=0, description="aggregate huang: its scaling constant (default 2).")


class TokensSpec(_Section):
    """A fine-tuned token classifier's entities per note (the checkpoint's own head: NER,
    de-identification): `entities` with character offsets, grouped as transformers'
    token-classification pipeline groups them; optionally the note with them redacted. One
    row per note (model.long_notes.aggregate mean or first): a long note's windows are
    stitched into one token sequence first."""

    aggregation: Literal["none", "simple", "first", "average", "max"] = Field(
        "simple", description="How tokens become entities, as transformers' pipeline: none "
        "(one per token) | simple (adjacent tokens of one tag, B-/I- aware; default) | first | "
        "average | max (word pieces of a word agree first: its first piece's, their mean or "
        "their best label).",
    )  # fmt: skip
    ignore_labels: list[str] = Field(
        ["O"], description='Labels never written as entities (default ["O"]).'
    )
    min_score: float = Field(
        0.0, ge=0, le=1, description="Entities scoring below this are left out (default 0)."
    )
    redact: bool = Field(
        False, description="Also write text_redacted: the note with every entity span replaced "
        "by [LABEL]. The only note text an output can hold; off by default.",
    )  # fmt: skip


class HeadsSpec(_Section):
    """What to compute from the encoder's hidden states."""

    pooling: Literal["cls", "mean", "pooler"] | None = Field(
        None,
        description="cls | mean | pooler (needs trained pooler weights). Default null: the "
        "variant's (mean for clinical_modernbert, which has no trained pooler), else the "
        "architecture's (cls for BERT, mean for ModernBERT).",
    )
    embeddings: bool = Field(True, description="Write pooled vectors (default true).")
    normalize: bool = Field(
        False,
        description="L2-normalize each written vector (after window aggregation; default "
        "false). Recorded in the output metadata.",
    )
    mlm: MlmSpec = Field(default_factory=MlmSpec, description="Masked-LM outputs.")
    classify: ClassifySpec | None = Field(
        None, description="A fine-tuned sequence classifier's prediction per note (a mapping, "
        "even {}, turns it on; default null: off).",
    )  # fmt: skip
    tokens: TokensSpec | None = Field(
        None, description="A fine-tuned token classifier's entities per note (a mapping, even "
        "{}, turns it on; default null: off).",
    )  # fmt: skip

    @model_validator(mode="after")
    def _some_output(self) -> HeadsSpec:
        if not (self.embeddings or self.mlm.enabled or self.classify or self.tokens):
            raise _fail("nothing to write: enable embeddings, mlm.enabled, classify or tokens",
                        "embeddings", False)  # fmt: skip
        if self.classify is not None and self.tokens is not None:
            raise _fail("a checkpoint has one classifier, a sequence or a token one: set "
                        "heads.classify or heads.tokens", "tokens", "set")  # fmt: skip
        return self


class PoolSpec(_Section):
    """A group of identical actors: one per device slot."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]+$", description="Pool name (unique), used in reports."
    )
    device: Literal["cpu", "cuda", "mps"] = Field(
        description="cpu | cuda (one GPU per actor; AMD GPUs through torch's ROCm build are "
        "cuda too) | mps (Apple GPU: dry runs and small jobs on one machine)."
    )
    actors: int = Field(1, ge=1, description="Number of actors (default 1).")
    cpus_per_actor: int = Field(
        1,
        ge=1,
        description="Ray num_cpus per actor (default 1). CPU actors run this many torch "
        "threads; cuda actors tokenize on this many `tokenizers` threads (unset on a cuda pool: "
        "4, at most the CPUs per GPU of the smallest GPU node).",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="auto (default: resolved in the actor for the device it got: bf16 on GPUs "
        "and CPUs with bf16 units, else fp32) | fp32 | bf16 | fp16 (cuda, mps) | int8 (cpu: "
        "int8 linear layers, the rest fp32; recorded in the output metadata).",
    )
    allow_int8: bool = Field(
        False,
        description="Let precision auto pick int8 on CPU actors (default false: auto never "
        "picks int8 unless allowed here).",
    )
    batch_tokens: int = Field(
        8192, ge=8, description="Token budget per encoder batch (default 8192; >= model.max_seq)."
    )
    mlm_mode: Literal["auto", "cpu", "in_graph"] = Field(
        "auto", description="Where the MLM head runs: auto (default) | cpu | in_graph."
    )
    accelerator_type: str | None = Field(
        None, min_length=1, description="Ray accelerator_type, e.g. H100 (cuda only; default any)."
    )

    @field_validator("precision")
    @classmethod
    def _precision(cls, precision: str, info: ValidationInfo) -> str:
        if problem := precision_problem(info.data.get("device"), precision, spec=True):
            raise ValueError(problem)
        return precision

    @field_validator("accelerator_type")
    @classmethod
    def _accelerator(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("device") != "cuda":
            raise ValueError("needs device cuda")
        return value


class OutputSpec(_Section):
    """Where results go."""

    path: Annotated[str, AfterValidator(_output_path)] = Field(
        description="Output dir or URI; relative paths resolve against the spec file's directory."
    )
    vector_dtype: Literal["float32", "float16"] = Field(
        "float32", description="Embedding element type (default float32)."
    )
    mode: Annotated[str, Field(pattern=r"^0?[0-7]{3}$")] = Field(
        "0700",
        description="Permissions of the dirs the job creates on local disk (output, staging, "
        "_errors); files get the same without x. Default 0700: the output is derived from notes "
        "(PHI), owner only. Widen on purpose, e.g. 0750 for a group.",
    )

    @property
    def dir_mode(self) -> int:
        return int(self.mode, 8)


class RunSpec(_Section):
    """Sharding, retries and limits."""

    shard_rows: int = Field(20000, ge=1, description="Input rows per shard (default 20000).")
    max_shard_attempts: int = Field(
        3, ge=1, description="Tries per shard before it fails (default 3)."
    )
    max_note_chars: int = Field(
        2_000_000,
        ge=1,
        le=2**31 - 1,  # the runtime's token offsets are int32
        description="Longer notes become error rows, reason too_long (default 2000000).",
    )
    batch_rows: int = Field(
        512, ge=1, description="Rows per Arrow record batch read from a shard (default 512)."
    )
    batch_bytes: int = Field(
        8_000_000,
        ge=1,
        description="Record batches are also cut so their note text stays under this many "
        "bytes (default 8000000; a longer single note is a batch of its own): memory follows "
        "this bound, not the notes' length.",
    )
    dry_run_notes: int = Field(300, ge=1, description="Notes a dry run samples (default 300).")
    progress_interval_s: float = Field(
        10, gt=0, description="Seconds between progress lines when not on a terminal (default 10)."
    )
    stall_timeout_s: float | None = Field(
        None,
        gt=0,
        description="A shard attempt with no new record batch for this long has its actor "
        "killed and replaced and the shard re-queued. Default null: 10x the slowest record "
        "batch measured so far in this run, at least 120 s (600 s until a first shard is done, "
        "which covers model loading).",
    )
    staging_dir: Annotated[str, AfterValidator(_output_path)] | None = Field(
        None,
        description="Where jsonl/csv/text inputs are staged as Parquet (a copy of the notes): "
        "never inside output.path. Default null: '<output.path>.staging', beside the output "
        "(on the same storage, so every node can read it). Removed when the job succeeds.",
    )
    keep_staged: bool = Field(
        False, description="Keep the staged copy after a successful job (default false)."
    )
    allow_empty: bool = Field(
        False,
        description="Accept a job that writes no note (default false: when corpus.where keeps "
        "no row, the job ends non-zero with the counts and no _SUCCESS).",
    )
    allow_duplicate_ids: bool = Field(
        False,
        description="Run a corpus whose id column holds an id on more than one row (default "
        "false: such a job is refused before any encoding, naming the id column, how many ids "
        "repeat and one of them, since output rows are known by their id only). When true, "
        "every row is still written once; the report counts the repeated ids.",
    )
