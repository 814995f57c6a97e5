"""model_type -> the module that implements it (config fields, encoder, weight names).

The architecture always comes from the checkpoint's config.json (`model_type`; a legacy
`bert_config.json` has none and is BERT), never from a repo or variant name.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from . import bert, modernbert
from .config import EncoderConfig, read_json_object

ARCHITECTURES: dict[str, ModuleType] = {"bert": bert, "modernbert": modernbert}


def architecture(model_type: str, source: str = "config") -> ModuleType:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        ) from None


def load_config(raw: dict[str, Any], source: str = "config") -> EncoderConfig:
    """A config dict -> the architecture's config (validated; errors name `source`)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    if "vocab_size" not in raw:
        raise ValueError(f"{source}: missing required field 'vocab_size'")
    model_type = raw.get("model_type", "bert")  # legacy bert_config.json has none
    return architecture(model_type, source).Config.from_dict(raw, source)


def config_from_file(path: str | Path) -> EncoderConfig:
    return load_config(read_json_object(path), source=str(path))


def of(config: EncoderConfig) -> ModuleType:
    """The architecture module of a loaded config."""
    return ARCHITECTURES[config.model_type]
