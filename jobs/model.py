"""Which model a job runs: the spec's model.path, model.hub, or its variant's own hub repo,
resolved once by the driver into a ModelBundle (shipped to every actor)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .spec import JobSpec

if TYPE_CHECKING:  # torch: imported when a bundle is loaded
    from clinicalbert_core.hub import ModelBundle


def model_source(spec: JobSpec) -> tuple[str, str | None]:
    """(source, revision): model.path, model.hub, or the variant's own hub repo."""
    m = spec.model
    if m.path is not None:
        return m.path, None
    if m.hub is not None:
        return m.hub.repo, m.hub.revision
    from clinicalbert_core.variants import get_variant

    v = get_variant(m.variant)  # validated to have a hub id
    assert v.hub_id is not None
    return v.hub_id, v.revision


def load_bundle(spec: JobSpec) -> ModelBundle:
    """The checkpoint the spec names, read and checked once (config, tokenizer, weights)."""
    from clinicalbert_core.hub import ModelBundle

    source, revision = model_source(spec)
    m = spec.model
    return ModelBundle.load(source, variant=m.variant, lowercase=m.lowercase, revision=revision)
