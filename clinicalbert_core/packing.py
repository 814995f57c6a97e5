"""Padding-free batches.

The whole runtime works on packed tokens: the B sequences of a batch are concatenated into
one row of N tokens, `cu_seqlens` int32[B+1] marks where each starts, `position_ids` int64[N]
restarts at 0 for every sequence. Only attention needs per-sequence structure; it pads in
`pad`/`unpad` below, the one place padding exists. `DeviceFeed` moves batches to the device
one ahead of the one being computed (pinned memory and a side stream on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch


@dataclass(frozen=True)
class PackedBatch:
    input_ids: torch.Tensor  # int64[N]
    position_ids: torch.Tensor  # int64[N]
    cu_seqlens: torch.Tensor  # int32[B+1]
    max_seqlen: int
    # Attention padding plan, made once per batch and shared by every layer:
    pad_index: torch.Tensor  # int64[N]: slot of each packed token in the flat [B*L] padded grid
    key_mask: torch.Tensor | None  # bool[B, 1, 1, L], True = real key; None when no padding
    seq_ids: torch.Tensor  # int64[N]: the sequence each token belongs to (banded attention)

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> PackedBatch:
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> PackedBatch:
        """A copy in page-locked host memory (needs CUDA), so a copy to the GPU can overlap."""
        return self._map(torch.Tensor.pin_memory)

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the CUDA allocator these tensors are used on `stream` too."""
        for t in self._tensors().values():
            t.record_stream(stream)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {
            f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)
        }

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PackedBatch:
        return replace(self, **{name: fn(t) for name, t in self._tensors().items()})


def cu_seqlens_from_lengths(lengths: Sequence[int] | np.ndarray) -> torch.Tensor:
    """lengths[B] -> cu_seqlens int32[B+1] = [0, l0, l0+l1, ...]."""
    lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64))
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def pack(seqs: Sequence[np.ndarray | Sequence[int]]) -> PackedBatch:
    """B token-id sequences -> one PackedBatch (on CPU; `.to(device)` moves it)."""
    if not seqs:
        raise ValueError("pack() needs at least one sequence")
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    if (lengths == 0).any():
        raise ValueError("pack() got an empty sequence; every sequence needs >= 1 token")
    input_ids = torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]))
    return pack_flat(input_ids, lengths)


def pack_flat(input_ids: torch.Tensor, lengths: np.ndarray) -> PackedBatch:
    """Already-concatenated ids int64[N] with lengths[B] -> PackedBatch."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n, b, max_len = int(lengths.sum()), len(lengths), int(lengths.max())
    assert input_ids.numel() == n, (input_ids.numel(), n)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # [N] start of each token's seq
    position_ids = np.arange(n, dtype=np.int64) - starts  # [N]
    seq_of_token = np.repeat(np.arange(b, dtype=np.int64), lengths)  # [N]
    pad_index = seq_of_token * max_len + position_ids  # [N]
    key_mask = None
    if (lengths != max_len).any():
        key_mask = torch.from_numpy(np.arange(max_len)[None, :] < lengths[:, None])  # [B, L]
        key_mask = key_mask[:, None, None, :]  # [B, 1, 1, L]
    return PackedBatch(
        input_ids=input_ids,
        position_ids=torch.from_numpy(position_ids),
        cu_seqlens=cu_seqlens_from_lengths(lengths),
        max_seqlen=max_len,
        pad_index=torch.from_numpy(pad_index),
        key_mask=key_mask,
        seq_ids=torch.from_numpy(seq_of_token),
    )


def pad(x: torch.Tensor, batch: PackedBatch, value: float = 0.0) -> torch.Tensor:
    """x[N, *F] packed -> [B, L, *F], `value` in the padded slots."""
    b, max_len = batch.num_seqs, batch.max_seqlen
    out = x.new_full((b * max_len, *x.shape[1:]), value)  # [B*L, *F]
    out.index_copy_(0, batch.pad_index, x)
    return out.view(b, max_len, *x.shape[1:])


def unpad(x: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    """x[B, L, *F] padded -> [N, *F] (padded slots dropped)."""
    return x.reshape(-1, *x.shape[2:]).index_select(0, batch.pad_index)


def token_budget_batches(lengths: Sequence[int] | np.ndarray, budget: int) -> list[np.ndarray]:
    """Split sequences into batches of at most `budget` tokens, after sorting by length.

    Returns index arrays into `lengths`; each batch holds similar lengths so the padding that
    attention adds is small. A sequence longer than the budget gets a batch of its own.
    Budget counts padded tokens (B * max length), which bounds attention memory too.
    """
    if budget <= 0:
        raise ValueError(f"token budget must be positive, got {budget}")
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")  # longest first
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        take = max(1, budget // max(longest, 1))
        batches.append(order[start : start + take])
        start += take
    return batches


@dataclass(frozen=True)
class FedBatch:
    """One batch of a DeviceFeed."""

    index: int  # which of the feed's batches
    ids: np.ndarray  # int64[N] its packed ids, on the host
    host: PackedBatch  # on the host (page-locked when fed to CUDA)
    batch: PackedBatch  # on the device, usable on the current stream


class DeviceFeed:
    """Packed batches of windows moved to `device`, the next one ahead of the one in use.

    `ids`/`bounds` are a Windows' packed ids and bounds; `batches[i]` lists the windows of
    batch i (e.g. from `token_budget_batches`). Iterating yields FedBatch in order. After
    launching its work on a batch the caller calls `prefetch()`: the next batch is packed
    and, on CUDA, copied from page-locked memory with non_blocking=True on a side stream, so
    the copy overlaps the compute already queued; the compute stream waits for that copy
    (an event) only when the batch is handed out. A batch not prefetched is made when asked
    for. Elsewhere (CPU, mps) batches are packed one ahead and moved with `.to(device)`.
    """

    def __init__(
        self,
        ids: np.ndarray,
        bounds: np.ndarray,
        batches: Sequence[np.ndarray],
        device: torch.device,
        pin: bool | None = None,
    ):
        self.ids, self.bounds, self.batches, self.device = ids, bounds, batches, device
        self.cuda = device.type == "cuda"
        self.pin = self.cuda if pin is None else pin  # page-locked host memory needs CUDA
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.made = 0  # batches packed so far
        self._ready: tuple[FedBatch, torch.cuda.Event | None] | None = None

    def prefetch(self) -> None:
        """Make the next batch now (a no-op if it is made already, or there is none)."""
        if self._ready is not None or self.made == len(self.batches):
            return
        windows = np.asarray(self.batches[self.made])
        starts, ends = self.bounds[windows], self.bounds[windows + 1]
        ids = np.concatenate([self.ids[a:b] for a, b in zip(starts, ends)]).astype(np.int64)
        host = pack_flat(torch.from_numpy(ids), ends - starts)
        if self.pin:
            host = host.pin_memory()
        event = None
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                batch = host.to(self.device)
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            batch = host.to(self.device)
        self._ready = FedBatch(self.made, ids, host, batch), event
        self.made += 1

    def __iter__(self) -> DeviceFeed:
        return self

    def __next__(self) -> FedBatch:
        self.prefetch()
        if self._ready is None:
            raise StopIteration
        (fed, event), self._ready = self._ready, None
        if event is not None:  # made on the side stream, used on the current one
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            fed.batch.record_stream(current)
        return fed
