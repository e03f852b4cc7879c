"""Timing for the benchmarks: device synchronisation, timed calls and regions, sample summaries.

On a CPU a region is timed with ``time.perf_counter``; on CUDA with a pair of ``torch.cuda.Event``
records, so that nothing inside the region waits for the device (read :attr:`Interval.seconds`
after synchronising).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..preconditioner import refresh_due

T = TypeVar("T")


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the body with ``count`` torch CPU threads (torch's own count if None or 0), then restore
    the count from before."""
    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class Interval:
    """A timed region: two ``perf_counter`` readings, or two CUDA events."""

    start: Any
    end: Any

    @property
    def seconds(self) -> float:
        """Length of the region in seconds (for CUDA events, once the device has passed ``end``)."""
        if isinstance(self.start, float):
            return self.end - self.start
        return self.start.elapsed_time(self.end) / 1e3


def time_region(fn: Callable[[], T], device: torch.device) -> tuple[T, Interval]:
    """``fn()`` and the interval it took, without synchronising ``device``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        return result, Interval(start, end)
    begin = time.perf_counter()
    result = fn()
    return result, Interval(begin, time.perf_counter())


def timed(fn: Callable[[], T], repeats: int, device: torch.device) -> tuple[T, list[float]]:
    """Call ``fn`` once untimed (its result is returned), then ``repeats`` times: seconds of each,
    the device synchronised before and after every call."""
    sync(device)
    result = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return result, times


def stats(samples: Sequence[float]) -> dict[str, Any] | None:
    """``{median, min, max, n}`` of ``samples``; None when there are none."""
    if not samples:
        return None
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "n": len(samples)}


def split_refresh(
    samples: Iterable[tuple[int, float]], frequency: int, start: int = 1
) -> tuple[list[float], list[float]]:
    """Seconds of the ``(step, seconds)`` samples whose step refreshes the roots (DASH's schedule,
    :func:`~dash_shampoo.preconditioner.refresh_due`) and of the other steps."""
    refresh, other = [], []
    for step, seconds in samples:
        (refresh if refresh_due(step, start, frequency) else other).append(seconds)
    return refresh, other


def per_step(frequency: int, refresh: dict[str, Any] | None, other: dict[str, Any] | None) -> float | None:
    """Amortised step time ``(refresh + (F − 1)·other) / F`` of the medians (``F = 1``: refresh)."""
    if refresh is None or (frequency > 1 and other is None):
        return None
    if frequency == 1:
        return refresh["median"]
    return (refresh["median"] + (frequency - 1) * other["median"]) / frequency  # type: ignore[index]
