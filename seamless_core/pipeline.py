"""Chunk pipeline: read ahead, compute, write behind.

Why: a step spends its time in three places (storage reads, torch compute, storage writes). Reads of
the next chunks and writes of finished ones run in threads while the main thread computes, so the
device is not idle waiting on storage. Memory stays bounded: at most `prefetch` chunks are read ahead
and at most `prefetch` writes are in flight.

Threads: torch's intra-op threads belong to the compute; on a CPU-bound step whose reads and writes
are real work too (the render on file://: copying 150 MiB per 4096² section through the page cache),
a compute using every core competes with its own I/O threads, and OpenMP teams wait on preempted
members. Such a step passes `compute_threads` and `io_threads` (splitting the cores between the two)
for the duration of the run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from .progress import Progress

Item = TypeVar("Item")  # a chunk (BBox) or a group of chunks
Loaded = TypeVar("Loaded")
Result = TypeVar("Result")


def run_chunks(
    chunks: Iterable[Item],
    load: Callable[[Item], Loaded],
    compute: Callable[[Item, Loaded], Result],
    store: Callable[[Item, Result], None],
    progress: Progress,
    *,
    prefetch: int = 2,
    pixels: Callable[[Item], int] | None = None,
    compute_threads: int | None = None,
    io_threads: int | None = None,
    advance: Callable[[Item], int] | None = None,
) -> None:
    """Run load -> compute -> store over `chunks`, overlapping I/O with compute.

    `chunks` may also be groups of chunks (a batched step); `advance` then says how many chunks an item
    counts for in the progress (default 1), and `pixels` how many input pixels (default: its voxels).
    `compute_threads` sets torch's intra-op threads while the chunks run (restored afterwards).
    `io_threads` is how many loads (and how many stores) may run at once; default `prefetch`. Fewer
    than `prefetch` keeps the read-ahead depth while bounding the cores that I/O takes.
    """
    workers = max(1, io_threads if io_threads is not None else prefetch)
    threads = torch.get_num_threads()
    if compute_threads is not None and compute_threads != threads:
        torch.set_num_threads(max(1, compute_threads))
        try:
            _run(chunks, load, compute, store, progress, prefetch, pixels, workers, advance)
        finally:
            torch.set_num_threads(threads)
    else:
        _run(chunks, load, compute, store, progress, prefetch, pixels, workers, advance)


def _run(
    chunks: Iterable[Item],
    load: Callable[[Item], Loaded],
    compute: Callable[[Item, Loaded], Result],
    store: Callable[[Item, Result], None],
    progress: Progress,
    prefetch: int,
    pixels: Callable[[Item], int] | None,
    workers: int,
    advance: Callable[[Item], int] | None = None,
) -> None:
    pending_reads: deque[tuple[Item, Future[Loaded]]] = deque()
    pending_writes: deque[Future[None]] = deque()
    chunk_iter = iter(chunks)

    def fill(pool: ThreadPoolExecutor) -> None:
        while len(pending_reads) < max(1, prefetch):
            chunk = next(chunk_iter, None)
            if chunk is None:
                return
            pending_reads.append((chunk, pool.submit(load, chunk)))

    def stored(chunk: Item, result: Result) -> None:
        store(chunk, result)
        progress.advance(advance(chunk) if advance else 1,
                         pixels(chunk) if pixels else chunk.size[0] * chunk.size[1] * chunk.size[2])

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="read") as readers, ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="write"
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
