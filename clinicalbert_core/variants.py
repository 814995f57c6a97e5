"""Presets for the ClinicalBERT family.

A preset names where a checkpoint comes from, the casing it was trained with and the
architecture it is expected to have. The architecture itself always comes from the
checkpoint's config; a preset only checks it (a mismatch is an error naming both values)
and supplies what the checkpoint does not say (casing, since none of these repos ships a
tokenizer config).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import EncoderConfig


@dataclass(frozen=True)
class Variant:
    name: str
    hub_id: str | None  # None: not on the hub (use a local path)
    revision: str | None  # pinned hub revision; None = the repo's default branch
    lowercase: bool | None  # trained casing; None = unknown (custom): must come from the user
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    description: str = ""


_BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "bio_clinicalbert",
            hub_id="emilyalsentzer/Bio_ClinicalBERT",
            revision=None,
            lowercase=False,
            vocab_size=28996,
            **_BERT_BASE,
            description="Alsentzer et al. 2019, BioBERT init, all MIMIC-III notes (cased)",
        ),
        Variant(
            "bio_discharge_summary_bert",
            hub_id="emilyalsentzer/Bio_Discharge_Summary_BERT",
            revision=None,
            lowercase=False,
            vocab_size=28996,
            **_BERT_BASE,
            description="Alsentzer et al. 2019, BioBERT init, MIMIC-III discharge summaries (cased)",
        ),
        Variant(
            "huang_clinicalbert",
            hub_id=None,
            revision=None,
            lowercase=True,
            vocab_size=30522,
            **_BERT_BASE,
            description="Huang et al. 2019, bert-base-uncased init; local path only (not on the hub)",
        ),
        Variant(
            "custom",
            hub_id=None,
            revision=None,
            lowercase=None,
            description="any BERT-shaped checkpoint with a config; casing from the user or tokenizer",
        ),
    )
}


def get_variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown variant {name!r}; known variants: {', '.join(sorted(VARIANTS))}"
        ) from None


def check_config(variant: Variant, config: EncoderConfig) -> None:
    """Raise ValueError when the checkpoint's config disagrees with the preset."""
    mismatches = [
        f"{field}: preset {variant.name!r} expects {expected}, checkpoint config has {actual}"
        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
        if (expected := getattr(variant, field)) is not None
        and (actual := getattr(config, field)) != expected
    ]
    if mismatches:
        raise ValueError(
            "checkpoint does not match the variant preset (use variant='custom' for other "
            "shapes): " + "; ".join(mismatches)
        )
