"""Checkpoint tensors -> our parameter names, strictly.

One rename table maps HF BERT keys (with or without the `bert.` prefix, legacy `gamma`/`beta`)
to the runtime's names; Q/K/V are fused and the token-type row folded into positions here.
Anything missing, unexpected or mis-shaped raises one ValueError listing all of it.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file

from .config import EncoderConfig

# HF key (after prefix/gamma-beta normalisation) -> our key. `{i}` is a layer index.
RENAMES: dict[str, str] = {
    "embeddings.word_embeddings.weight": "embed.word.weight",
    "embeddings.position_embeddings.weight": "embed.position.weight",
    "embeddings.token_type_embeddings.weight": "token_type",  # folded into positions
    "embeddings.LayerNorm.weight": "embed.norm.weight",
    "embeddings.LayerNorm.bias": "embed.norm.bias",
    "encoder.layer.{i}.attention.self.query.weight": "layers.{i}.q.weight",
    "encoder.layer.{i}.attention.self.query.bias": "layers.{i}.q.bias",
    "encoder.layer.{i}.attention.self.key.weight": "layers.{i}.k.weight",
    "encoder.layer.{i}.attention.self.key.bias": "layers.{i}.k.bias",
    "encoder.layer.{i}.attention.self.value.weight": "layers.{i}.v.weight",
    "encoder.layer.{i}.attention.self.value.bias": "layers.{i}.v.bias",
    "encoder.layer.{i}.attention.output.dense.weight": "layers.{i}.attn_out.weight",
    "encoder.layer.{i}.attention.output.dense.bias": "layers.{i}.attn_out.bias",
    "encoder.layer.{i}.attention.output.LayerNorm.weight": "layers.{i}.attn_norm.weight",
    "encoder.layer.{i}.attention.output.LayerNorm.bias": "layers.{i}.attn_norm.bias",
    "encoder.layer.{i}.intermediate.dense.weight": "layers.{i}.ffn_in.weight",
    "encoder.layer.{i}.intermediate.dense.bias": "layers.{i}.ffn_in.bias",
    "encoder.layer.{i}.output.dense.weight": "layers.{i}.ffn_out.weight",
    "encoder.layer.{i}.output.dense.bias": "layers.{i}.ffn_out.bias",
    "encoder.layer.{i}.output.LayerNorm.weight": "layers.{i}.ffn_norm.weight",
    "encoder.layer.{i}.output.LayerNorm.bias": "layers.{i}.ffn_norm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
    "cls.predictions.transform.dense.weight": "mlm.dense.weight",
    "cls.predictions.transform.dense.bias": "mlm.dense.bias",
    "cls.predictions.transform.LayerNorm.weight": "mlm.norm.weight",
    "cls.predictions.transform.LayerNorm.bias": "mlm.norm.bias",
    "cls.predictions.decoder.weight": "mlm.decoder.weight",
    "cls.predictions.bias": "mlm.decoder.bias",
}
IGNORED = re.compile(
    r"^(cls\.seq_relationship\.|embeddings\.position_ids$|cls\.predictions\.decoder\.bias$)"
)
_PATTERNS = [
    (re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), ours)
    for hf, ours in RENAMES.items()
]


def read_state_dict(source: str | Path | bytes) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file (mmap), safetensors bytes, or a pytorch_model.bin.

    `.bin` files are pickles: they are read with `weights_only=True`, never unpickled freely.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            return load_safetensors_bytes(bytes(source))
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ValueError(f"weights bytes are not a valid safetensors file: {e}") from e
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a valid safetensors file: {e}") from e
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a bad pickle
            raise ValueError(f"{path}: cannot read as a weights-only torch checkpoint: {e}") from e
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    raise ValueError(f"{path}: unknown weights format (expected .safetensors or .bin)")


def _normalise(key: str) -> str:
    key = key.removeprefix("bert.")
    if key.endswith(".gamma"):
        key = key[: -len(".gamma")] + ".weight"
    elif key.endswith(".beta"):
        key = key[: -len(".beta")] + ".bias"
    return key


def rename(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """HF keys -> our keys. Returns (renamed, unexpected HF keys)."""
    out: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for raw_key, tensor in state.items():
        key = _normalise(raw_key)
        if IGNORED.match(key):
            continue
        for pattern, ours in _PATTERNS:
            m = pattern.match(key)
            if m:
                out[ours.replace("{i}", m.group(1)) if m.groups() else ours] = tensor
                break
        else:
            unexpected.append(raw_key)
    return out, unexpected


def expected_shapes(config: EncoderConfig, pooler: bool, mlm: bool) -> dict[str, tuple[int, ...]]:
    c, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed.word.weight": (v, c),
        "embed.position.weight": (config.max_position_embeddings, c),
        "token_type": (config.type_vocab_size, c),
        "embed.norm.weight": (c,),
        "embed.norm.bias": (c,),
    }
    for n in range(config.num_hidden_layers):
        for name, shape in {
            "q.weight": (c, c), "q.bias": (c,), "k.weight": (c, c), "k.bias": (c,),
            "v.weight": (c, c), "v.bias": (c,), "attn_out.weight": (c, c), "attn_out.bias": (c,),
            "attn_norm.weight": (c,), "attn_norm.bias": (c,), "ffn_in.weight": (i, c),
            "ffn_in.bias": (i,), "ffn_out.weight": (c, i), "ffn_out.bias": (c,),
            "ffn_norm.weight": (c,), "ffn_norm.bias": (c,),
        }.items():  # fmt: skip
            shapes[f"layers.{n}.{name}"] = shape
    if pooler:
        shapes |= {"pooler.dense.weight": (c, c), "pooler.dense.bias": (c,)}
    if mlm:
        shapes |= {
            "mlm.dense.weight": (c, c), "mlm.dense.bias": (c,), "mlm.norm.weight": (c,),
            "mlm.norm.bias": (c,), "mlm.decoder.bias": (v,),
        }  # fmt: skip
    return shapes


def has_pooler(state: dict[str, torch.Tensor]) -> bool:
    return any(_normalise(k).startswith("pooler.dense.") for k in state)


def has_mlm(state: dict[str, torch.Tensor]) -> bool:
    return any(_normalise(k).startswith("cls.predictions.") for k in state)


def convert(
    state: dict[str, torch.Tensor],
    config: EncoderConfig,
    pooler: bool,
    mlm: bool,
    source: str = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Checkpoint state dict -> parameters for Encoder (+ `pooler.*`, `mlm.*` when asked).

    Strict: one ValueError lists every missing, unexpected and mis-shaped tensor.
    """
    if pooler and not has_pooler(state):
        raise ValueError(
            f"{source}: the pooler head was requested (pooling='pooler') but the checkpoint has "
            "no pooler weights (bert.pooler.dense.*); use pooling='cls' or 'mean'"
        )
    if mlm and not has_mlm(state):
        raise ValueError(
            f"{source}: the MLM head was requested but the checkpoint has no "
            "cls.predictions.* weights (it is not a masked-LM checkpoint)"
        )
    ours, unexpected = rename(state)
    shapes = expected_shapes(config, pooler, mlm)
    optional = {"mlm.decoder.weight"}  # tied to the word embeddings when absent
    wanted = {k for k in ours if k in shapes or k in optional}
    # Heads not asked for are dropped, not "unexpected".
    head_keys = {k for k in ours if k.startswith(("pooler.", "mlm."))}
    missing = sorted(set(shapes) - set(ours))
    extra = sorted(set(ours) - wanted - head_keys)
    bad_shapes = [
        f"{k}: expected {shapes[k]}, got {tuple(ours[k].shape)}"
        for k in sorted(wanted)
        if k in shapes and tuple(ours[k].shape) != shapes[k]
    ]
    if mlm and "mlm.decoder.weight" in ours:
        expect = (config.vocab_size, config.hidden_size)
        if tuple(ours["mlm.decoder.weight"].shape) != expect:
            bad_shapes.append(
                f"mlm.decoder.weight: expected {expect}, got {tuple(ours['mlm.decoder.weight'].shape)}"
            )
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected or extra:
        problems.append(f"unexpected tensors: {', '.join(unexpected + extra)}")
    if bad_shapes:
        problems.append(f"mis-shaped tensors: {'; '.join(bad_shapes)}")
    if problems:
        raise ValueError(f"{source} does not fit the config: " + " | ".join(problems))

    params = {k: ours[k] for k in wanted}
    for n in range(config.num_hidden_layers):  # fuse Q, K, V
        p = f"layers.{n}."
        params[p + "qkv.weight"] = torch.cat([params.pop(p + x + ".weight") for x in "qkv"])
        params[p + "qkv.bias"] = torch.cat([params.pop(p + x + ".bias") for x in "qkv"])
    token_type = params.pop("token_type")
    params["embed.position.weight"] = params["embed.position.weight"] + token_type[0]
    if mlm and "mlm.decoder.weight" not in params:
        params["mlm.decoder.weight"] = params["embed.word.weight"]
    if not mlm:
        params.pop("mlm.decoder.weight", None)
    return params
