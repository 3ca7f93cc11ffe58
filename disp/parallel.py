"""Batches on several CPU cores at once: one worker thread per share of torch's intra-op threads.

A small language model's operators are too small for torch's intra-op threads to split well, and its
batch-1 matrix multiplies already run near one core's GEMM rate (docs/performance.md). Independent batches
on separate threads, each with its share of the cores, use a CPU better. Each batch is computed exactly as
it is with one worker, so results do not depend on the number of workers. On an accelerator one worker is
the default: its kernels already fill the device.

torch ops release the GIL, and autograd and grad mode are per thread, so model forwards and backwards may
run concurrently. What is shared (a parameter's `requires_grad`, SDPA backend flags) must be set by the
caller around `map_ordered`, not inside the batch function.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def resolve_workers(workers: int | None, device: str | torch.device) -> int:
    """None or 0 = auto: torch's intra-op thread count on a CPU (one worker per core), 1 elsewhere."""
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0 (0 = auto), got {workers}")
    if workers:
        return workers
    return max(1, torch.get_num_threads()) if torch.device(device).type == "cpu" else 1


@contextmanager
def thread_share(workers: int) -> Iterator[int]:
    """Give each of `workers` threads its share of torch's intra-op threads for the duration (yields it).

    torch's thread count is process-wide and a thread reads it once, when it first runs an operator, so
    the pool that uses the share must be started inside this block.
    """
    total = torch.get_num_threads()
    share = max(1, total // workers)
    torch.set_num_threads(share)
    try:
        yield share
    finally:
        torch.set_num_threads(total)


def map_ordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) for every item, in the order of `items`.

    With workers > 1, fn runs on that many threads, at most 2·workers items ahead of the consumer;
    `items` is drawn in the calling thread (so a loader there can stay ahead) and so are the results, so
    progress and cancellation checks stay in the caller's thread. If the consumer stops early, items not
    started are dropped and those running are waited for.
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    with thread_share(workers), ThreadPoolExecutor(workers, thread_name_prefix="disp-worker") as pool:
        pending: deque[tuple[T, Future]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= 2 * workers:
                    done, fut = pending.popleft()
                    yield done, fut.result()
            while pending:
                done, fut = pending.popleft()
                yield done, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()

