"""int8 on CPU: the encoder's linear layers as int8 GEMMs, everything else in floating point.

Weights are quantized once at load, symmetric per output channel (scale = max|w_row| / 127).
Activations are quantized per call and per token row, around the row's midpoint m =
(max + min) / 2 with scale s = (max - min) / 254, to int8 levels -127..127 (0 at m): a row
with one large value costs only that row its resolution (per-tensor scales would spread it
over the whole batch), and a skewed row (GELU outputs are >= -0.17, the feed-forward's
second linear reads them) keeps all 255 levels for the range it has instead of half of them.
The GEMM multiplies q by the int8 weight in int32; the result is scaled back, plus the bias,
plus m times the quantized weight's row sums, in two broadcast passes:
x W^T = (q s + m) W^T = s (q W^T) + m (W 1)^T. Embeddings, layer norms, attention (softmax
included), pooling and the heads stay in floating point.

The GEMM: on CPUs with VNNI or AMX, oneDNN's quantized linear on the weight prepacked once at
load (q + 128 as uint8 with zero point 128, the weight scales applied in the kernel, fp32
out): 2-4x `torch._int_mm` plus its int32 -> fp32 pass on the encoder's shapes (Intel Xeon
with AMX), the same values. (int8 activations straight into it take a reference kernel,
thousands of times slower.) Elsewhere `torch._int_mm` on q as int8 (CPUs without VNNI:
their u8 x s8 instructions saturate in 16 bits, which oneDNN's int8 kernels there do not
avoid).
"""

from __future__ import annotations

from functools import cache

import torch
from torch import nn

PREPACK_ROWS = 2048  # the row count oneDNN picks the weight layout for (any count runs on it)


def int8_supported() -> bool:
    """True when this torch build runs int8 x int8 GEMMs on the CPU."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8)
        return bool(torch._int_mm(a, a)[0, 0] == 32)
    except (RuntimeError, AttributeError):
        return False


@cache
def onednn_int8_supported() -> bool:
    """True when oneDNN's quantized linear runs here on VNNI or AMX and is exact."""
    if not (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    try:
        # extremes whose pair sums overflow 16 bits, where a saturating kernel would show it
        w = torch.tensor([[127] * 64, [-127] * 64, list(range(-127, 129, 4))], dtype=torch.int8)
        x = torch.tensor([[255] * 64, [0] * 64, [0, 255] * 32], dtype=torch.uint8)
        packed = torch.ops.onednn.qlinear_prepack(w, [3, 64])
        y = qlinear(x, packed, torch.ones(3), torch.zeros(3, dtype=torch.int64))
        return torch.equal(y, (x.float() - 128) @ w.float().t())
    except (RuntimeError, AttributeError):
        return False


def qlinear(
    q: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, weight_zero: torch.Tensor
) -> torch.Tensor:
    """(q - 128) for q uint8 (n, in) x prepacked int8 weight (out, in) -> fp32 (n, out)
    times weight_scale; weight_zero int64 (out,) is all zeros (symmetric weights)."""
    return torch.ops.onednn.qlinear_pointwise(
        q, 1.0, 128, packed, weight_scale, weight_zero, None, 1.0, 0, torch.float32, "none", [],
        "",
    )  # fmt: skip


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float (n, in) -> (q int8 (n, in), mid (n, 1), scale (n, 1)) with
    x ~ q * scale + mid, q = round((x - mid) / scale) in [-127, 127]. (Converted to int8, not
    uint8: torch's CPU float -> int8 conversion is vectorized, float -> uint8 is not, 8x
    slower on the encoder's shapes. One fused pass, x / s - m / s, loses whole steps to
    cancellation in rows far from zero.)"""
    # max and min per row from two plain reductions: both vectorize, unlike aminmax
    hi, lo = x.amax(dim=1, keepdim=True).float(), x.amin(dim=1, keepdim=True).float()
    mid = (hi + lo).mul_(0.5)  # (n, 1)
    # the half-range as seen from mid as rounded: a row spanning a few ulps of its values
    # has a midpoint steps off centre, and (hi - lo) / 254 would put its ends past a level
    half = torch.maximum(hi - mid, mid - lo)
    scale = half.clamp_(min=1e-12).div_(127.0)  # (n, 1)
    q = (x - mid).mul_(scale.reciprocal()).round_().to(torch.int8)  # [-127, 127]
    return q, mid, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantized per row on the fly."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.packed = None  # oneDNN's layout of q, where its kernel applies; else q^T
        if onednn_int8_supported():
            self.packed = torch.ops.onednn.qlinear_prepack(q, [PREPACK_ROWS, q.shape[1]])
        else:
            self.register_buffer("weight_t", q.t().contiguous(), persistent=False)  # (in, out)
        self.register_buffer("weight_scale", scale, persistent=False)
        zero = torch.zeros(len(scale), dtype=torch.int64)  # once, not per call
        self.register_buffer("weight_zero", zero, persistent=False)
        bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros_like(scale)
        # W 1, the midpoint's term of every output, with W the weight as quantized (the whole
        # row then sees one weight: measured closer to fp32 over a BERT-base than the float
        # weight's sums)
        row_sums = (q.float() * scale[:, None]).sum(dim=1)  # (out,)
        self.register_buffer("row_sums", row_sums, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        q, mid, row_scale = quantize_rows(x.reshape(-1, self.in_features))
        if self.packed is not None:  # q + 128 as uint8 (flipping the top bit), zero point 128
            u8 = q.view(torch.uint8).bitwise_xor_(128)
            y = qlinear(u8, self.packed, self.weight_scale, self.weight_zero)  # (n, out) fp32
        else:  # int32 -> fp32
            y = torch._int_mm(q, self.weight_t).float().mul_(self.weight_scale)
        # y s + b, then + m W 1: two broadcast passes (one rank-2 addmm: 2x as long on the
        # feed-forward's outputs, which do not fit in cache)
        y = torch.addcmul(self.bias, y, row_scale, out=y).addcmul_(mid, self.row_sums)
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        gemm = "onednn" if self.packed is not None else "int_mm"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {gemm}"
