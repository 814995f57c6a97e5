"""Small pieces every architecture shares: activations and the chunked feed-forward."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from functools import cache, partial

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


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt() parameters


@cache
def reuse_freed_memory() -> bool:
    """Keep the activations' pages warm between batches (glibc, once per process).

    By default glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free,
    so each large activation tensor of every batch page-faults its memory in again: on CPU
    that costs fp32 ~10% and int8 ~30% of the encoder's time. Serving them from the heap and
    not trimming it keeps freed pages for the next batch; the process's peak memory is the
    same, it is just not handed back between batches. False where libc is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**30))
    except (OSError, AttributeError):
        return False
