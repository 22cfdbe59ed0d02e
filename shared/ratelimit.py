"""The shared rate limiter: an exact sliding log of send times, in any storage.

The rule (pure functions, no I/O): a call may be sent at time t when, for every window of `limit`
calls per `ms`, the `limit`-th most recent logged call is at least `ms` before t. Calls are logged
at the time they will be *sent*, which may lie in the future: a caller that may wait reserves the
next free slot, writes it, and sleeps until it. So waiting callers queue up in the log instead of
polling, and each admission is one conditional write (plus a read when instances contend).

`RateLimiter` applies the rule to a `SlidingLogStore` (Table Storage in production, memory in
tests) with optimistic concurrency: a write with a stale ETag fails, and the caller re-reads and
tries again with jitter.
"""

from __future__ import annotations

import bisect
import logging
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.errors import QuotaExceeded, StateStoreUnavailable
from shared.settings import RateWindow

logger = logging.getLogger(__name__)

MAX_CONFLICTS = 40  # conditional-write retries of one admission before we call it unavailable
CONFLICT_JITTER_MS = 15
DEFAULT_RESERVE_MS = 20  # time a write is expected to take, before we have measured any
MIN_RESERVE_MS, MAX_RESERVE_MS = 2, 250
LATENCY_SAMPLES = 32
READ_FIRST_AFTER_CONFLICT = 16  # admissions to start with a fresh read after a conflict
STALE_VERDICT_MS = 250  # a "full" verdict from a cache older than this is re-checked before refusing


# --- the rule ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """At most `limit` sends in any `ms` milliseconds (the margin already added)."""

    limit: int
    ms: int


def windows_with_margin(windows: Sequence[RateWindow], margin_ms: int) -> tuple[Window, ...]:
    return tuple(Window(w.limit, round(w.seconds * 1000) + margin_ms) for w in windows)


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
    log: Sequence[int], windows: Sequence[Window], seconds: Sequence[float], now: int
) -> list[WindowStats]:
    stats = []
    for window, secs in zip(windows, seconds, strict=True):
        used = len(log) - bisect.bisect_right(log, now - window.ms)
        next_free = now if used < window.limit else earliest_slot(log, [window], now)
        stats.append(WindowStats(window.limit, secs, used, next_free))
    return stats


# --- storage interface ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Snapshot:
    log: tuple[int, ...]
    blocked_until: int
    etag: str | None  # None: the record does not exist yet


class Conflict(Exception):
    """The record changed since it was read (HTTP 412), or was created by someone else."""


class SlidingLogStore(Protocol):
    def read(self) -> Snapshot:
        """The current record; raises StateStoreUnavailable."""

    def write(self, log: Sequence[int], blocked_until: int, etag: str | None) -> str:
        """Replace the record if it is still at `etag` (create it when None); the new ETag.

        Raises Conflict or StateStoreUnavailable."""


# --- the limiter ---------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


