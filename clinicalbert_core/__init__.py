"""clinicalbert_core: a padding-free ClinicalBERT runtime (no Ray).

Importing it is cheap and changes nothing: each public name (torch, tokenizers and the hub
client with it) loads on first use. A ClinicalBertRunner bounds torch's oneDNN caches when it
is created (`ops.bound_onednn_caches`).
"""

from importlib import import_module
from typing import Any

# public name -> the module it lives in
_HOMES = {
    "VARIANTS": "variants",
    "Checkpoint": "hub",
    "ClassifyOutput": "classify",
    "ClinicalBertRunner": "runner",
    "EncodeOutput": "in_memory",
    "EncoderConfig": "config",
    "MlmExecMode": "device",
    "MlmPrediction": "mlm",
    "ModelBundle": "hub",
    "NoteTokenizer": "tokenizer",
    "RunnerOptions": "runner",
    "Specials": "tokenizer",
    "Variant": "variants",
    "WindowOutput": "runner",
    "Windows": "tokenizer",
    "bound_onednn_caches": "ops",
    "get_variant": "variants",
    "inspect": "inspection",
    "open_checkpoint": "hub",
    "prepare": "hub",
}

__all__ = [
    "VARIANTS",
    "Checkpoint",
    "ClassifyOutput",
    "ClinicalBertRunner",
    "EncodeOutput",
    "EncoderConfig",
    "MlmExecMode",
    "MlmPrediction",
    "ModelBundle",
    "NoteTokenizer",
    "RunnerOptions",
    "Specials",
    "Variant",
    "WindowOutput",
    "Windows",
    "get_variant",
    "inspect",
    "open_checkpoint",
    "prepare",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        value = globals()[name] = getattr(import_module(f".{_HOMES[name]}", __name__), name)
        return value
    raise AttributeError(f"module 'clinicalbert_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})
