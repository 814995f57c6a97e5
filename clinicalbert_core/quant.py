"""int8 on CPU: the encoder's linear layers as int8 GEMMs, everything else in floating point.

Weights are quantized once at load, symmetric per output channel (scale = max|w_row| / 127).
Activations are quantized per call, symmetric per token row (scale = max|x_row| / 127): a
row with one large value costs only that row its resolution, which per-tensor scales would
spread over the whole batch. The GEMM is int8 x int8 -> int32 (`torch._int_mm`, oneDNN with
VNNI where the CPU has it); the int32 result is scaled back to the activation dtype with the
bias added. Embeddings, layer norms, attention (softmax included), pooling and the heads stay
in floating point.
"""

from __future__ import annotations

import torch
from torch import nn


def int8_supported() -> bool:
    """True when this torch build runs int8 x int8 GEMMs on the CPU."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8)
        return bool(torch._int_mm(a, a)[0, 0] == 32)
    except (RuntimeError, AttributeError):
        return False


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantized per row on the fly."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight_t", q.t().contiguous(), persistent=False)  # (in, out)
        self.register_buffer("weight_scale", scale, persistent=False)
        bias = linear.bias.detach().float() if linear.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        # max |x| per row from two plain reductions: both vectorize, unlike aminmax or abs()
        peak = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())
        row_scale = peak.float().clamp_(min=1e-12).div_(127.0)  # (n, 1)
        q = (x * row_scale.reciprocal()).round_().to(torch.int8)  # |q| <= 127 by construction
        y = torch._int_mm(q, self.weight_t).float()  # (n, out) int32 -> fp32
        y.mul_(row_scale).mul_(self.weight_scale)
        if self.bias is not None:
            y.add_(self.bias)
        return y.to(dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"
