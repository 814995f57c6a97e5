"""clinicalbert_core: a padding-free ClinicalBERT runtime (no Ray)."""

from .config import EncoderConfig
from .hub import ModelBundle, inspect, prepare
from .placement import MlmExecMode
from .runner import ClinicalBertRunner, EncodeOutput, MlmPrediction, WindowOutput
from .tokenizer import NoteTokenizer, Windows
from .variants import VARIANTS, Variant, get_variant

__all__ = [
    "VARIANTS",
    "ClinicalBertRunner",
    "EncodeOutput",
    "EncoderConfig",
    "MlmExecMode",
    "MlmPrediction",
    "ModelBundle",
    "NoteTokenizer",
    "Variant",
    "WindowOutput",
    "Windows",
    "get_variant",
    "inspect",
    "prepare",
]
