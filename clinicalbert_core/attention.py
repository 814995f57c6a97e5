"""Attention on packed tokens: full per sequence, or banded (local) within a window.

q, k, v are [N, H, D] over the packed batch; every token attends only to tokens of its own
sequence. `window=w` keeps keys with |i - j| <= w (ModernBERT's local layers, w =
local_attention // 2). The banded path never builds an [L, L] score matrix: the packed
stream is cut into blocks of `block` queries, each seeing its block plus w keys either side,
so scores cost O(N x (block + 2w)) whatever the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .packing import PackedBatch, pad, unpad


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: PackedBatch,
    *,
    varlen: bool = False,
    window: int | None = None,
    pad_value: float = 0.0,
) -> torch.Tensor:
    """q, k, v [N, H, D] -> [N, H, D]; full attention per sequence, or |i-j| <= window."""
    if varlen:  # CUDA flash kernel on packed tokens: no padding at all
        return varlen_attention(q, k, v, batch.cu_seqlens, batch.max_seqlen, window)
    if window is not None and batch.max_seqlen > window + 1:
        return banded_attention(q, k, v, batch.seq_ids, window)
    if batch.key_mask is None:  # every sequence has the same length: no padding at all
        b, n = batch.num_seqs, batch.max_seqlen
        heads = q.shape[1:]  # (H, D)
        q, k, v = (t.view(b, n, *heads).transpose(1, 2) for t in (q, k, v))  # 3 x (B, H, L, D)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * n, *heads)
    if q.device.type == "cpu":
        return per_sequence(q, k, v, batch)
    q, k, v = (pad(t, batch, pad_value).transpose(1, 2) for t in (q, k, v))  # 3 x (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.key_mask)  # (B, H, L, D)
    return unpad(out.transpose(1, 2), batch)  # (N, H, D)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    window: int | None = None,
) -> torch.Tensor:
    """q, k, v [N, H, D] packed, cu_seqlens int32[B+1] -> [N, H, D] by torch's varlen flash
    kernel, |i-j| <= window where one is given. The one varlen call: the encoder's attention
    and the startup probe (`device.varlen_supported`) both make it, window_size included."""
    from torch.nn.attention.varlen import varlen_attn

    size = (window, window) if window is not None else (-1, -1)
    return varlen_attn(
        q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=size
    )  # (N, H, D)


def per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: PackedBatch):
    """One unmasked attention call per sequence, straight on its packed rows: on CPU this is
    about 2x faster than one masked call over the padded batch (fp32 and bf16, 12-512 tokens,
    sorted or not), and it skips the pad/unpad copies."""
    out = torch.empty_like(q)
    bounds = batch.cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, L, D)
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs)[0].transpose(0, 1)
    return out  # (N, H, D)


def band_block(window: int) -> int:
    """Queries per block of the banded path: small blocks waste fewer scores on the band's
    corners ((block + 2w) keys per block for 2w + 1 useful ones), large ones cost launches."""
    return max(window, 32)


def banded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_ids: torch.Tensor, window: int
) -> torch.Tensor:
    """q, k, v [N, H, D] packed, seq_ids int64[N] -> [N, H, D] with keys |i-j| <= window of
    the same sequence."""
    n, w = q.shape[0], window
    b = band_block(w)
    nb = -(-n // b)  # blocks
    tail = nb * b - n
    span = b + 2 * w  # keys seen by one block
    qb = F.pad(q, (0, 0, 0, 0, 0, tail)).view(nb, b, *q.shape[1:]).transpose(1, 2)  # (nb, H, b, D)

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (N, H, D) -> (nb, H, span, D)
        padded = F.pad(t, (0, 0, 0, 0, w, w + tail))  # (nb*b + 2w, H, D)
        return padded.unfold(0, span, b).permute(0, 1, 3, 2)  # (nb, H, span, D)

    seq = F.pad(seq_ids, (w, w + tail), value=-1)  # padding belongs to no sequence
    seq_k = seq.unfold(0, span, b)  # (nb, span)
    seq_q = seq[w : w + nb * b].view(nb, b)  # (nb, b)
    r = torch.arange(b, device=q.device)[:, None]
    c = torch.arange(span, device=q.device)[None, :]
    band = (c - r >= 0) & (c - r <= 2 * w)  # (b, span): key c of query r is within the window
    mask = band & (seq_q[:, :, None] == seq_k[:, None, :])  # (nb, b, span)
    out = F.scaled_dot_product_attention(qb, blocks(k), blocks(v), attn_mask=mask[:, None])
    return out.transpose(1, 2).reshape(nb * b, *q.shape[1:])[:n]  # (N, H, D)


def rope_tables(
    position_ids: torch.Tensor, theta: float, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids int64[N] -> (cos, sin) float32 [N, 1, D], computed in fp32."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    )  # (D/2,)
    freqs = position_ids.float()[:, None] * inv_freq[None, :]  # (N, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # (N, 1, D)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D] rotated by its token's position, in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)  # rotate_half
    return (xf * cos + rotated * sin).to(x.dtype)
