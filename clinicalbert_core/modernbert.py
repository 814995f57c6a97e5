"""ModernBERT (model_type `modernbert`): config fields, the encoder on packed tokens, weights.

BioClinical ModernBERT and answerdotai's ModernBERT. Differences from BERT: no position table
(rotary embeddings, computed in fp32 from positions that restart per sequence: a global theta
on every `global_attn_every_n_layers`-th layer counting from 0, a local theta elsewhere);
local layers attend only to |i - j| <= local_attention // 2; pre-norm layers whose first
`attn_norm` is the identity; no biases by default; fused `Wqkv`; a GeGLU feed-forward
(`Wi` -> input, gate -> act(input) * gate -> `Wo`); a `final_norm`. The reference is
transformers' `modeling_modernbert.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import apply_rope, attention, rope_tables
from .checkpoint_limits import shown
from .config import EncoderConfig, check_activation
from .heads import MlmHead, PredictionHead, pool
from .ops import ACTIVATIONS, FFN_CHUNK, by_chunks, embedding, place
from .packing import PackedBatch

DEFAULT_POOLING = "mean"
KEY_PREFIXES = ("model.",)
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass(frozen=True)
class Config(EncoderConfig):
    vocab_size: int = 50368
    intermediate_size: int = 1152
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 50283
    model_type: str = "modernbert"
    hidden_activation: str = "gelu"
    classifier_activation: str = "gelu"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    decoder_bias: bool = True
    classifier_bias: bool = False
    classifier_pooling: str = "cls"  # a sequence classifier's: the [CLS] row or the mean
    local_attention: int = 128
    layer_types: tuple[str, ...] = ()
    global_rope_theta: float = 160_000.0
    local_rope_theta: float = 10_000.0
    cls_token_id: int | None = None
    sep_token_id: int | None = None

    ARCHITECTURE = "ModernBertForMaskedLM"
    POSITIVE_FIELDS = (*EncoderConfig.POSITIVE_FIELDS, "local_attention")

    @property
    def window(self) -> int:
        """Local layers keep keys with |i - j| <= window."""
        return self.local_attention // 2

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        """An HF ModernBERT config.json: the older layout (global_attn_every_n_layers,
        global/local_rope_theta) or the newer one (layer_types, rope_parameters)."""
        values = cls.known_fields(raw)
        if "hidden_activation" not in values and raw.get("hidden_act"):
            values["hidden_activation"] = raw["hidden_act"]
        layers = values.get("num_hidden_layers", cls.num_hidden_layers)
        types = raw.get("layer_types")
        if types is None:
            every = raw.get("global_attn_every_n_layers") or 3
            if not isinstance(every, int) or every < 1:
                raise ValueError(
                    f"{source}: global_attn_every_n_layers must be >= 1, got {shown(every)}"
                )
            types = [LAYER_TYPES[bool(i % every)] for i in range(layers)]
        if (
            not isinstance(types, list | tuple)
            or not all(isinstance(t, str) and t in LAYER_TYPES for t in types)
            or len(types) != layers
        ):
            raise ValueError(
                f"{source}: layer_types must list {layers} entries from {LAYER_TYPES}, got "
                f"{shown(types)}"
            )
        values["layer_types"] = tuple(types)
        rope = raw.get("rope_parameters") or {}
        if raw.get("rope_scaling"):
            raise ValueError(f"{source}: rope_scaling is not supported")
        for kind, field in (("full_attention", "global_rope_theta"),
                            ("sliding_attention", "local_rope_theta")):  # fmt: skip
            params = (rope.get(kind) or {}) if isinstance(rope, dict) else rope
            if not isinstance(params, dict):
                raise ValueError(f"{source}: rope_parameters must map attention kinds to "
                                 f"objects, got {shown(rope)}")  # fmt: skip
            if params.get("rope_type", "default") != "default":
                raise ValueError(
                    f"{source}: rope_parameters.{kind}.rope_type {shown(params['rope_type'])} is "
                    "not supported (only 'default')"
                )
            if (theta := params.get("rope_theta")) is not None:
                try:
                    values[field] = float(theta)
                except (TypeError, ValueError):
                    raise ValueError(f"{source}: rope_parameters.{kind}.rope_theta must be a "
                                     f"number, got {shown(theta)}") from None  # fmt: skip
        config = cls(**{**values, "model_type": "modernbert"})
        config.validate(source)
        for name in ("hidden_activation", "classifier_activation"):
            check_activation(name, getattr(config, name), tuple(ACTIVATIONS), source)
        if config.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"{source}: classifier_pooling {shown(config.classifier_pooling)} "
                             "is not supported (supported: cls, mean)")  # fmt: skip
        if config.local_attention < 2 or config.local_attention % 2:
            raise ValueError(
                f"{source}: local_attention must be an even number >= 2, got {config.local_attention}"
            )
        return config


class Layer(nn.Module):
    def __init__(self, config: Config, index: int):
        super().__init__()
        c, eps, nb = config.hidden_size, config.norm_eps, config.norm_bias
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.attn_norm = nn.Identity() if index == 0 else nn.LayerNorm(c, eps=eps, bias=nb)
        self.qkv = nn.Linear(c, 3 * c, bias=config.attention_bias)
        self.attn_out = nn.Linear(c, c, bias=config.attention_bias)
        self.mlp_norm = nn.LayerNorm(c, eps=eps, bias=nb)
        self.ffn_in = nn.Linear(c, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.ffn_out = nn.Linear(config.intermediate_size, c, bias=config.mlp_bias)
        self.act = ACTIVATIONS[config.hidden_activation]
        local = config.layer_types[index] == "sliding_attention"
        self.window = config.window if local else None
        self.theta = config.local_rope_theta if local else config.global_rope_theta
        self.varlen = False  # set once by the runner when the CUDA varlen kernel applies
        self.ffn_chunk = FFN_CHUNK["cpu"]  # set once by the runner for its device

    def forward(
        self, x: torch.Tensor, batch: PackedBatch, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        qkv = self.qkv(self.attn_norm(x)).view(-1, 3, self.heads, self.head_dim)  # (N, 3, H, D)
        q, k, v = qkv.unbind(1)  # 3 x (N, H, D)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        a = attention(q, k, v, batch, varlen=self.varlen, window=self.window)  # (N, H, D)
        x = x + self.attn_out(a.flatten(1))
        return by_chunks(self.mlp, x, self.ffn_chunk)  # (N, C)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        inp, gate = self.ffn_in(self.mlp_norm(x)).chunk(2, dim=-1)  # 2 x (n, I)
        return x + self.ffn_out(self.act(inp) * gate)  # (n, C)


class Embeddings(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.word = embedding(config.vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.word(input_ids))  # (N, C)


class Encoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        c = config.hidden_size
        self.final_norm = nn.LayerNorm(c, eps=config.norm_eps, bias=config.norm_bias)

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed(batch.input_ids)  # (N, C)
        thetas = {layer.theta for layer in self.layers}
        ropes = {t: rope_tables(batch.position_ids, t, self.config.head_dim) for t in thetas}
        for layer in self.layers:
            x = layer(x, batch, ropes[layer.theta])
        return self.final_norm(x)  # (N, C) final hidden states

    def place(self, varlen: bool, ffn_chunk: int) -> None:
        place(self.layers, varlen, ffn_chunk)


Pooler = None  # ModernBERT checkpoints carry no pooler: pooling='pooler' is refused


def _prediction_head(config: Config) -> PredictionHead:
    """ModernBertPredictionHead: dense -> classifier_activation -> norm."""
    return PredictionHead(
        config.hidden_size, ACTIVATIONS[config.classifier_activation], config.norm_eps,
        dense_bias=config.classifier_bias, norm_bias=config.norm_bias,
    )  # fmt: skip


class SequenceHead(nn.Module):
    """ModernBertForSequenceClassification's head: each window's [CLS] row or its mean
    (`classifier_pooling`), the prediction head, the classifier. Parameters: head.*,
    classifier.*."""

    def __init__(self, config: Config, num_labels: int):
        super().__init__()
        self.pooling = config.classifier_pooling
        self.head = _prediction_head(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(pool(hidden, cu_seqlens, self.pooling)))  # (B, L)


class TokenHead(nn.Module):
    """ModernBertForTokenClassification's head: the prediction head and the classifier on
    every token."""

    def __init__(self, config: Config, num_labels: int):
        super().__init__()
        self.head = _prediction_head(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(hidden))  # (N, L)


def classifier_head(config: Config, kind: str, num_labels: int) -> nn.Module:
    return (SequenceHead if kind == "sequence" else TokenHead)(config, num_labels)


def mlm_head(config: Config) -> MlmHead:
    """head.dense -> act -> head.norm -> decoder (tied to the token embeddings) + bias."""
    return MlmHead(
        config.hidden_size, config.vocab_size, ACTIVATIONS[config.classifier_activation],
        config.norm_eps, dense_bias=config.classifier_bias, norm_bias=config.norm_bias,
        decoder_bias=config.decoder_bias,
    )  # fmt: skip


# ---- weights: HF key (prefix `model.` stripped) -> ours; `{i}` is a layer --------------------
RENAMES: dict[str, str] = {
    "embeddings.tok_embeddings.weight": "embed.word.weight",
    "embeddings.norm.weight": "embed.norm.weight",
    "embeddings.norm.bias": "embed.norm.bias",
    "layers.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "layers.{i}.attn_norm.bias": "layers.{i}.attn_norm.bias",
    "layers.{i}.attn.Wqkv.weight": "layers.{i}.qkv.weight",
    "layers.{i}.attn.Wqkv.bias": "layers.{i}.qkv.bias",
    "layers.{i}.attn.Wo.weight": "layers.{i}.attn_out.weight",
    "layers.{i}.attn.Wo.bias": "layers.{i}.attn_out.bias",
    "layers.{i}.mlp_norm.weight": "layers.{i}.mlp_norm.weight",
    "layers.{i}.mlp_norm.bias": "layers.{i}.mlp_norm.bias",
    "layers.{i}.mlp.Wi.weight": "layers.{i}.ffn_in.weight",
    "layers.{i}.mlp.Wi.bias": "layers.{i}.ffn_in.bias",
    "layers.{i}.mlp.Wo.weight": "layers.{i}.ffn_out.weight",
    "layers.{i}.mlp.Wo.bias": "layers.{i}.ffn_out.bias",
    "final_norm.weight": "final_norm.weight",
    "final_norm.bias": "final_norm.bias",
    "head.dense.weight": "head.dense.weight",
    "head.dense.bias": "head.dense.bias",
    "head.norm.weight": "head.norm.weight",
    "head.norm.bias": "head.norm.bias",
    "decoder.weight": "mlm.decoder.weight",
    "decoder.bias": "mlm.decoder.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
# The prediction head `head.*` (dense -> act -> norm) is shared: the MLM head is it and the
# decoder (built as mlm.dense, mlm.norm, mlm.decoder), a classifier is it and `classifier.*`.
SHARED_HEAD = "head."
IGNORED = re.compile(r"^$")  # nothing in a ModernBERT checkpoint is skipped silently


def normalise_key(key: str) -> str:
    return key


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    c, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"embed.word.weight": (v, c), "embed.norm.weight": (c,)}
    if config.norm_bias:
        shapes["embed.norm.bias"] = (c,)
        shapes["final_norm.bias"] = (c,)
    shapes["final_norm.weight"] = (c,)
    for n in range(config.num_hidden_layers):
        p = f"layers.{n}."
        norms = ("mlp_norm",) if n == 0 else ("attn_norm", "mlp_norm")
        for norm in norms:
            shapes[p + norm + ".weight"] = (c,)
            if config.norm_bias:
                shapes[p + norm + ".bias"] = (c,)
        for name, shape, bias in (
            ("qkv", (3 * c, c), config.attention_bias),
            ("attn_out", (c, c), config.attention_bias),
            ("ffn_in", (2 * i, c), config.mlp_bias),
            ("ffn_out", (c, i), config.mlp_bias),
        ):
            shapes[p + name + ".weight"] = shape
            if bias:
                shapes[p + name + ".bias"] = shape[:1]
    return shapes


def head_shapes(config: Config, num_labels: int = 0) -> dict[str, dict[str, tuple[int, ...]]]:
    c, v = config.hidden_size, config.vocab_size
    head: dict[str, tuple[int, ...]] = {"head.dense.weight": (c, c), "head.norm.weight": (c,)}
    if config.classifier_bias:
        head["head.dense.bias"] = (c,)
    if config.norm_bias:
        head["head.norm.bias"] = (c,)
    mlm = {**head, **({"mlm.decoder.bias": (v,)} if config.decoder_bias else {})}
    classifier = {**head, "classifier.weight": (num_labels, c), "classifier.bias": (num_labels,)}
    return {"pooler": {}, "mlm": mlm, "sequence": classifier, "token": classifier}


def finish(params: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    return params  # Wqkv is fused already; no position table


# ---- what the tokenizer and `inspect` need from the config -------------------------------------
def special_ids(config: Config) -> dict[str, int | None]:
    """The framing token ids the config names (`cls_token_id`, `sep_token_id`), a fallback for
    tokenizer files that do not say."""
    return {"cls": config.cls_token_id, "sep": config.sep_token_id}


def inspect_fields(config: Config) -> dict[str, Any]:
    """ModernBERT's own entries of `inspect`: local window, global layer period, rope thetas."""
    return {
        "local_window": config.local_attention,
        "global_every": _global_every(config),
        "rope_theta": {"global": config.global_rope_theta, "local": config.local_rope_theta},
    }


def inspect_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) lines `clinicalbert inspect` prints after the shape, from `inspect`'s dict."""
    every, window = info["global_every"], info["local_window"]
    layers = every if every else "layer in " + str(info["config"]["layer_types"])
    theta = info["rope_theta"]
    return [
        ("attention", f"local window {window} (|i-j| <= {window // 2}), global every {layers}"),
        ("rope theta", f"global {theta['global']:g}, local {theta['local']:g}"),
    ]


def _global_every(config: Config) -> int | None:
    """The period of global layers when they are evenly spaced from layer 0, else None."""
    types = config.layer_types
    globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
    if len(globals_) > 1 and globals_[0] == 0:
        step = globals_[1]
        expect = [i for i in range(len(types)) if i % step == 0]
        return step if globals_ == expect else None
    return None
