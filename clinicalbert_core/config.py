"""EncoderConfig: what every architecture's config has in common, read from its config file.

Each architecture module (bert.py, modernbert.py) subclasses it with its own fields and a
`from_dict` that reads them. `architectures.load_config` picks the module from `model_type`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .checkpoint_limits import MAX_JSON_BYTES, check_file_size, shown

_POSITIVE = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "max_position_embeddings",
)  # fmt: skip


@dataclass(frozen=True)
class EncoderConfig:
    vocab_size: int
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    pad_token_id: int | None = 0
    model_type: str = "bert"
    # What a fine-tuned classifier's config says of its head, kept as written (checked with the
    # weights by classify.task_head): the checkpoint classes, the label names, the problem type
    architectures: tuple[str, ...] = ()
    id2label: dict[str, Any] | None = None
    num_labels: int | None = None
    problem_type: str | None = None

    ARCHITECTURE = "BertForMaskedLM"  # the `architectures` entry written when none is known
    POSITIVE_FIELDS = _POSITIVE

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def known_fields(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """The entries of `raw` that are fields of this class (nulls dropped: defaults apply)."""
        names = {f.name for f in fields(cls)}
        values = {k: raw[k] for k in names if k in raw and raw[k] is not None}
        found = values.pop("architectures", None)
        if isinstance(found, list) and all(isinstance(a, str) for a in found):
            values["architectures"] = tuple(found)
        return values

    def validate(self, source: str = "config") -> None:
        for name in self.POSITIVE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{source}: {name} must be a positive integer, got {shown(value)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"{source}: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        """An HF-style config.json dict, JSON types only (always with model_type, so it
        reloads anywhere, from a file or from a ModelBundle)."""
        values = asdict(self)
        for name in ("id2label", "num_labels", "problem_type"):  # a classifier's, when set
            if values[name] is None:
                del values[name]
        values.pop("architectures")
        architectures = list(self.architectures) or [self.ARCHITECTURE]
        return json.loads(json.dumps({"architectures": architectures, **values}))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A checkpoint's JSON file (config, tokenizer config, manifest) as a dict; ValueError
    naming the file when it is missing, over MAX_JSON_BYTES, not UTF-8 text, not JSON (or
    nested too deep, or a number too long to read) or not an object."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    check_file_size(path, MAX_JSON_BYTES, "a checkpoint's JSON file")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}): not a JSON file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except (RecursionError, ValueError) as e:  # nested too deep; an int of too many digits
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def check_activation(name: str, value: str, supported: tuple[str, ...], source: str) -> None:
    if value not in supported:
        raise ValueError(
            f"{source}: {name} {shown(value)} is not supported (supported: {', '.join(supported)})"
        )
