"""Chunk pipeline: read ahead, compute, write behind.

Why: a step spends its time in three places (storage reads, torch compute, storage writes). Reads of
the next chunks and writes of finished ones run in threads while the main thread computes, so the
device is not idle waiting on storage. Memory stays bounded: at most `prefetch` chunks are read ahead
and at most `prefetch` writes are in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from .geometry import BBox
from .progress import Progress

Loaded = TypeVar("Loaded")
Result = TypeVar("Result")


def run_chunks(
    chunks: Iterable[BBox],
    load: Callable[[BBox], Loaded],
    compute: Callable[[BBox, Loaded], Result],
    store: Callable[[BBox, Result], None],
    progress: Progress,
    *,
    prefetch: int = 2,
    pixels: Callable[[BBox], int] | None = None,
) -> None:
    """Run load -> compute -> store over `chunks`, overlapping I/O with compute.

    `pixels` counts the input pixels a chunk stands for (default: its own voxels) for the Mpx/s figure.
    """
    pending_reads: deque[tuple[BBox, Future[Loaded]]] = deque()
    pending_writes: deque[Future[None]] = deque()
    chunk_iter = iter(chunks)

    def fill(pool: ThreadPoolExecutor) -> None:
        while len(pending_reads) < max(1, prefetch):
            chunk = next(chunk_iter, None)
            if chunk is None:
                return
            pending_reads.append((chunk, pool.submit(load, chunk)))

    def stored(chunk: BBox, result: Result) -> None:
        store(chunk, result)
        progress.advance(1, pixels(chunk) if pixels else chunk.size[0] * chunk.size[1] * chunk.size[2])

    with ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="read") as readers, ThreadPoolExecutor(
        max_workers=max(1, prefetch), thread_name_prefix="write"
    ) as writers:
        try:
            fill(readers)
            while pending_reads:
                chunk, future = pending_reads.popleft()
                loaded = future.result()
                fill(readers)
                result = compute(chunk, loaded)
                while len(pending_writes) >= max(1, prefetch):
                    pending_writes.popleft().result()
                pending_writes.append(writers.submit(stored, chunk, result))
            while pending_writes:
                pending_writes.popleft().result()
        except BaseException:
            for _, future in pending_reads:
                future.cancel()
            for write in pending_writes:
                write.cancel()
            raise
