"""Checkpoint tensors -> our parameter names, strictly.

The architecture module supplies one rename table (HF keys, checkpoint prefix stripped, ->
ours), the tensors and shapes its config implies, and a `finish` step (BERT fuses Q/K/V and
folds the token-type row into positions). Anything missing, unexpected, mis-shaped or holding
NaN/inf raises one ValueError listing all of it.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from . import architectures
from .checkpoint_limits import capped, check_safetensors_header, check_tensor_count, shown
from .classify import task_head
from .config import EncoderConfig


def read_state_dict(source: str | Path | bytes) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file (mmap), safetensors bytes, or a pytorch_model.bin.

    `.bin` files are pickles: they are read with `weights_only=True`, never unpickled freely.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        blob = bytes(source)
        _safetensors_header(blob[:8], lambda n: blob[8 : 8 + n], len(blob), "weights bytes")
        try:
            return load_safetensors_bytes(blob)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ValueError(f"weights bytes: not a valid safetensors file: {e}") from e
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        with open(path, "rb") as f:  # complete: a truncated copy is named as one
            _safetensors_header(f.read(8), f.read, path.stat().st_size, str(path))
        try:
            return load_file(path)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid safetensors file: {e}") from e
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle
            raise ValueError(
                f"{path}: cannot read as a weights-only torch checkpoint: {_torch_reason(e)}"
            ) from e
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"{path}: unknown weights format (expected .safetensors or .bin)")


def _torch_reason(e: Exception) -> str:
    """One line of what torch.load said: a weights-only refusal is paragraphs (a preamble, the
    reason, a pointer to the docs); keep the reason, never the advice to unpickle freely."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) > 2 and lines[0].startswith("Weights only load failed"):
        lines = lines[1:-1]
    return " ".join(lines)[:300] or type(e).__name__


def _safetensors_header(head: bytes, read: Any, size: int, name: str) -> list[str]:
    """The tensor names of a safetensors header; the file must be complete: its header's last
    tensor ends at the file's end (a truncated or padded copy is an error naming it). The
    header's length and entry count are bounded (checkpoint_limits) before it is read and
    before safetensors makes tensors of it."""
    n = int.from_bytes(head, "little")
    if len(head) != 8 or n > size - 8:
        raise ValueError(f"{name}: not a valid safetensors file (header length past the end)")
    check_safetensors_header(n, name)
    try:
        header = json.loads(read(n))
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{name}: not a valid safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{name}: not a valid safetensors file (its header is not an object)")
    check_tensor_count(len(header) - ("__metadata__" in header), name)
    try:
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)  # fmt: skip
        if not isinstance(end, int):
            raise TypeError(f"data_offsets end {shown(end)} is not an integer")
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{name}: not a valid safetensors file ({shown(e)})") from None
    if 8 + n + end != size:
        raise ValueError(
            f"{name}: truncated or padded safetensors file: the header needs "
            f"{8 + n + end:,} bytes, the file has {size:,}"
        )
    return [k for k in header if k != "__metadata__"]


def _patterns(arch: ModuleType) -> list[tuple[re.Pattern[str], str]]:
    return [
        (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), ours)
        for hf, ours in arch.RENAMES.items()
    ]


def rename(state: dict[str, Any], arch: ModuleType) -> tuple[dict[str, Any], list[str]]:
    """HF keys -> our keys. Returns (renamed, unexpected HF keys)."""
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    patterns = _patterns(arch)
    for raw_key, tensor in state.items():
        key = raw_key
        for prefix in arch.KEY_PREFIXES:
            key = key.removeprefix(prefix)
        key = arch.normalise_key(key)
        if arch.IGNORED.match(key):
            continue
        for pattern, ours in patterns:
            m = pattern.match(key)
            if m:
                out[ours.replace("{i}", m.group(1)) if m.groups() else ours] = tensor
                break
        else:
            unexpected.append(raw_key)
    return out, unexpected


def _checkpoint_name(key: str, arch: ModuleType) -> str:
    """Our parameter name `key` as a checkpoint names it (prefix stripped): what a user finds
    in the file, for error messages."""
    for hf, ours in arch.RENAMES.items():
        pattern = "^" + re.escape(ours).replace(r"\{i\}", r"(\d+)") + "$"
        if m := re.match(pattern, key):
            return hf.replace("{i}", m.group(1)) if m.groups() else hf
    return key


