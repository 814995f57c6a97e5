"""De-identification by redaction: a note with its entity spans replaced by `[LABEL]`.

It replaces exactly the spans it is given: what a token classifier found (above the job's
`min_score`, outside its `ignore_labels`). Text the model did not tag stays as it was, so the
result is only as complete as the model's recall; it is not a guarantee of de-identification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .entities import Entities


def redact(text: str, spans: Sequence[tuple[int, int, str]]) -> str:
    """`text` with each (start, end, label) span replaced by `[label]`; spans in any order;
    where spans overlap, their union is replaced, named by the first (by start)."""
    pieces, at = [], 0
    for start, end, label in sorted(spans):
        if end <= at:  # inside a span already replaced
            continue
        if start >= at:
            pieces += [text[at:start], f"[{label}]"]
        at = end
    pieces.append(text[at:])
    return "".join(pieces)


def redact_notes(notes: Sequence[str], entities: Entities) -> list[str]:
    """Each note redacted by its own entities (`entities` holds note after note)."""
    names, off = entities.names, entities.offsets
    start, end, label = entities.start.tolist(), entities.end.tolist(), entities.label.tolist()
    return [
        redact(text, [(start[e], end[e], names[label[e]]) for e in range(off[i], off[i + 1])])
        for i, text in enumerate(notes)
    ]
