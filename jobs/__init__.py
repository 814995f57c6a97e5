"""jobs: ClinicalBERT batch jobs on Ray (spec, corpus, actors, dispatch, output).

Importing `jobs` is cheap: `EncoderPredictor` (torch, the runtime) loads on first use.
"""

from typing import Any

__all__ = ["EncoderPredictor"]


def __getattr__(name: str) -> Any:
    if name == "EncoderPredictor":
        from .predictor import EncoderPredictor

        return EncoderPredictor
    raise AttributeError(f"module 'jobs' has no attribute {name!r}")
