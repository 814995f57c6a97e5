"""BERT (model_type `bert`): config fields, the encoder on packed tokens, weight names.

Bio_ClinicalBERT, Bio_Discharge_Summary_BERT, Huang's ClinicalBERT and Clinical ModernBERT
(a BERT despite its name) are all this architecture. Post-norm layers, learned absolute
positions (the token-type row folded into them at load: every note is one segment, type 0),
Q/K/V fused into one projection at load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import attention
from .checkpoint_limits import shown
from .config import EncoderConfig, check_activation
from .heads import MlmHead
from .ops import ACTIVATIONS, FFN_CHUNK, by_chunks, embedding, place
from .packing import PackedBatch

DEFAULT_POOLING = "cls"
KEY_PREFIXES = ("bert.",)


@dataclass(frozen=True)
class Config(EncoderConfig):
    hidden_act: str = "gelu"
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    POSITIVE_FIELDS = (*EncoderConfig.POSITIVE_FIELDS, "type_vocab_size")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        """An HF `config.json` or a legacy `bert_config.json` dict (no model_type)."""
        pos_type = raw.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(
                f"{source}: position_embedding_type {shown(pos_type)} is not supported "
                "(only 'absolute')"
            )
        if raw.get("is_decoder") or raw.get("add_cross_attention"):
            raise ValueError(f"{source}: decoder / cross-attention BERT configs are not supported")
        config = cls(**{**cls.known_fields(raw), "model_type": "bert"})
        config.validate(source)
        check_activation("hidden_act", config.hidden_act, tuple(ACTIVATIONS), source)
        return config


class Embeddings(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.word = embedding(config.vocab_size, config.hidden_size)
        self.position = embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.word(input_ids) + self.position(position_ids))  # (N, C)


class Layer(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(c, 3 * c)
        self.attn_out = nn.Linear(c, c)
        self.attn_norm = nn.LayerNorm(c, eps=eps)
        self.ffn_in = nn.Linear(c, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, c)
        self.ffn_norm = nn.LayerNorm(c, eps=eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.varlen = False  # set once by the runner when the CUDA varlen kernel applies
        self.ffn_chunk = FFN_CHUNK["cpu"]  # set once by the runner for its device

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        q, k, v = self.qkv(x).view(-1, 3, self.heads, self.head_dim).unbind(1)  # 3 x (N, H, D)
        a = attention(q, k, v, batch, varlen=self.varlen)  # (N, H, D)
        x = self.attn_norm(x + self.attn_out(a.flatten(1)))
        return by_chunks(self.ffn, x, self.ffn_chunk)  # (N, C)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))  # (n, C)


class Encoder(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed(batch.input_ids, batch.position_ids)  # (N, C)
        for layer in self.layers:
            x = layer(x, batch)
        return x  # (N, C) final hidden states

    def place(self, varlen: bool, ffn_chunk: int) -> None:
        place(self.layers, varlen, ffn_chunk)


class Pooler(nn.Module):
    """BERT's pooler: tanh(W · h_cls + b)."""

    def __init__(self, config: Config):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h_cls: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(h_cls))  # (B, C)


class SequenceHead(nn.Module):
    """BertForSequenceClassification's head: the pooler on each window's [CLS] row, then the
    classifier. Its parameters carry our names (pooler.*, classifier.*)."""

    def __init__(self, config: Config, num_labels: int):
        super().__init__()
        self.pooler = Pooler(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(hidden[cu_seqlens[:-1].long()]))  # (B, L)


class TokenHead(nn.Module):
    """BertForTokenClassification's head: the classifier on every token."""

    def __init__(self, config: Config, num_labels: int):
        super().__init__()
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return self.classifier(hidden)  # (N, L)


def classifier_head(config: Config, kind: str, num_labels: int) -> nn.Module:
    return (SequenceHead if kind == "sequence" else TokenHead)(config, num_labels)


def mlm_head(config: Config) -> MlmHead:
    """dense + act + LayerNorm + decoder, every piece with a bias."""
    act = ACTIVATIONS[config.hidden_act]
    return MlmHead(config.hidden_size, config.vocab_size, act, config.layer_norm_eps)


