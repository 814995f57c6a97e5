"""Small pieces every architecture shares: activations and the chunked feed-forward."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

# Tokens per feed-forward pass: bounds the [N, intermediate] activations. On CPU a 2048-row
# GEMM is already at full speed; on CUDA smaller chunks cost launches, so the runner raises it.
FFN_CHUNK = {"cpu": 2048, "cuda": 16384}


def by_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int):
    """fn over rows of x[N, C] in pieces of at most `chunk` rows (row-wise fn only)."""
    if x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(chunk)])  # (N, C)


def place(layers: nn.ModuleList, varlen: bool, ffn_chunk: int) -> None:
    """Kernel choices made once for the device: varlen attention, feed-forward chunk."""
    for layer in layers:
        layer.varlen, layer.ffn_chunk = varlen, ffn_chunk
