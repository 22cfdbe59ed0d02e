"""Judging a record of arrival times against rolling windows (for tests and benchmarks)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def violations(arrivals: Sequence[float], windows: Sequence[tuple[int, float]]) -> int:
    """How many arrivals found their window already full: for each arrival t and each window
    (limit, seconds), the arrivals in (t - seconds, t] must number at most limit."""
    times = sorted(arrivals)
    over = 0
    for i, t in enumerate(times):
        for limit, seconds in windows:
            if i + 1 - bisect.bisect_right(times, t - seconds) > limit:
                over += 1
                break
    return over


def max_allowed(span: float, windows: Sequence[tuple[int, float]]) -> int:
    """The most calls the windows allow within a span of `span` seconds (greedy, as early as allowed)."""
    times: list[float] = []
    t = 0.0
    while True:
        for limit, seconds in windows:
            if len(times) >= limit:
                t = max(t, times[-limit] + seconds)
        if t > span + 1e-9:
            return len(times)
        times.append(t)


def earliest(count: int, windows: Sequence[tuple[int, float]]) -> float:
    """The least time from the first of `count` calls to the last that the windows allow."""
    times: list[float] = []
    t = 0.0
    while len(times) < count:
        for limit, seconds in windows:
            if len(times) >= limit:
                t = max(t, times[-limit] + seconds)
        times.append(t)
    return times[-1]