# ---- weights: HF key (prefix stripped, gamma/beta normalised) -> ours; `{i}` is a layer ----
RENAMES: dict[str, str] = {
    "embeddings.word_embeddings.weight": "embed.word.weight",
    "embeddings.position_embeddings.weight": "embed.position.weight",
    "embeddings.token_type_embeddings.weight": "token_type",  # folded into positions
    "embeddings.LayerNorm.weight": "embed.norm.weight",
    "embeddings.LayerNorm.bias": "embed.norm.bias",
    "encoder.layer.{i}.attention.self.query.weight": "layers.{i}.q.weight",
    "encoder.layer.{i}.attention.self.query.bias": "layers.{i}.q.bias",
    "encoder.layer.{i}.attention.self.key.weight": "layers.{i}.k.weight",
    "encoder.layer.{i}.attention.self.key.bias": "layers.{i}.k.bias",
    "encoder.layer.{i}.attention.self.value.weight": "layers.{i}.v.weight",
    "encoder.layer.{i}.attention.self.value.bias": "layers.{i}.v.bias",
    "encoder.layer.{i}.attention.output.dense.weight": "layers.{i}.attn_out.weight",
    "encoder.layer.{i}.attention.output.dense.bias": "layers.{i}.attn_out.bias",
    "encoder.layer.{i}.attention.output.LayerNorm.weight": "layers.{i}.attn_norm.weight",
    "encoder.layer.{i}.attention.output.LayerNorm.bias": "layers.{i}.attn_norm.bias",
    "encoder.layer.{i}.intermediate.dense.weight": "layers.{i}.ffn_in.weight",
    "encoder.layer.{i}.intermediate.dense.bias": "layers.{i}.ffn_in.bias",
    "encoder.layer.{i}.output.dense.weight": "layers.{i}.ffn_out.weight",
    "encoder.layer.{i}.output.dense.bias": "layers.{i}.ffn_out.bias",
    "encoder.layer.{i}.output.LayerNorm.weight": "layers.{i}.ffn_norm.weight",
    "encoder.layer.{i}.output.LayerNorm.bias": "layers.{i}.ffn_norm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
    "cls.predictions.transform.dense.weight": "mlm.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm.norm.bias",
    "cls.predictions.decoder.weight": "mlm.decoder.weight",
    "cls.predictions.bias": "mlm.decoder.bias",
    "classifier.weight": "classifier.weight",
    "classifier.bias": "classifier.bias",
}
SHARED_HEAD = None  # no tensors shared between heads
IGNORED = re.compile(
    r"^(cls\.seq_relationship\.|embeddings\.position_ids$|cls\.predictions\.decoder\.bias$)"
)


def normalise_key(key: str) -> str:
    """Legacy TF-converted checkpoints name LayerNorm parameters gamma/beta."""
    if key.endswith(".gamma"):
        return key[: -len(".gamma")] + ".weight"
    if key.endswith(".beta"):
        return key[: -len(".beta")] + ".bias"
    return key


def expected_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Encoder tensors (ours, before fusing) and the optional heads' tensors."""
    c, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed.word.weight": (v, c),
        "embed.position.weight": (config.max_position_embeddings, c),
        "token_type": (config.type_vocab_size, c),
        "embed.norm.weight": (c,),
        "embed.norm.bias": (c,),
    }
    for n in range(config.num_hidden_layers):
        for name, shape in {
            "q.weight": (c, c), "q.bias": (c,), "k.weight": (c, c), "k.bias": (c,),
            "v.weight": (c, c), "v.bias": (c,), "attn_out.weight": (c, c), "attn_out.bias": (c,),
            "attn_norm.weight": (c,), "attn_norm.bias": (c,), "ffn_in.weight": (i, c),
            "ffn_in.bias": (i,), "ffn_out.weight": (c, i), "ffn_out.bias": (c,),
            "ffn_norm.weight": (c,), "ffn_norm.bias": (c,),
        }.items():  # fmt: skip
            shapes[f"layers.{n}.{name}"] = shape
    return shapes


def head_shapes(config: Config, num_labels: int = 0) -> dict[str, dict[str, tuple[int, ...]]]:
    c, v = config.hidden_size, config.vocab_size
    pooler = {"pooler.dense.weight": (c, c), "pooler.dense.bias": (c,)}
    classifier = {"classifier.weight": (num_labels, c), "classifier.bias": (num_labels,)}
    return {
        "pooler": pooler,
        "mlm": {
            "mlm.dense.weight": (c, c), "mlm.dense.bias": (c,), "mlm.norm.weight": (c,),
            "mlm.norm.bias": (c,), "mlm.decoder.bias": (v,),
        },
        "sequence": {**pooler, **classifier},  # BertForSequenceClassification: pooler first
        "token": classifier,
    }  # fmt: skip


def finish(params: dict[str, torch.Tensor], config: Config) -> dict[str, torch.Tensor]:
    """Fuse Q/K/V per layer; fold the token-type-0 row into the position table."""
    for n in range(config.num_hidden_layers):
        p = f"layers.{n}."
        params[p + "qkv.weight"] = torch.cat([params.pop(p + x + ".weight") for x in "qkv"])
        params[p + "qkv.bias"] = torch.cat([params.pop(p + x + ".bias") for x in "qkv"])
    token_type = params.pop("token_type")
    params["embed.position.weight"] = params["embed.position.weight"] + token_type[0]
    return params


# ---- what the tokenizer and `inspect` need from the config -------------------------------------
def special_ids(config: Config) -> dict[str, int | None]:
    """The framing token ids the config names: none (BERT's come from the tokenizer files)."""
    return {"cls": None, "sep": None}


def inspect_fields(config: Config) -> dict[str, Any]:
    """BERT's own entries of `inspect`: none beyond the shape every architecture has."""
    return {}


def inspect_lines(info: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) lines `clinicalbert inspect` prints after the shape: none."""
    return []