class RateLimiter:
    """Keeps every instance that shares a store inside every window, together."""

    def __init__(
        self,
        store: SlidingLogStore,
        windows: Sequence[RateWindow],
        margin_ms: int,
        clock: Callable[[], int] = _now_ms,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._store = store
        self._seconds = [w.seconds for w in windows]
        self._windows = windows_with_margin(windows, margin_ms)
        self._horizon = max(w.ms for w in self._windows)
        # A send leaves at most margin/4 after its logged time (a later write gives the slot up),
        # and before it only where no window could notice (see _may_go_early); the rest of the
        # margin covers the network and clock skew between instances.
        self._slip_ms = max(1, margin_ms // 4)
        self._clock = clock
        self._sleep = sleep
        self._cached: Snapshot | None = None
        self._cached_at = 0
        self._read_first = 0
        self._latencies: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        self._lock = threading.Lock()

    def acquire(self, max_wait: float = 0.0) -> None:
        """Return at the moment a call may be sent; raise QuotaExceeded when that is past `max_wait`."""
        max_wait_ms = int(max_wait * 1000)
        conflicts = 0
        while True:
            with self._lock:  # threads of one instance take turns at the record (sleeping is outside)
                decision = self._reserve(max_wait_ms)
            if decision is None:
                conflicts += 1
                if conflicts > MAX_CONFLICTS:
                    raise StateStoreUnavailable("The rate limit record is too contended", retry_after=1)
                self._sleep(random.uniform(0, CONFLICT_JITTER_MS) / 1000)
                continue
            snap, slot, written = decision
            if written > slot + self._slip_ms:
                continue  # our write came back after the reserved time: give that slot up
            if slot > written and not self._may_go_early(snap, slot, slot - written):
                self._sleep((slot - written) / 1000)
            return

    def _reserve(self, max_wait_ms: int) -> tuple[Snapshot, int, int] | None:
        """Write the next free slot to the record: (the snapshot it was placed in, the slot, when the
        write came back); None on a conflict. Raises QuotaExceeded past `max_wait_ms`."""
        while True:
            snap = self._snapshot(fresh=self._read_first > 0 or self._cached is None)
            now = self._clock()
            reserve = self._reserve_ms()
            slot = earliest_slot(snap.log, self._windows, now + reserve, snap.blocked_until)
            # Up to MAX_RESERVE_MS of delay is scheduling (another instance reserved a little further
            # ahead than we would), not a full window: such a caller waits rather than hears 429.
            if slot - now > max_wait_ms + MAX_RESERVE_MS:
                if now - self._cached_at > STALE_VERDICT_MS and not self._read_first:
                    self._read_first = 1  # a full verdict from an old cache: confirm it once
                    continue
                raise QuotaExceeded("The shared Defender API quota is used up", wait_seconds=(slot - now) / 1000)
            try:
                self._save(record(snap.log, slot, self._horizon), snap.blocked_until, snap.etag)
            except Conflict:
                self._read_first = READ_FIRST_AFTER_CONFLICT
                return None
            written = self._clock()
            self._latencies.append(written - now)
            return snap, slot, written

    def _may_go_early(self, snap: Snapshot, slot: int, early_ms: int) -> bool:
        """Whether the call may leave `early_ms` before its slot: only when every window would still
        admit it with the window stretched by that much, so it cannot be the call that fills one.
        (An uncontended call then goes at once instead of sleeping out its reservation.)"""
        if snap.blocked_until > slot - early_ms:
            return False
        stretched = [Window(w.limit, w.ms + early_ms) for w in self._windows]
        return earliest_slot(snap.log, stretched, 0) <= slot

    def throttled(self, retry_after: int) -> None:
        """Defender said 429: every instance holds off until `retry_after` seconds from now."""
        until = self._clock() + retry_after * 1000
        for _ in range(MAX_CONFLICTS):
            try:
                with self._lock:
                    snap = self._snapshot(fresh=True)
                    if snap.blocked_until >= until:
                        return
                    self._save(snap.log, until, snap.etag)
                return
            except Conflict:
                self._sleep(random.uniform(0, CONFLICT_JITTER_MS) / 1000)
        logger.warning("could not record Defender's Retry-After: the rate limit record is too contended")

    def stats(self) -> tuple[list[WindowStats], int]:
        """Each window's use now, from a fresh read; and the blocked-until time (epoch ms, 0 = none)."""
        with self._lock:
            snap = self._snapshot(fresh=True)
        return window_stats(snap.log, self._windows, self._seconds, self._clock()), snap.blocked_until

    def _snapshot(self, fresh: bool) -> Snapshot:
        if fresh or self._cached is None:
            self._cached = self._store.read()
            self._cached_at = self._clock()
            self._read_first = max(0, self._read_first - 1)
        return self._cached

    def _save(self, log: Sequence[int], blocked_until: int, etag: str | None) -> None:
        try:
            new_etag = self._store.write(log, blocked_until, etag)
        except Conflict:
            self._cached = None
            raise
        self._cached = Snapshot(tuple(log), blocked_until, new_etag)
        self._cached_at = self._clock()

    def _reserve_ms(self) -> int:
        """How far ahead to log an immediate send: about the time our write takes to come back."""
        if not self._latencies:
            return DEFAULT_RESERVE_MS
        high = statistics.quantiles(self._latencies, n=10)[-1] if len(self._latencies) > 1 else self._latencies[0]
        return int(min(MAX_RESERVE_MS, max(MIN_RESERVE_MS, high * 1.5 + 1)))
