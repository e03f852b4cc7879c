"""Timing helpers of the benchmarks: summaries, the refresh split, amortised steps, timed calls."""

from __future__ import annotations

import pytest
import torch

from dash_shampoo.bench.timing import per_step, split_refresh, stats, time_region, timed, torch_threads


def test_stats_median_min_max_count() -> None:
    assert stats([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert stats([4.0, 1.0])["median"] == 2.5  # type: ignore[index]
    assert stats([]) is None


def test_split_refresh_follows_dash_schedule() -> None:
    samples = [(t, float(t)) for t in range(1, 23)]
    refresh, other = split_refresh(samples, frequency=10)
    assert refresh == [1.0, 10.0, 20.0]  # the start step, then every 10th
    assert len(other) == 19 and 1.0 not in other and 10.0 not in other
    assert split_refresh(samples, frequency=1) == ([float(t) for t in range(1, 23)], [])
    late, _ = split_refresh(samples, frequency=10, start=5)
    assert late == [5.0, 10.0, 20.0]


def test_per_step_amortises_the_refresh() -> None:
    refresh, other = stats([10.0]), stats([1.0, 1.0])
    assert per_step(1, refresh, None) == 10.0
    assert per_step(10, refresh, other) == pytest.approx((10.0 + 9 * 1.0) / 10)
    assert per_step(10, refresh, None) is None and per_step(10, None, other) is None


def test_timed_returns_the_warm_up_result_and_one_time_per_repeat() -> None:
    calls = []

    def work() -> int:
        calls.append(1)
        return len(calls)

    result, times = timed(work, 3, torch.device("cpu"))
    assert result == 1 and len(calls) == 4
    assert len(times) == 3 and all(t >= 0 for t in times)


def test_time_region_on_the_cpu() -> None:
    result, interval = time_region(lambda: "done", torch.device("cpu"))
    assert result == "done" and interval.seconds >= 0


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
