"""Presets for the ClinicalBERT family.

A preset names where a checkpoint comes from, the casing it was trained with, the
architecture and shape it is expected to have and its default pooling. The architecture itself always comes from the
checkpoint's config; a preset only checks it (a mismatch is an error naming both values)
and supplies what the checkpoint does not say (casing: the BERT repos ship no tokenizer
config; pooling: Clinical ModernBERT has no trained pooler).
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
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    model_type: str | None = None  # the architecture the checkpoint's config must declare
    pooling: str | None = None  # default pooling; None = the architecture's default
    description: str = ""

    CHECKED = (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "max_position_embeddings",
    )  # fmt: skip


_BERT_BASE = dict(
    model_type="bert", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
    intermediate_size=3072, max_position_embeddings=512,
)  # fmt: skip
_MODERNBERT_BASE = dict(
    model_type="modernbert", vocab_size=50368, hidden_size=768, num_hidden_layers=22,
    num_attention_heads=12, intermediate_size=1152, max_position_embeddings=8192,
)  # fmt: skip

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
            "clinical_modernbert",
            hub_id="Simonlee711/Clinical_ModernBERT",
            revision=None,
            lowercase=False,
            model_type="bert",
            hidden_size=768,
            num_hidden_layers=22,
            num_attention_heads=12,
            intermediate_size=1152,
            max_position_embeddings=8192,
            pooling="mean",  # no trained pooler
            description="Lee et al. 2025: a BERT (BertForMaskedLM) with a ModernBERT BPE "
            "tokenizer and 8,192 positions, MIMIC-IV + PubMed (cased BPE)",
        ),
        Variant(
            "bioclinical_modernbert_base",
            hub_id="thomas-sounack/BioClinical-ModernBERT-base",
            revision=None,
            lowercase=False,
            **_MODERNBERT_BASE,
            description="Sounack et al. 2025, ModernBERT-base continued on clinical notes",
        ),
        Variant(
            "bioclinical_modernbert_large",
            hub_id="thomas-sounack/BioClinical-ModernBERT-large",
            revision=None,
            lowercase=False,
            **{
                **_MODERNBERT_BASE,
                "hidden_size": 1024,
                "num_hidden_layers": 28,
                "num_attention_heads": 16,
                "intermediate_size": 2624,
            },  # fmt: skip
            description="Sounack et al. 2025, ModernBERT-large continued on clinical notes",
        ),
        Variant(
            "modernbert_base",
            hub_id="answerdotai/ModernBERT-base",
            revision=None,
            lowercase=False,
            **_MODERNBERT_BASE,
            description="Warner et al. 2024, general-domain ModernBERT-base",
        ),
        Variant(
            "custom",
            hub_id=None,
            revision=None,
            lowercase=None,
            description="any BERT or ModernBERT checkpoint; casing from the user or the tokenizer",
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
        for field in variant.CHECKED
        if (expected := getattr(variant, field)) is not None
        and (actual := getattr(config, field)) != expected
    ]
    if mismatches:
        raise ValueError(
            "checkpoint config.json does not match the variant preset (use variant='custom' "
            "for other shapes): " + "; ".join(mismatches)
        )
