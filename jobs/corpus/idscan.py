"""Repeated values in bounded memory: a 64-bit hash per value, the hashes that repeat found a
bucket at a time, the values behind them compared exactly by the caller.

What the repeated-id check (ids.py) and `verify` share. A source (an input file, an output
part) gives the sorted hashes of its values, 8 B a value; `repeated_hashes` names, per source,
the hashes that occur more than once over all sources, holding one bucket of them at a time
beyond the sources' own arrays. Distinct values may share a hash: the caller re-reads the
values whose hash repeats (`picked`) and compares them, so a collision is never a repeat.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from .values import as_plain_text, is_text

BUCKET = 1 << 21  # hashes compared at once, about (~40 MiB with their sort), whatever the total
CHUNK_ROWS = 16_384  # values hashed at once: a string's bytes take 8 B each while hashed
_GOLDEN, _M1, _M2 = (np.uint64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9,
                                            0x94D049BB133111EB))  # fmt: skip
_NULL = np.uint64(0x6E756C6C)  # what a null hashes to (before mixing)


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over uint64[n], in place (and returned): a bijection, so distinct
    integers never share a hash, and every input bit moves every output bit."""
    x += _GOLDEN
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def hash_values(values: pa.Array) -> np.ndarray:
    """uint64[n]: a 64-bit hash of each value (equal values, equal hashes; one Arrow type per
    caller: its column has one). Values of at most 8 bytes (integers, floats, dates,
    timestamps) hash by their bits, with no collision; text, binary and wider values by their
    bytes. Every null hashes to one value."""
    values = as_plain_text(values)  # dictionary decoded; string/binary views as string/binary
    if len(values) > CHUNK_ROWS:
        chunks = range(0, len(values), CHUNK_ROWS)
        return np.concatenate([hash_values(values.slice(i, CHUNK_ROWS)) for i in chunks])
    kind = values.type
    if pa.types.is_boolean(kind):
        values, kind = values.cast(pa.uint8()), pa.uint8()
    if len(values) == values.null_count:  # no value (the null type included)
        return mix(np.full(len(values), _NULL, np.uint64))
    if is_text(kind):
        hashed = _bytes_hash(*_text_layout(values))
    elif (width := kind.byte_width) in (1, 2, 4, 8):
        words = np.frombuffer(values.buffers()[1], f"<u{width}", len(values), values.offset * width)
        hashed = mix(words.astype(np.uint64))
    else:  # decimals, fixed-size binary: their bytes, `width` apiece
        data = np.frombuffer(values.buffers()[1], np.uint8, len(values) * width,
                             values.offset * width)  # fmt: skip
        hashed = _bytes_hash(data, np.arange(len(values) + 1, dtype=np.int64) * width)
    if values.null_count:
        hashed[values.is_null().to_numpy(zero_copy_only=False)] = mix(np.array([_NULL]))[0]
    return hashed


def _text_layout(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 bytes, int64[n + 1] offsets into them) of a string or binary array."""
    _, offsets, data = values.buffers()
    large = pa.types.is_large_string(values.type) or pa.types.is_large_binary(values.type)
    at = np.frombuffer(offsets, np.int64 if large else np.int32, len(values) + 1,
                       values.offset * (8 if large else 4)).astype(np.int64)  # fmt: skip
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    return raw[at[0] : at[-1]], at - at[0]


def _bytes_hash(data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """uint64[n]: a hash of each byte string (data[offsets[i]:offsets[i + 1]]): the XOR of one
    pseudo-random word per (position, byte) (tabulation hashing), mixed with the length."""
    lengths = np.diff(offsets)
    position = np.arange(len(data), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
    terms = mix((position.astype(np.uint64) << np.uint64(8)) | data)
    hashed = np.zeros(len(lengths), np.uint64)
    filled = lengths > 0
    if filled.any():  # each string's terms: from its start to the next non-empty one's
        hashed[filled] = np.bitwise_xor.reduceat(terms, offsets[:-1][filled])
    return mix(hashed ^ mix(lengths.astype(np.uint64)))


def repeated_hashes(sources: list[np.ndarray]) -> dict[int, np.ndarray]:
    """{source index: the hashes it holds that occur more than once over all `sources`
    (sorted, unique)}, for the sources holding any. `sources`: each one's hashes, sorted.

    Compared a bucket (a range of hash values) at a time, so memory beyond the sources' own
    arrays is about BUCKET hashes, however many there are."""
    total = sum(len(h) for h in sources)
    bits = max(0, math.ceil(math.log2(total / BUCKET))) if total > BUCKET else 0
    bounds = np.array([b << (64 - bits) for b in range(1, 1 << bits)], np.uint64)
    cuts = [np.concatenate([[0], np.searchsorted(h, bounds), [len(h)]]) for h in sources]
    found, owners = [], []
    for b in range(1 << bits):
        pieces = [h[c[b] : c[b + 1]] for h, c in zip(sources, cuts)]
        owner = np.repeat(np.arange(len(sources), dtype=np.int32), [len(p) for p in pieces])
        hashes = np.concatenate(pieces) if pieces else np.zeros(0, np.uint64)
        order = np.argsort(hashes, kind="stable")  # merges the sorted runs
        hashes, owner = hashes[order], owner[order]
        same = hashes[1:] == hashes[:-1]
        repeat = np.zeros(len(hashes), bool)
        repeat[1:] = same
        repeat[:-1] |= same
        found.append(hashes[repeat])
        owners.append(owner[repeat])
    hashes, owner = np.concatenate(found), np.concatenate(owners)
    order = np.lexsort((hashes, owner))
    hashes, owner = hashes[order], owner[order]
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]]) if len(owner) else []
    ends = [*starts[1:], len(owner)]
    return {int(owner[s]): np.unique(hashes[s:e]) for s, e in zip(starts, ends)}


def picked(hashes: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """bool[n]: which of `hashes` are in `wanted` (sorted)."""
    if not len(wanted):
        return np.zeros(len(hashes), bool)
    at = np.searchsorted(wanted, hashes).clip(0, len(wanted) - 1)
    return wanted[at] == hashes