HEAD_PREFIXES = ("pooler.", "mlm.", "head.", "classifier.")  # our names of heads' tensors


def _heads(ours: Iterable[str]) -> dict[str, bool]:
    """Which heads tensors named `ours` carry. A prediction head shared by MLM and classifiers
    (ModernBERT's `head.*`) is the MLM head's where no classifier comes with it."""
    ours = list(ours)
    present = {h: any(k.startswith(h + ".") for k in ours) for h in ("pooler", "mlm", "classifier")}
    shared = any(k.startswith("head.") for k in ours)
    present["mlm"] = present["mlm"] or (shared and not present["classifier"])
    return present


def heads_present(names: Iterable[str], config: EncoderConfig) -> dict[str, bool]:
    """Which optional heads a checkpoint with these tensor names carries:
    {'pooler': bool, 'mlm': bool, 'classifier': bool}."""
    return _heads(rename(dict.fromkeys(names), architectures.of(config))[0])


def classifier_rows(state: dict[str, Any], config: EncoderConfig) -> int | None:
    """The number of labels of the checkpoint's classifier (its weight's rows); None when it
    has none (or a classifier weight that is not a matrix: `convert` names that one)."""
    return _rows(rename(state, architectures.of(config))[0])


def _rows(ours: dict[str, Any]) -> int | None:
    """classifier_rows of a state dict already renamed (`rename`)."""
    shape = tuple(getattr(ours.get("classifier.weight"), "shape", ()))
    return int(shape[0]) if len(shape) == 2 else None


def convert(
    state: dict[str, torch.Tensor],
    config: EncoderConfig,
    pooler: bool,
    mlm: bool,
    source: str = "checkpoint",
    classifier: str | None = None,
) -> dict[str, torch.Tensor]:
    """Checkpoint state dict -> parameters for the Encoder (+ `pooler.*`, `mlm.*` and, for
    `classifier` 'sequence' or 'token', that head's tensors, when asked).

    Strict: one ValueError lists every missing, unexpected, mis-shaped and non-finite tensor
    (each list cut at checkpoint_limits.MAX_LISTED names, with a count of the rest).
    """
    arch = architectures.of(config)
    ours, unexpected = rename(state, arch)
    _check_heads(_heads(ours), pooler, mlm, classifier, source)
    wanted, problems = _against_config(state, ours, unexpected, config, pooler, mlm, classifier)
    named = {id(t): k for k, t in state.items()}  # non-finite: by the file's names
    non_finite = [
        f"{named[id(t)]} ({n} of {t.numel()})"
        for k in sorted(wanted)
        if (t := ours[k]).is_floating_point() and (n := _count_non_finite(t))
    ]
    if non_finite:
        problems.append(f"tensors holding NaN or inf (corrupt): {capped(non_finite, '; ')}")
    if problems:
        raise ValueError(f"{source} cannot be loaded: " + " | ".join(problems))

    params = arch.finish({k: ours[k] for k in wanted}, config)
    if mlm and arch.SHARED_HEAD:  # the MLM head's dense and norm are the shared head's
        for k in [k for k in params if k.startswith(arch.SHARED_HEAD)]:
            params["mlm." + k.removeprefix(arch.SHARED_HEAD)] = params[k]
    if mlm and "mlm.decoder.weight" not in params:  # tied to the token embeddings
        params["mlm.decoder.weight"] = params["embed.word.weight"]
    return params


def contradictions(state: dict[str, torch.Tensor], config: EncoderConfig) -> list[str]:
    """How a config and its weights disagree, one entry per kind (none when they agree): the
    layer count, then missing, unexpected and mis-shaped tensors as `convert` names them
    (the heads the weights carry are checked too). Reads shapes only, never tensor data."""
    ours, unexpected = rename(state, architectures.of(config))
    heads = _heads(ours)
    try:
        head = task_head(config.to_dict(), _rows(ours), "the config")
    except ValueError as e:  # the config's labels contradict the classifier
        return [str(e)]
    kind = None if head is None else head.kind
    return _against_config(state, ours, unexpected, config, heads["pooler"], heads["mlm"], kind)[1]


