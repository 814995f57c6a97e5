"""model_type -> the module that implements it, and the contract every such module meets.

The architecture always comes from the checkpoint's config.json (`model_type`; a legacy
`bert_config.json` has none and is BERT), never from a repo or variant name.

Each architecture module (bert.py, modernbert.py) provides every name in `CONTRACT`, and the
shared mechanics use only these names: `architectures` reads configs with `Config`,
`weights` loads tensors with the rename table and shapes, `hub` takes the config's special
token ids and `inspect` fields from it, `runner` builds `Encoder`, `Pooler` and `mlm_head`
and falls back to `DEFAULT_POOLING`, and `clinicalbert inspect` prints `inspect_lines`. None
of them tests a model_type. A new architecture is one new module providing these names,
added to `ARCHITECTURES` (tests/test_architectures.py checks every module against CONTRACT).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from . import bert, modernbert
from .checkpoint_limits import check_config_sizes, shown
from .config import EncoderConfig, read_json_object

ARCHITECTURES: dict[str, ModuleType] = {"bert": bert, "modernbert": modernbert}

# (name, kind, what it is): kind is one of class, class | None, function, str, tuple, dict,
# pattern (a compiled re)
CONTRACT: tuple[tuple[str, str, str], ...] = (
    ("Config", "class", "EncoderConfig subclass; Config.from_dict(raw, source) reads and "
     "validates a config.json dict (errors name `source`)"),
    ("Encoder", "class", "nn.Module(config): forward(PackedBatch) -> hidden (N, C); "
     "place(varlen, ffn_chunk) sets the kernels once; .layers holds the linears to swap"),
    ("Pooler", "class | None", "nn.Module(config): h_cls (B, C) -> (B, C); None when the "
     "architecture has no trained pooler"),
    ("mlm_head", "function", "config -> heads.MlmHead with the architecture's activation, "
     "norm and biases"),
    ("classifier_head", "function", "(config, kind, num_labels) -> nn.Module: forward(hidden "
     "(N, C), cu_seqlens) -> logits, (B, L) for kind 'sequence' and (N, L) for 'token'; its "
     "parameters carry our names (those of head_shapes[kind])"),
    ("DEFAULT_POOLING", "str", "the pooling when neither the options nor the variant name one"),
    ("KEY_PREFIXES", "tuple", "checkpoint key prefixes stripped before renaming"),
    ("RENAMES", "dict", "checkpoint key (prefix stripped) -> our parameter name; `{i}` is a "
     "layer; embed.word.weight and mlm.decoder.weight name the tied pair"),
    ("IGNORED", "pattern", "checkpoint keys (prefix stripped) skipped without a word"),
    ("normalise_key", "function", "checkpoint key -> its spelling in RENAMES (legacy names)"),
    ("expected_shapes", "function", "config -> {our name: shape} of every encoder tensor "
     "before `finish`"),
    ("head_shapes", "function", "(config, num_labels) -> {'pooler' | 'mlm' | 'sequence' | "
     "'token': {name: shape}}: each head's tensors ('sequence'/'token': a classifier's)"),
    ("SHARED_HEAD", "str | None", "the prefix of tensors the MLM head shares with classifiers "
     "(ModernBERT's 'head.', loaded as mlm.* too), or None"),
    ("finish", "function", "(params, config) -> the params Encoder loads (fusing, folding)"),
    ("special_ids", "function", "config -> {'cls': id | None, 'sep': id | None}: the framing "
     "token ids the config names, a fallback for the tokenizer files"),
    ("inspect_fields", "function", "config -> the architecture's own entries of `inspect` "
     "(JSON types)"),
    ("inspect_lines", "function", "inspect's dict -> [(label, text)] that `clinicalbert "
     "inspect` prints after the shape line"),
)  # fmt: skip


def architecture(model_type: str, source: str = "config") -> ModuleType:
    try:
        return ARCHITECTURES[model_type]
    except (KeyError, TypeError):  # TypeError: not a string (a list, an object)
        raise ValueError(
            f"{source}: model_type {shown(model_type)} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        ) from None


def load_config(raw: dict[str, Any], source: str = "config") -> EncoderConfig:
    """A config dict -> the architecture's config (validated; errors name `source`). Its
    sizes are bounded first (checkpoint_limits), before anything is built from them."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    check_config_sizes(raw, source)
    if raw.get("vocab_size") is None:  # null: missing too (known_fields drops nulls)
        raise ValueError(f"{source}: missing required field 'vocab_size'")
    model_type = raw.get("model_type", "bert")  # legacy bert_config.json has none
    return architecture(model_type, source).Config.from_dict(raw, source)


def config_from_file(path: str | Path) -> EncoderConfig:
    return load_config(read_json_object(path), source=str(path))


def of(config: EncoderConfig) -> ModuleType:
    """The architecture module of a loaded config."""
    return ARCHITECTURES[config.model_type]
