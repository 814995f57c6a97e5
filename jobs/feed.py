"""How an actor keeps its encoder fed: notes cut into units, tokenized ahead in a thread.

The notes of each record batch are cut into units of at most `Feed.unit_chars` characters (a
longer note alone) and tokenized in a background thread (`prefetch`), `Feed.depth` units ahead
of the one being encoded: memory holds `depth + 1` units of tokens at most (README: "What
bounds an actor's memory"). No Ray.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from .spec import PoolSpec

if TYPE_CHECKING:
    from clinicalbert_core.tokenizer import Windows

GPU_DEPTH = 4  # units a cuda actor keeps tokenized ahead of the one being encoded
UNIT_BATCHES = 64  # a unit holds up to UNIT_BATCHES x batch_tokens characters of notes


@dataclass(frozen=True)
class Feed:
    """How an actor keeps its encoder fed (README: "What bounds an actor's memory").

    The notes of each record batch are cut into units of at most `unit_chars` characters (a
    longer note is a unit of its own) and tokenized in a background thread at most `depth`
    units ahead of the one being encoded, `threads` tokenizer threads at a time.
    """

    depth: int = 1  # units tokenized ahead (memory: depth + 1 units of tokens at most)
    threads: int = 1  # tokenizer threads (`tokenizers`' pool: RAYON_NUM_THREADS)
    unit_chars: int = UNIT_BATCHES * 8192

    def __post_init__(self) -> None:
        if self.depth < 0 or self.threads < 1 or self.unit_chars < 1:
            raise ValueError(f"feed needs depth >= 0, threads >= 1, unit_chars >= 1: {self}")

    @classmethod
    def for_pool(cls, pool: PoolSpec, cpus: int | None = None) -> Feed:
        """CPU (and mps) actors: one unit ahead, one tokenizer thread (the other CPUs run
        torch). cuda actors: GPU_DEPTH units ahead, tokenized on `cpus` threads (default the
        pool's cpus_per_actor)."""
        unit = UNIT_BATCHES * pool.batch_tokens
        if pool.device == "cuda":
            return cls(depth=GPU_DEPTH, threads=cpus or pool.cpus_per_actor, unit_chars=unit)
        return cls(depth=1, threads=1, unit_chars=unit)


@dataclass
class Unit:
    """Some notes of one record batch, tokenized: what one encoder call takes."""

    batch: pa.RecordBatch  # the record batch they come from
    rows: np.ndarray  # int64[n] their rows in `batch` (notes that yielded tokens)
    windows: Windows
    errors: pa.Table | None = None  # the batch's error rows, on its last unit
    last: bool = False  # the batch's last unit
    texts: list[str] | None = None  # the notes at `rows` (what a token head's rules read)


def cut_runs(rows: list[int], sizes: list[int], budget: int) -> list[list[int]]:
    """`rows` in order, cut into runs whose `sizes` add up to at most `budget` (a row whose
    size alone is larger: a run of its own)."""
    groups: list[list[int]] = []
    used = 0
    for row, size in zip(rows, sizes):
        if not groups or used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(row)
        used += size
    return groups


T = TypeVar("T")


def prefetch(items: Iterable[T], depth: int) -> Iterator[T]:
    """Yield `items` in order, made by a background thread at most `depth` items ahead of
    the one the caller holds (an item is released when the caller asks for the next): at
    most depth + 1 items exist at once. The producer's exception is raised here; closing
    this generator early stops the producer after the item it is making."""
    slots = threading.Semaphore(depth + 1)
    made: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
    stop = threading.Event()
    end = object()

    def produce() -> None:
        try:
            it = iter(items)
            while slots.acquire() and not stop.is_set():
                item = next(it, end)
                made.put((item, None))
                if item is end:
                    return
        except BaseException as e:  # handed to the consumer, raised there
            made.put((end, e))

    thread = threading.Thread(target=produce, name="tokenize", daemon=True)
    thread.start()
    try:
        while True:
            item, error = made.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
            slots.release()
    finally:
        stop.set()
        slots.release()  # wakes a producer waiting for a slot, so it sees `stop`
        thread.join()