def _against_config(
    state: dict[str, torch.Tensor],
    ours: dict[str, torch.Tensor],
    unexpected: list[str],
    config: EncoderConfig,
    pooler: bool,
    mlm: bool,
    classifier: str | None = None,
) -> tuple[set[str], list[str]]:
    """(our names to load, problems): `ours` (`rename` of `state`) against the tensors and
    shapes the config implies, plus the heads asked for; lists capped at MAX_LISTED."""
    arch = architectures.of(config)
    shapes = arch.expected_shapes(config)
    heads = arch.head_shapes(config, _rows(ours) or 0)
    for name, wanted_head in (("pooler", pooler), ("mlm", mlm), (classifier, bool(classifier))):
        if wanted_head:
            shapes |= heads[name]
    optional = {"mlm.decoder.weight": (config.vocab_size, config.hidden_size)} if mlm else {}
    # Heads not asked for are dropped, not "unexpected".
    head_keys = {k for k in ours if k.startswith(HEAD_PREFIXES)}
    wanted = {k for k in ours if k in shapes or k in optional}
    missing = [_checkpoint_name(k, arch) for k in sorted(set(shapes) - set(ours))]
    extra = sorted(set(ours) - wanted - head_keys)
    named = {id(t): k for k, t in state.items()}  # mis-shaped: by the file's names
    bad_shapes = [
        f"{named[id(ours[k])]}: expected {want}, got {tuple(ours[k].shape)}"
        for k in sorted(wanted)
        if tuple(ours[k].shape) != (want := shapes.get(k) or optional[k])
    ]
    problems = []
    layers = {k.split(".")[1] for k in ours if k.startswith("layers.")}
    if len(layers) != config.num_hidden_layers:
        problems.append(
            f"the config has num_hidden_layers {config.num_hidden_layers}, "
            f"the weights {len(layers)} layers"
        )
    word, size = ours.get("embed.word.weight"), (config.vocab_size, config.hidden_size)
    if word is not None and tuple(word.shape) != size:
        problems.append(
            f"the config has vocab_size {size[0]} and hidden_size {size[1]}, the word "
            f"embeddings are {tuple(word.shape)}"
        )
    if missing:
        problems.append(f"missing tensors: {capped(missing)}")
    if unexpected or extra:
        problems.append(f"unexpected tensors: {capped(unexpected + extra)}")
    if bad_shapes:
        problems.append(f"mis-shaped tensors: {capped(bad_shapes, '; ')}")
    return wanted, problems


def _check_heads(
    present: dict[str, bool], pooler: bool, mlm: bool, classifier: str | None, source: str
) -> None:
    """The heads asked for are in the checkpoint (`present`: `_heads` of its tensors)."""
    if classifier and not present["classifier"]:
        raise ValueError(
            f"{source}: a {classifier} classifier was requested but the checkpoint has no "
            "classifier weights (classifier.weight): it is not a fine-tuned classifier"
        )
    if pooler and not present["pooler"]:
        raise ValueError(
            f"{source}: pooling='pooler' needs the pooler head, but the checkpoint has no "
            "pooler weights (a trained pooler.dense.*); use pooling='cls' or 'mean'"
        )
    if mlm and not present["mlm"]:
        raise ValueError(
            f"{source}: the MLM head was requested but the checkpoint has no MLM head weights "
            "(cls.predictions.* for BERT, head.* and decoder.* for ModernBERT): it is not a "
            "masked-LM checkpoint"
        )


def dedupe(state: dict[str, torch.Tensor], config: EncoderConfig) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: drop a decoder tied to the embeddings, copy others."""
    arch = architectures.of(config)
    named = {ours: hf for hf, ours in arch.RENAMES.items()}  # the checkpoint's names
    word, decoder = named["embed.word.weight"], named["mlm.decoder.weight"]
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    embeddings = [e for e in state if e.endswith(word)]
    for k, t in state.items():
        if k.endswith(decoder) and any(torch.equal(t, state[e]) for e in embeddings):
            continue  # re-tied at load
        ptr = t.untyped_storage().data_ptr()
        out[k] = t.clone().contiguous() if ptr in seen else t.contiguous()
        seen.add(ptr)
    return out


def _count_non_finite(t: torch.Tensor) -> int:
    """How many values of the floating tensor `t` are NaN or inf (0 for a sound tensor). A
    NaN or inf anywhere makes the fp32 sum non-finite: one cheap pass (~15x isfinite's) clears
    a sound tensor; only a suspect one is counted value by value."""
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return 0
    return int((~torch.isfinite(t)).sum())
