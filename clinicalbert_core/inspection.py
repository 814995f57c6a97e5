"""`inspect`: what a model dir holds, read without loading it into a runner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import architectures
from . import weights as W
from .checkpoint_limits import check_inside
from .classify import classifier_info
from .hub import integrity_problems, open_checkpoint, sha256_file


def inspect(path: str | Path) -> dict[str, Any]:
    """What a model dir holds: architecture, config, tokenizer, casing, heads, parameters,
    sha256 per file, and where the config and the weights disagree (`contradictions`: the
    layer count, missing, unexpected and mis-shaped tensors; empty when they agree)."""
    ck = open_checkpoint(path, casing_required=False, verify=False)
    state = ck.state()
    files = [p for p in sorted(ck.files.root.iterdir()) if p.is_file()]
    for p in files:
        check_inside(p, ck.files.root)
    digests = {p.name: sha256_file(p) for p in files}
    c = ck.config
    return {
        "path": str(ck.files.root),
        "architecture": c.model_type,
        "variant": ck.variant.name,
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "attention_heads": c.num_attention_heads,
        "max_positions": c.max_position_embeddings,
        **architectures.of(c).inspect_fields(c),
        "tokenizer": ck.tokenizer_kind,
        "lowercase": ck.lowercase,
        "specials": ck.specials.to_dict(),
        "tokenizer_notes": list(ck.tokenizer_notes),
        "heads": W.heads_present(state, c),
        "classifier": classifier_info(c.to_dict(), W.classifier_rows(state, c)),
        "parameters": sum(t.numel() for t in W.dedupe(state, ck.config).values()),
        "contradictions": W.contradictions(state, c),
        "config": c.to_dict(),
        "source": (ck.files.manifest or {}).get("source"),
        "prepared": ck.files.manifest is not None,
        "integrity": integrity_problems(ck.files.root, ck.files.manifest, digests),
        "sha256": digests,
    }
