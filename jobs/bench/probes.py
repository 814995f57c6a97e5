"""What the hardware can do: the encoder's FLOPs on a workload, GEMM probes that measure the
device's peak per precision (fp32, bf16, int8), and a side's time as a fraction of the time
those peaks allow."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from clinicalbert_core.config import EncoderConfig
from clinicalbert_core.device import DTYPES

from .meter import sync
from .workload import BERT_BASE

# the precision attention's two matmuls run in, by side precision: int8 sides quantize the
# linear layers only (ours, onnxruntime's QAttention and CTranslate2 alike)
ATTENTION_PRECISION = {"fp32": "fp32", "bf16": "bf16", "int8": "fp32"}


def flop_parts(cfg: EncoderConfig, lengths: np.ndarray) -> tuple[float, float]:
    """Forward FLOPs of the encoder on these sequence lengths (no padding counted):
    (linear layers, attention's two matmuls)."""
    c, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    linear = 2 * (4 * c * c + 2 * c * i) * layers * lengths.sum()
    attn = 4 * layers * c * (lengths.astype(np.float64) ** 2).sum()
    return float(linear), float(attn)


def _encoder_shapes(rows: int) -> list[tuple[int, int, int]]:
    """The encoder's GEMMs as (m, k, n): rows x C -> 3C (QKV), C -> I, I -> C."""
    c, i = BERT_BASE["hidden_size"], BERT_BASE["intermediate_size"]
    return [(rows, c, 3 * c), (rows, c, i), (rows, i, c)]


def _rate(call: Callable[[], Any], flop: float, device: torch.device, seconds: float) -> float:
    """FLOP/s of `call` (doing `flop` operations) over `seconds`, after one warm-up call."""
    call()
    sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        call()
        reps += 1
        sync(device)
    return flop * reps / (time.perf_counter() - t0)


def _gemm_calls(device: torch.device, precision: str) -> Iterator[tuple[str, int, Callable]]:
    """(kernel, operations, call) for every kernel and shape the `precision` probe times.

    fp32 / bf16: `torch.matmul` on square and encoder shapes (one shape alone misleads: on some
    CPUs a 2048^3 fp32 matmul runs at 2/3 of a 4096^3 one) and, on CPU, oneDNN's linear on
    prepacked weights (`torch.ops.mkldnn._linear_pointwise`): on AMD CPUs `torch.matmul` fp32
    takes MKL's AVX2 path, at less than half of what oneDNN's AVX-512 kernels reach.
    int8 (CPU): `torch._int_mm` (int8 x int8 -> int32, what our int8 linears call) and oneDNN's
    quantized linear (`torch.ops.onednn.qlinear_pointwise`: uint8 activations x int8
    per-channel weights -> fp32 with the scales applied, the u8 x s8 form that VNNI's
    dot-product instruction takes, as the int8 GEMMs of onnxruntime and CTranslate2 do).
    """
    rows = 16384 if device.type == "cuda" else 2048
    if precision == "int8":
        for m, k, n in _encoder_shapes(rows):
            x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8)  # (out, in), as linears hold it
            for kernel, call in _int8_gemms(x, w).items():
                yield kernel, 2 * m * k * n, call
        return
    dtype = DTYPES[precision]
    square = (4096, 8192) if device.type == "cuda" else (2048, 4096)
    for m, k, n in [(n, n, n) for n in square] + _encoder_shapes(rows):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        yield "torch.matmul", 2 * m * k * n, lambda a=a, b=b: a @ b
    if device.type != "cpu":
        return
    mkldnn = torch.ops.mkldnn
    for m, k, n in _encoder_shapes(rows):
        x, w = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
        try:
            packed = mkldnn._reorder_linear_weight(w, m)
        except (RuntimeError, AttributeError):  # a build without oneDNN
            return
        call = lambda x=x, p=packed: mkldnn._linear_pointwise(x, p, None, "none", [], "")  # noqa: E731
        yield "onednn linear", 2 * m * k * n, call


def _int8_gemms(x: torch.Tensor, w: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """kernel -> a call of it on x int8 (m, k) and w int8 (n, k)."""
    wt = w.t().contiguous()  # (k, n)
    calls: dict[str, Callable[[], Any]] = {"torch._int_mm": lambda: torch._int_mm(x, wt)}
    try:
        packed = torch.ops.onednn.qlinear_prepack(w, list(x.shape))
    except (RuntimeError, AttributeError):
        return calls
    u8 = (x.to(torch.int16) + 128).to(torch.uint8)  # the same values, zero point 128
    scale, zero = torch.ones(len(w)), torch.zeros(len(w), dtype=torch.int64)
    calls["onednn qlinear"] = lambda: torch.ops.onednn.qlinear_pointwise(
        u8, 1.0, 128, packed, scale, zero, None, 1.0, 0, torch.float32, "none", [], ""
    )
    return calls


def gemm_peak(device: torch.device, precision: str, seconds: float = 1.0) -> tuple[float, str]:
    """Best GEMM rate (operations/s) at this precision over the probed kernels and shapes,
    and the kernel that reached it; (0.0, "none") when no kernel ran."""
    rates: dict[str, float] = {}
    for kernel, ops, call in _gemm_calls(device, precision):
        try:
            rate = _rate(call, ops, device, seconds)
        except RuntimeError:  # a kernel this build or device lacks
            continue
        rates[kernel] = max(rates.get(kernel, 0.0), rate)
    if not rates:
        return 0.0, "none"
    kernel = max(rates, key=rates.__getitem__)
    return rates[kernel], kernel


def gemm_peaks(precisions: set[str], device: torch.device) -> dict[str, tuple[float, str]]:
    """precision -> (GEMM peak operations/s, kernel) for these side precisions and the
    precisions their attention runs in."""
    wanted = precisions | {ATTENTION_PRECISION[p] for p in precisions}
    return {p: gemm_peak(device, p) for p in sorted(wanted)}


def bound_fraction(precision: str, linear: float, attn: float, peaks: dict[str, float],
                   seconds: float) -> float:  # fmt: skip
    """The time the GEMM peaks allow at this precision (linear layers at the precision's peak,
    attention at its attention precision's) over the measured time; 0.0 with no peak."""
    linear_peak = peaks.get(precision, 0.0)
    attn_peak = peaks.get(ATTENTION_PRECISION[precision], 0.0)
    if not (linear_peak > 0 and attn_peak > 0):
        return 0.0
    return (linear / linear_peak + attn / attn_peak) / seconds
