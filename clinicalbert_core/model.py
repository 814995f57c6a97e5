"""The BERT encoder on packed tokens: linear layers on [N, C], attention per sequence.

Parameter names are our own (see weights.RENAMES for the map from HF checkpoints); Q, K and V
are one fused projection. The token-type embedding is folded into the position table at load
time (every note is a single segment, type 0).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .packing import PackedBatch, pad, unpad

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,
    "gelu_new": partial(F.gelu, approximate="tanh"),
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


def attention(
    qkv: torch.Tensor, batch: PackedBatch, varlen: bool = False, pad_value: float = 0.0
) -> torch.Tensor:
    """qkv[N, 3, H, D] -> attention output [N, H, D], each sequence attending to itself only."""
    if varlen:  # CUDA flash kernel on packed tokens: no padding at all
        from torch.nn.attention.varlen import varlen_attn

        q, k, v = qkv.unbind(1)  # (N, H, D) each
        cu, m = batch.cu_seqlens, batch.max_seqlen
        return varlen_attn(q, k, v, cu, cu, m, m)
    if batch.num_seqs == 1:
        q, k, v = qkv.permute(1, 2, 0, 3).unsqueeze(1)  # (3, 1, H, N, D) -> 3 x (1, H, N, D)
        return F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)  # (N, H, D)
    q, k, v = pad(qkv, batch, pad_value).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.key_mask)  # (B, H, L, D)
    return unpad(out.transpose(1, 2), batch)  # (N, H, D)


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.word(input_ids) + self.position(position_ids))  # (N, C)


# Tokens per feed-forward pass: bounds the [N, intermediate] activations. On CPU a 2048-row
# GEMM is already at full speed; on CUDA smaller chunks cost launches, so the runner raises it.
FFN_CHUNK = {"cpu": 2048, "cuda": 16384}


class Layer(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(c, 3 * c)
        self.attn_out = nn.Linear(c, c)
        self.attn_norm = nn.LayerNorm(c, eps=eps)
        self.ffn_in = nn.Linear(c, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, c)
        self.ffn_norm = nn.LayerNorm(c, eps=eps)
        self.act = ACTIVATIONS[config.hidden_act]
        self.varlen = False  # set once by the runner when the CUDA varlen kernel applies
        self.ffn_chunk = FFN_CHUNK["cpu"]  # set once by the runner for its device

    def forward(self, x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        qkv = self.qkv(x).view(-1, 3, self.heads, self.head_dim)  # (N, 3, H, D)
        a = attention(qkv, batch, self.varlen)  # (N, H, D)
        x = self.attn_norm(x + self.attn_out(a.flatten(1)))
        if x.shape[0] <= self.ffn_chunk:
            return self.ffn(x)
        return torch.cat([self.ffn(part) for part in x.split(self.ffn_chunk)])  # (N, C)

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_norm(x + self.ffn_out(self.act(self.ffn_in(x))))  # (n, C)


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))

    def forward(self, batch: PackedBatch) -> torch.Tensor:
        x = self.embed(batch.input_ids, batch.position_ids)  # (N, C)
        for layer in self.layers:
            x = layer(x, batch)
        return x  # (N, C) final hidden states

    def place(self, varlen: bool, ffn_chunk: int) -> None:
        """Kernel choices made once for the device: varlen attention, feed-forward chunk."""
        for layer in self.layers:
            layer.varlen, layer.ffn_chunk = varlen, ffn_chunk
