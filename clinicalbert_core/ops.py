"""Small pieces every architecture shares: activations, the chunked feed-forward, CPU linears."""

from __future__ import annotations

import ctypes
import os
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


def embedding(num: int, dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: the runner builds on the meta device and loads
    the weights next. nn.Embedding's own init (normal_) on the meta device imports
    torch._dynamo, about 2 s of every process's first model build (each actor's start)."""
    return nn.Embedding(num, dim, _weight=torch.empty(num, dim))


def by_chunks(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int):
    """fn over rows of x[N, C] in pieces of at most `chunk` rows (row-wise fn only)."""
    if x.shape[0] <= chunk:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(chunk)])  # (N, C)


def place(layers: nn.ModuleList, varlen: bool, ffn_chunk: int) -> None:
    """Kernel choices made once for the device: varlen attention, feed-forward chunk."""
    for layer in layers:
        layer.varlen, layer.ffn_chunk = varlen, ffn_chunk


# torch's oneDNN ops (the packed CPU linears, exact GELU) keep a compiled kernel with its
# buffers per input shape, up to 1,024 in each of two caches (oneDNN's own and ideep's), and
# every encoder batch has its own token count: memory climbs by hundreds of MiB batch after
# batch. 16 entries keep memory bounded and still hold every kernel of one forward pass, which
# its layers reuse (caches off, a single short note takes ~1.8x as long: each layer rebuilds
# its kernels). oneDNN reads them at its first op. Job actors turn them off instead
# (jobs.launch.actor_env: their batches are large, a rebuild is noise there, memory is not).
ONEDNN_CACHE_ENV = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "16"}


def bound_onednn_caches() -> None:
    """Bound torch's oneDNN caches in this process (ONEDNN_CACHE_ENV) unless the environment
    already sets them; effective when called before torch's first oneDNN op (a
    ClinicalBertRunner calls it first thing when it is created; calling it again changes
    nothing)."""
    for name, value in ONEDNN_CACHE_ENV.items():
        os.environ.setdefault(name, value)


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


class PackedLinear(nn.Module):
    """nn.Linear on CPU (fp32, bf16) with its weight reordered once into oneDNN's blocked
    layout. torch's default fp32 GEMM on these shapes runs at 80-200 GFLOP/s on the AMD EPYC
    this was measured on, oneDNN on the packed weight at 170-320 (bf16: 300-450 vs 200-350);
    results agree to fp32 rounding (1e-4 on unit-scale inputs)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


@cache
def packed_linear_supported(dtype: torch.dtype) -> bool:
    """True when this torch build has oneDNN's packed linear for `dtype` on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        lin = nn.Linear(16, 8).to(dtype)
        x = torch.ones(4, 16, dtype=dtype)
        return torch.allclose(PackedLinear(lin)(x).float(), lin(x).float(), atol=1e-2)
    except (RuntimeError, AttributeError):
        return False


def swap_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Replace every nn.Linear inside `module` by make(linear), in place; returns how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, make(child))
            swapped += 1
        else:
            swapped += swap_linears(child, make)
    return swapped
