"""ClinicalBertRunner: weights, tokenizer, encoder and heads placed once on one device.

Three steps, usable separately (the job layer tokenizes ahead of the encoder and batches
windows across notes): `tokenize` (notes -> windows), `encode_windows` (windows -> per-window
vectors and MLM rows, in token-budget batches) and `aggregate` (windows -> notes).
`encode` and `mlm` chain them for notes in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from . import architectures
from . import weights as W
from .aggregate import aggregate_rows, token_index
from .classify import CLASS_AGGREGATES, HUANG_C, SEQUENCE, TOKEN, TaskHead, task_head
from .config import EncoderConfig
from .device import (
    DTYPES,
    MlmExecMode,
    check_device,
    resolve_mlm_mode,
    resolve_precision,
    varlen_supported,
)
from .entities import Entities, NoteTokens, Subwords, group
from .heads import AGGREGATES, POOLINGS, pool
from .hub import ModelBundle, open_checkpoint
from .in_memory import NoteMethods
from .limits import batch_tokens_problem, max_seq_problem
from .mlm import MlmRows, concat_mlm, mlm_rows
from .ops import (
    FFN_CHUNK,
    PackedLinear,
    bound_onednn_caches,
    packed_linear_supported,
    reuse_freed_memory,
    swap_linears,
)
from .packing import DeviceFeed, PackedBatch, token_budget_batches
from .quant import Int8Linear
from .stitch import stitch
from .tokenizer import LONG_NOTE_POLICIES, NoteTokenizer, Specials, Windows, tokenizer_kind
from .variants import get_variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOptions:
    """How a runner encodes: device, precision, windows, heads, batching."""

    device: str = "cpu"  # cpu | cuda | cuda:1 ...
    precision: str = "auto"  # fp32 | bf16 | fp16 (cuda, mps) | int8 (cpu) | auto
    allow_int8: bool = False  # let `auto` pick int8 on CPU (never silently)
    max_seq: int = 512  # tokens per window incl. the framing tokens
    pooling: str | None = None  # cls | mean | pooler; None: the variant's / architecture's
    embeddings: bool = True  # compute pooled vectors
    mlm: bool = False  # load the masked-LM head
    mlm_mode: str = "auto"  # auto | cpu | in_graph
    classify: bool = False  # the checkpoint's fine-tuned classifier (its config: sequence/token)
    class_aggregate: str = "mean"  # a sequence classifier's windows -> note (classify.py)
    threshold: float = 0.5  # multi-label and one-logit heads: labels scoring >= it
    huang_c: float = HUANG_C  # class_aggregate 'huang': the readmission score's constant
    long_notes: str = "truncate"  # truncate | windows
    stride: int | None = None  # tokens shared by consecutive windows; None: default_stride
    aggregate: str = "mean"  # windows -> note: mean | first | none
    normalize: bool = False  # L2-normalize the final vectors (note, or window with 'none')
    batch_tokens: int = 8192  # token budget per encoder batch (padded tokens)
    compile: bool = False  # torch.compile the encoder

    def __post_init__(self) -> None:
        if not (self.embeddings or self.mlm or self.classify):
            raise ValueError("nothing to compute: set embeddings, mlm and/or classify")
        if self.class_aggregate not in CLASS_AGGREGATES:
            raise ValueError(f"class_aggregate must be one of {CLASS_AGGREGATES}, got "
                             f"{self.class_aggregate!r}")  # fmt: skip
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.long_notes not in LONG_NOTE_POLICIES:
            raise ValueError(
                f"long_notes must be one of {LONG_NOTE_POLICIES}, got {self.long_notes!r}"
            )
        if problem := batch_tokens_problem(self.batch_tokens, self.max_seq):
            raise ValueError(problem)
        MlmExecMode(self.mlm_mode)  # ValueError on an unknown mode


@dataclass
class WindowOutput:
    vectors: np.ndarray  # float32[w, C] one per window, in the order asked for ([0, C]
    # when the runner computes no embeddings)
    mlm: MlmRows | None = None
    hidden: torch.Tensor | None = None  # float32[N, C] packed, windows in the order asked for
    cu_seqlens: torch.Tensor | None = None  # int32[w+1]
    class_logits: np.ndarray | None = None  # float32[w, L]: a sequence classifier's
    token_logits: np.ndarray | None = None  # float32[t, L]: a token classifier's, per packed
    # token of the windows asked for (framing tokens included), in their order


class ClinicalBertRunner(NoteMethods):
    def __init__(
        self,
        config: EncoderConfig,
        state: dict[str, torch.Tensor],
        tokenizer: Tokenizer,
        specials: Specials,
        options: RunnerOptions = RunnerOptions(),
        *,
        variant: str = "custom",
        lowercase: bool | None = None,
        weights_sha256: str | None = None,
        source: str = "checkpoint",
    ):
        bound_onednn_caches()  # before this process's first oneDNN op (see ops.ONEDNN_CACHE_ENV)
        o = self.options = options
        if problem := max_seq_problem(o.max_seq, config.max_position_embeddings):
            raise ValueError(problem)
        arch = architectures.of(config)
        self.config, self.variant, self.lowercase = config, variant, lowercase
        self.architecture, self.tokenizer_kind = config.model_type, tokenizer_kind(tokenizer)
        self.weights_sha256 = weights_sha256
        self.device = check_device(o.device)
        self.precision = resolve_precision(o.precision, self.device, o.allow_int8)
        self.dtype = DTYPES[self.precision]
        self.pooling = o.pooling or get_variant(variant).pooling or arch.DEFAULT_POOLING
        self.aggregate, self.batch_tokens = o.aggregate, o.batch_tokens
        self.mlm_mode = MlmExecMode(o.mlm_mode)
        self.tokenizer = NoteTokenizer(tokenizer, o.max_seq, o.long_notes, o.stride, specials)

        want_pooler = o.embeddings and self.pooling == "pooler"
        self.task = _task(config, state, source) if o.classify else None
        kind = self.task.kind if self.task else None
        params = W.convert(state, config, want_pooler, o.mlm, source, classifier=kind)
        build = partial(_build, params=params, device=self.device, dtype=self.dtype)
        self.encoder = build(arch.Encoder, config, "")
        if self.precision == "int8":  # the layers' linears; embeddings and heads stay fp32
            swap_linears(self.encoder.layers, Int8Linear)
        elif self.device.type == "cpu" and not o.compile and packed_linear_supported(self.dtype):
            swap_linears(self.encoder.layers, PackedLinear)
        if self.device.type == "cpu":
            reuse_freed_memory()
        varlen = varlen_supported(self.device, self.dtype)
        self.encoder.place(varlen, FFN_CHUNK.get(self.device.type, FFN_CHUNK["cpu"]))
        self.pooler = build(arch.Pooler, config, "pooler.") if want_pooler else None
        self.classifier = None
        if self.task is not None:
            head = partial(arch.classifier_head, kind=kind, num_labels=self.task.num_labels)
            self.classifier = build(head, config, "")
        self._build_mlm(arch, params)
        self._subwords: Subwords | None = None  # how the tokenizer marks word pieces (entities)
        self._forward = torch.compile(self.encoder, dynamic=True) if o.compile else self.encoder
        log.info(
            "runner ready: variant=%s architecture=%s device=%s precision=%s attention=%s "
            "pooling=%s embeddings=%s mlm=%s",
            variant, self.architecture, self.device, self.precision,
            "varlen" if varlen else "sdpa", self.pooling, o.embeddings, o.mlm,
        )  # fmt: skip

    def _build_mlm(self, arch: Any, params: dict[str, torch.Tensor]) -> None:
        """The MLM head (options.mlm) on the encoder's device, and where `mlm_mode` may run
        it on the host, an fp32 copy there."""
        self.mlm_head = self.mlm_head_host = None
        if not self.options.mlm:
            return
        self.mlm_head = _build(arch.mlm_head, self.config, "mlm.", params, self.device, self.dtype)
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self.mlm_head_host = self.mlm_head  # the host fp32 head already
        elif self.mlm_mode is not MlmExecMode.IN_GRAPH:  # fp32 copy for host placement
            cpu = torch.device("cpu")
            self.mlm_head_host = _build(
                arch.mlm_head, self.config, "mlm.", params, cpu, torch.float32
            )

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        variant: str | None = None,
        config: str | Path | None = None,
        lowercase: bool | None = None,
        revision: str | None = None,
        **options: Any,
    ) -> ClinicalBertRunner:
        """From a prepared dir, a raw HF snapshot dir, a model.safetensors file or a hub id;
        `options` are RunnerOptions fields."""
        ck = open_checkpoint(source, variant, lowercase, revision, config)
        return cls(
            ck.config,
            ck.state(),
            ck.tokenizer,
            ck.specials,
            RunnerOptions(**options),
            variant=ck.variant.name,
            lowercase=ck.lowercase,
            weights_sha256=(ck.files.manifest or {}).get("files", {}).get(ck.files.weights.name),
            source=str(ck.files.weights),
        )

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, **options: Any) -> ClinicalBertRunner:
        """From a ModelBundle (e.g. fetched from Ray's object store)."""
        return cls(
            architectures.load_config(bundle.config, source="bundle config"),
            W.read_state_dict(bundle.weights),
            Tokenizer.from_str(bundle.tokenizer_json),
            Specials(**bundle.specials),
            RunnerOptions(**options),
            variant=bundle.variant,
            lowercase=bundle.lowercase,
            weights_sha256=bundle.weights_sha256,
            source=f"bundle {bundle.variant}",
        )

    # ---- the three steps -----------------------------------------------------------------
    def tokenize(self, notes: Sequence[str]) -> Windows:
        return self.tokenizer(list(notes))

    @torch.inference_mode()
    def encode_windows(
        self,
        windows: Windows,
        select: np.ndarray | None = None,
        *,
        mlm_positions: str = "mask",
        top_k: int = 5,
        return_hidden: bool = False,
        return_logits: bool = False,
    ) -> WindowOutput:
        """Encode windows (all, or `select`) in token-budget batches sorted by length.

        Vectors come back in the order of `select`. MLM rows (when the runner has the MLM
        head) are computed at [MASK] positions (`mlm_positions='mask'`) or every position
        ('all').
        """
        select = np.arange(windows.num_windows) if select is None else np.asarray(select)
        lengths = windows.lengths[select]
        token_bounds = np.concatenate(([0], np.cumsum(lengths)))  # (w+1,) in `select` order
        out = self._room(len(select), int(token_bounds[-1]))
        hidden_parts: dict[int, torch.Tensor] = {}
        mlm_parts: list[MlmRows] = []
        batches = token_budget_batches(lengths, self.batch_tokens)
        feed = DeviceFeed(windows.ids, windows.bounds, [select[b] for b in batches], self.device)
        for fed in feed:
            batch_idx, chosen, batch = batches[fed.index], feed.batches[fed.index], fed.host
            hidden = self._forward(fed.batch)  # (N, C)
            pooled = (
                pool(hidden, fed.batch.cu_seqlens, self.pooling, self.pooler)  # (b, C)
                if self.options.embeddings
                else None
            )
            feed.prefetch()  # the next batch is packed and copied while this one computes
            if pooled is not None:
                out.vectors[batch_idx] = pooled.float().cpu().numpy()
            if self.classifier is not None:  # (b, L) per window, or (N, L) per token
                logits = self.classifier(hidden, fed.batch.cu_seqlens).float().cpu().numpy()
                if out.class_logits is not None:
                    out.class_logits[batch_idx] = logits
                else:
                    out.token_logits[token_index(token_bounds, batch_idx)] = logits
            if self.mlm_head is not None:
                mlm_parts.append(
                    self._mlm_rows(
                        hidden, batch, fed.ids, chosen, mlm_positions, top_k, return_logits
                    )
                )
            if return_hidden:
                starts = batch.cu_seqlens.tolist()
                h = hidden.float().cpu()
                for j, i in enumerate(batch_idx):
                    hidden_parts[int(i)] = h[starts[j] : starts[j + 1]]
        if mlm_parts:
            out.mlm = concat_mlm(mlm_parts)
        if return_hidden:
            out.hidden, out.cu_seqlens = _packed([hidden_parts[i] for i in range(len(select))],
                                                 self.config.hidden_size)  # fmt: skip
        return out

    def _room(self, windows: int, tokens: int) -> WindowOutput:
        """What encode_windows fills for `windows` windows of `tokens` tokens in all: vectors
        (with embeddings), a sequence classifier's logits per window or a token classifier's
        per token."""
        kind = self.task.kind if self.task is not None else None
        width = self.task.num_labels if self.task is not None else 0
        rows = windows if self.options.embeddings else 0
        return WindowOutput(
            vectors=np.empty((rows, self.config.hidden_size), np.float32),
            class_logits=np.empty((windows, width), np.float32) if kind == SEQUENCE else None,
            token_logits=np.empty((tokens, width), np.float32) if kind == TOKEN else None,
        )

    def group_entities(
        self,
        notes: Sequence[str],
        windows: Windows,
        token_logits: np.ndarray,
        aggregation: str = "simple",
        ignore_labels: Sequence[str] = ("O",),
        min_score: float = 0.0,
    ) -> Entities:
        """A token classifier's per-token logits (`encode_windows`' token_logits of all of
        `windows`, in order) -> each note's entities: the windows stitched (stitch.py), the
        tokens grouped as transformers' pipeline groups them (entities.py). `notes`: the
        texts `windows` were tokenized from (the subword rules look at them)."""
        if self._subwords is None:
            self._subwords = Subwords.of(self.tokenizer.tokenizer)
        take, offsets = stitch(windows, self.tokenizer.step)
        tokens = NoteTokens(windows.ids[take], windows.token_char[take].astype(np.int64),
                            windows.token_end[take].astype(np.int64), token_logits[take],
                            offsets)  # fmt: skip
        flags = self._subwords.flags(notes, tokens)
        return group(tokens, flags, self.task.labels, aggregation, ignore_labels, min_score)

    def aggregate_vectors(self, windows: Windows, vectors: np.ndarray) -> np.ndarray:
        """Per-window vectors [W, C] (window order) -> per note [notes, C] by the runner's
        aggregate (with aggregate 'none' the windows are the rows), L2-normalized when the
        runner's `normalize` is set. A note without tokens (`windows.note_tokens == 0`) gets
        a zero row (never NaN)."""
        return aggregate_rows(windows, vectors, self.aggregate, self.options.normalize)

    # ---- internals -------------------------------------------------------------------------
    def _mlm_rows(self, hidden: torch.Tensor, batch: PackedBatch, *args: Any) -> MlmRows:
        """mlm.mlm_rows of one batch, the MLM head where `mlm_mode` runs it for a batch of
        this many windows: on the host in fp32, or on the encoder's device."""
        if resolve_mlm_mode(self.mlm_mode, self.device.type, batch.num_seqs) is MlmExecMode.CPU:
            head = lambda rows: self.mlm_head_host(rows.float().cpu())  # noqa: E731 (M, V)
        else:
            head = lambda rows: self.mlm_head(rows).float()  # noqa: E731 (M, V)
        return mlm_rows(hidden, batch, *args, mask_id=self.tokenizer.mask_id, logits_of=head)


def _packed(seqs: list[torch.Tensor], hidden_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window hidden states [n_i, C] -> (packed [N, C], cu_seqlens int32[w+1])."""
    packed = torch.cat(seqs) if seqs else torch.zeros(0, hidden_size)
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    return packed, torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def _task(config: EncoderConfig, state: dict[str, torch.Tensor], source: str) -> TaskHead:
    """The classifier `classify=True` loads: ValueError when the checkpoint has none."""
    head = task_head(config.to_dict(), W.classifier_rows(state, config), f"{source} config")
    if head is None:
        raise ValueError(f"{source}: classify=True needs a fine-tuned classifier, and this "
                         "checkpoint has no classifier weights (classifier.weight)")  # fmt: skip
    return head


def _build(
    factory: Callable[[EncoderConfig], torch.nn.Module],
    config: EncoderConfig,
    prefix: str,
    params: dict[str, torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.nn.Module:
    """Build on the meta device, load the params it names (`prefix` + its own names: `convert`
    has checked every one), place it (eval mode)."""
    with torch.device("meta"):
        module = factory(config)
    own = {k: params[prefix + k] for k in module.state_dict()}
    module.load_state_dict(own, strict=True, assign=True)
    return module.to(device=device, dtype=dtype).eval()
