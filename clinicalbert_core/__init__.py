"""clinicalbert_core: a padding-free ClinicalBERT runtime (no Ray)."""

from .config import EncoderConfig
from .hub import Checkpoint, ModelBundle, inspect, open_checkpoint, prepare
from .ops import bound_onednn_caches
from .placement import MlmExecMode
from .runner import ClinicalBertRunner, EncodeOutput, MlmPrediction, RunnerOptions, WindowOutput
from .tokenizer import NoteTokenizer, Specials, Windows
from .variants import VARIANTS, Variant, get_variant

bound_onednn_caches()  # before any oneDNN op of this process: memory flat over many shapes

__all__ = [
    "VARIANTS",
    "Checkpoint",
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
