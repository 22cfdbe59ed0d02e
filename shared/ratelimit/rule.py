"""The rate rule, pure: where one more send fits in a sliding log of send times, and the log's record.

A send may leave at time t when, for every window of `limit` sends per `ms`, the `limit`-th most
recent logged send is at least `ms` before t. No I/O and no clock here: shared.ratelimit.limiter
applies the rule to a stored log, and tests/unit/test_ratelimit_rule.py checks it by property.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Protocol


class WindowSetting(Protocol):
    """A configured window (shared.config.settings.RateWindow): at most `limit` calls per `seconds`."""

    @property
    def limit(self) -> int: ...

    @property
    def seconds(self) -> float: ...


@dataclass(frozen=True)
class Window:
    """At most `limit` sends in any `ms` milliseconds (the margin already added)."""

    limit: int
    ms: int


def windows_with_margin(windows: Sequence[WindowSetting], margin_ms: int) -> tuple[Window, ...]:
    return tuple(Window(w.limit, round(w.seconds * 1000) + margin_ms) for w in windows)


def shared_windows(windows: Sequence[Window], share: float) -> tuple[Window, ...]:
    """The windows as a class with `share` of each limit sees them (invariant 6): the same length,
    floor(share * limit) sends (at least one)."""
    if share >= 1.0:
        return tuple(windows)
    return tuple(Window(max(1, math.floor(w.limit * share)), w.ms) for w in windows)


def earliest_slot(log: Sequence[int], windows: Sequence[Window], not_before: int, blocked_until: int = 0) -> int:
    """The earliest time >= `not_before` (and >= every logged time) at which one more send fits.

    `log` is sorted. Because a new send is never placed before an existing one, only windows that
    end at the new send matter: its `limit`-th predecessor must be at least `ms` earlier.
    """
    slot = max(not_before, blocked_until, log[-1] if log else not_before)
    for window in windows:
        if len(log) >= window.limit:
            slot = max(slot, log[-window.limit] + window.ms)
    return slot


def record(log: Sequence[int], send_at: int, horizon_ms: int) -> list[int]:
    """The log with `send_at` added and entries that no window can see any more dropped."""
    kept = list(log[bisect.bisect_right(log, send_at - horizon_ms) :])
    bisect.insort(kept, send_at)
    return kept


@dataclass(frozen=True)
class WindowStats:
    limit: int
    seconds: float
    used: int  # sends logged in the window ending now, reservations included
    next_free_ms: int  # epoch ms when one more send fits in this window


def window_stats(
    log: Sequence[int], windows: Sequence[Window], seconds: Sequence[float], now: int, blocked_until: int = 0
) -> list[WindowStats]:
    """Each window's use at `now`; its next free slot counts reservations and a Retry-After hold."""
    stats = []
    for window, secs in zip(windows, seconds, strict=True):
        used = len(log) - bisect.bisect_right(log, now - window.ms)
        stats.append(WindowStats(window.limit, secs, used, earliest_slot(log, [window], now, blocked_until)))
    return stats


def merge(stored: Sequence[int], known: Sequence[int], since: int) -> tuple[int, ...]:
    """`stored` with every entry of `known` after `since` that it lacks (as a multiset: two sends
    logged in the same millisecond stay two)."""
    recent = [t for t in known if t > since]
    missing = Counter(recent) - Counter(stored)
    if not missing:
        return tuple(stored)
    return tuple(sorted([*stored, *missing.elements()]))


# --- the stored log ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    log: tuple[int, ...]
    blocked_until: int
    etag: str | None  # None: the record does not exist yet
    _: KW_ONLY
    horizon_ms: int = 0  # the longest window (margin included) any writer declared: prune only past it
    writers: str = ""  # nonces of the latest admissions, comma-separated (invariant 5 recognises its own)


class Conflict(Exception):
    """The record changed since it was read (HTTP 412), or was created by someone else."""
