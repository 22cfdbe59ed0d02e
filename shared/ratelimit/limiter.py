"""The shared rate limiter: an exact sliding log of send times, in any storage.

The rule (shared.ratelimit.rule, pure): a call may be sent at time t when, for every window of `limit`
calls per `ms`, the `limit`-th most recent logged call is at least `ms` before t. Calls are logged
at the time they will be *sent*, which may lie in the future: a caller that may wait reserves the
next free slot, writes it, and sleeps until it. So waiting callers queue up in the log instead of
polling, and each admission is one conditional write (plus a read when instances contend).

`RateLimiter` applies the rule to a `SlidingLogStore` (Table Storage in production, memory in
tests) with optimistic concurrency: a write with a stale ETag fails, and the caller re-reads and
tries again with jitter.

Invariants (margin M = RATE_LIMIT_SAFETY_MS, slip S = M/4); each is enforced here and checked by
tests/unit/test_simulation.py:

1. A send leaves at most S after its logged slot, or not at all: the caller asks `on_time(permit)`
   right before sending and gives the slot up when it is late. It leaves before its slot only where
   every window, stretched by the difference (at most MAX_EARLY_MS), would still admit it
   (`_may_go_early`; the log keeps MAX_EARLY_MS of history past the longest window for it). So if clock
   skew between instances plus the send's network time stay within M - S, no window overflows at
   Defender. Everything slow (token, connection) must happen before `acquire`, never after it.
2. One admission writes at most MAX_ENTRIES_PER_ADMISSION log entries, slots given up included;
   past that it raises StateStoreUnavailable (503, or the queue's retry) instead of burning more.
   A slow store raises the next reservation's lead to the write time it measured, so the second
   entry lands in time where the first did not.
3. A lost record (entity or table deleted, storage rebuilt) is never taken for an empty one while
   this instance knows better: every read is merged with the freshest log the instance has read
   or written, so the rebuilt record holds every send it knew of.
4. Entries are pruned only past the longest horizon any writer of the record declared, so
   instances with different RATE_LIMITS on one key never trim each other's log.
5. A conditional write whose reply was lost (the SDK's retry then hears 412) is recognised on the
   re-read as our own and kept, not written again.
6. An admission with a share s < 1 (a lower class of work, e.g. verify reads beside the read-back
   that protects at-most-once) is placed only where every window, counting every logged send of
   any class, still has fewer than floor(s * limit) sends: the rest of each window stays free for
   the full-share class, which is never queued behind it.
"""

from __future__ import annotations

import logging
import random
import secrets
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.errors import QuotaExceeded, StateStoreUnavailable
from shared.ratelimit.rule import (
    Conflict,
    Snapshot,
    Window,
    WindowSetting,
    WindowStats,
    earliest_slot,
    merge,
    record,
    shared_windows,
    window_stats,
    windows_with_margin,
)

logger = logging.getLogger(__name__)

MAX_CONFLICTS = 40  # conditional-write retries of one admission before we call it unavailable
CONFLICT_JITTER_MS = 15
MAX_ENTRIES_PER_ADMISSION = 2  # invariant 2: log entries one admission may write, give-ups included
DEFAULT_RESERVE_MS = 20  # time a write is expected to take, before we have measured any
MIN_RESERVE_MS = 2
MAX_RESERVE_MS = 10_000  # a store slower than this is down, not slow
SCHEDULING_MS = 250  # a wait this short is another instance's reservation, not a full window
MAX_EARLY_MS = 250  # the most a send may leave before its slot; the log keeps this much more history
LATENCY_SAMPLES = 32
RECENT_WRITERS = 16  # admissions' nonces kept in the record: more than can race on one version
READ_FIRST_AFTER_CONFLICT = 16  # admissions to start with a fresh read after a conflict
STALE_VERDICT_MS = 250  # a "full" verdict from a cache older than this is re-checked before refusing
RETRY_AFTER_SLOW_STORE = 5


# --- the store ---------------------------------------------------------------------------------------
class SlidingLogStore(Protocol):
    def read(self) -> Snapshot:
        """The current record; raises StateStoreUnavailable."""

    def write(
        self, log: Sequence[int], blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = ""
    ) -> str:
        """Replace the record if it is still at `etag` (create it when None); the new ETag.

        Raises Conflict or StateStoreUnavailable."""


# --- the limiter ---------------------------------------------------------------------------------
def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Permit:
    """One admitted send: the slot logged for it (this instance's epoch ms) and the log entries its
    admission wrote so far (invariant 2 counts them)."""

    slot: int
    entries: int


class RateLimiter:
    """Keeps every instance that shares a store inside every window, together."""

    def __init__(
        self,
        store: SlidingLogStore,
        windows: Sequence[WindowSetting],
        margin_ms: int,
        *,
        clock: Callable[[], int] = _now_ms,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._store = store
        self._seconds = [w.seconds for w in windows]
        self._windows = windows_with_margin(windows, margin_ms)
        self._horizon = max(w.ms for w in self._windows)
        self._margin = margin_ms
        self.slip_ms = max(1, margin_ms // 4)  # invariant 1; the rest of the margin is skew and network
        self._clock = clock
        self._sleep = sleep
        self._cached: Snapshot | None = None
        self._cached_at = 0
        self._known = Snapshot((), 0, None)  # invariant 3: the freshest log this instance has seen
        self._read_first = 0
        self._latencies: deque[int] = deque(maxlen=LATENCY_SAMPLES)
        self._lock = threading.Lock()

    def acquire(self, max_wait: float = 0.0, spent: int = 0, share: float = 1.0) -> Permit:
        """Return at the moment a call may be sent; raise QuotaExceeded when that is past `max_wait`,
        StateStoreUnavailable when the store cannot admit it within MAX_ENTRIES_PER_ADMISSION entries
        (`spent`: entries this send's admission already wrote, e.g. a permit that came too late).
        `share`: the part of every window this admission may fill (invariant 6)."""
        max_wait_ms = int(max_wait * 1000)
        windows = shared_windows(self._windows, share)
        conflicts = 0
        lead: int | None = None
        while True:
            if spent >= MAX_ENTRIES_PER_ADMISSION:
                raise StateStoreUnavailable(
                    "The rate limit state answers too slowly to admit a call on time",
                    retry_after=RETRY_AFTER_SLOW_STORE,
                )
            with self._lock:  # threads of one instance take turns at the record (sleeping is outside)
                decision = self._reserve(max_wait_ms, lead, windows)
            if decision is None:
                conflicts += 1
                if conflicts > MAX_CONFLICTS:
                    raise StateStoreUnavailable("The rate limit record is too contended", retry_after=1)
                self._sleep(random.uniform(0, CONFLICT_JITTER_MS) / 1000)
                continue
            snap, slot, started, written = decision
            spent += 1
            if written > slot + self.slip_ms:
                lead = min(MAX_RESERVE_MS, (written - started) * 3 // 2 + 1)  # give it up; reserve further ahead
                continue
            if slot > written and not self._may_go_early(snap, slot, slot - written, windows):
                self._sleep((slot - written) / 1000)
            return Permit(slot, spent)

    def on_time(self, permit: Permit) -> bool:
        """Whether a send may still leave on `permit` (invariant 1): ask right before sending."""
        return self._clock() <= permit.slot + self.slip_ms

    def _reserve(
        self, max_wait_ms: int, lead: int | None, windows: Sequence[Window]
    ) -> tuple[Snapshot, int, int, int] | None:
        """Write the next free slot to the record: (the snapshot it was placed in, the slot, when the
        write started, when it came back); None on a conflict. Raises QuotaExceeded past `max_wait_ms`."""
        while True:
            snap = self._snapshot(fresh=self._read_first > 0 or self._cached is None)
            now = self._clock()
            reserve = lead if lead is not None else self._reserve_ms()
            slot = earliest_slot(snap.log, windows, now + reserve, snap.blocked_until)
            # Up to SCHEDULING_MS (or our own lead) of delay is scheduling, not a full window: such a
            # caller waits rather than hears 429.
            if slot - now > max_wait_ms + max(SCHEDULING_MS, reserve):
                if now - self._cached_at > STALE_VERDICT_MS and not self._read_first:
                    self._read_first = 1  # a full verdict from an old cache: confirm it once
                    continue
                raise QuotaExceeded("The shared Defender API quota is used up", wait_seconds=(slot - now) / 1000)
            horizon = max(self._horizon, snap.horizon_ms)
            nonce = secrets.token_hex(6)
            writers = ",".join([*snap.writers.split(",")[1 - RECENT_WRITERS :], nonce]).lstrip(",")
            try:
                kept = record(snap.log, slot, horizon + MAX_EARLY_MS)  # an early send looks back further
                self._save(kept, snap.blocked_until, snap.etag, horizon, writers)
            except Conflict:
                if not self._adopt_lost_reply(nonce):
                    self._read_first = READ_FIRST_AFTER_CONFLICT
                    return None
            written = self._clock()
            self._latencies.append(written - now)
            return snap, slot, now, written

    def _adopt_lost_reply(self, nonce: str) -> bool:
        """After a conflict: whether the record holds our own write (invariant 5: it was applied and
        only its reply was lost, the SDK's retry then heard 412); if so it stands as our admission."""
        return nonce in self._snapshot(fresh=True).writers.split(",")

    def _may_go_early(self, snap: Snapshot, slot: int, early_ms: int, windows: Sequence[Window]) -> bool:
        """Whether the call may leave `early_ms` before its slot: only when every window would still
        admit it with the window stretched by that much, so it cannot be the call that fills one.
        (An uncontended call then goes at once instead of sleeping out its reservation.)"""
        if early_ms > MAX_EARLY_MS or snap.blocked_until > slot - early_ms:
            return False
        stretched = [Window(w.limit, w.ms + early_ms) for w in windows]
        return earliest_slot(snap.log, stretched, 0) <= slot

    def throttled(self, retry_after: int) -> None:
        """Defender said 429: every instance holds off until `retry_after` seconds from now. Never
        raises: Defender's answer (and its audit record) must reach the caller all the same."""
        until = self._clock() + retry_after * 1000
        try:
            for _ in range(MAX_CONFLICTS):
                try:
                    with self._lock:
                        snap = self._snapshot(fresh=True)
                        if snap.blocked_until >= until:
                            return
                        self._save(snap.log, until, snap.etag, max(self._horizon, snap.horizon_ms), snap.writers)
                    return
                except Conflict:
                    self._sleep(random.uniform(0, CONFLICT_JITTER_MS) / 1000)
            logger.warning("could not record Defender's Retry-After: the rate limit record is too contended")
        except StateStoreUnavailable as exc:
            logger.warning("could not record Defender's Retry-After: %s", exc.message)

    def seconds_for(self, count: int) -> float:
        """How long from now until `count` more sends would all have left, placed one after another in
        the log as it is now (a fresh read); 0 when they all fit at once."""
        with self._lock:
            snap = self._snapshot(fresh=True)
        now = self._clock()
        log, last = list(snap.log), now
        for _ in range(count):
            last = earliest_slot(log, self._windows, now, snap.blocked_until)
            log.append(last)  # never before the newest entry: the log stays sorted
        return max(0, last - now) / 1000

    def stats(self) -> tuple[list[WindowStats], int]:
        """Each window's use now, from a fresh read; and the blocked-until time (epoch ms, 0 = none)."""
        with self._lock:
            snap = self._snapshot(fresh=True)
        now = self._clock()
        return window_stats(snap.log, self._windows, self._seconds, now, snap.blocked_until), snap.blocked_until

    def _snapshot(self, fresh: bool) -> Snapshot:
        if fresh or self._cached is None:
            self._cached = self._remembered(self._store.read())
            self._cached_at = self._clock()
            self._read_first = max(0, self._read_first - 1)
        return self._cached

    def _remembered(self, snap: Snapshot) -> Snapshot:
        """`snap` with what this instance knows and it lacks (invariant 3)."""
        known = self._known
        horizon = max(self._horizon, snap.horizon_ms, known.horizon_ms)
        # Only entries that can still matter: none at or before the newest entry's horizon (slots
        # are never placed before it), nor in the margin's older half (an instance whose clock runs
        # a little ahead prunes those legitimately, and they leave every window within moments).
        newest = max(
            self._clock() + self._margin // 2, snap.log[-1] if snap.log else 0, known.log[-1] if known.log else 0
        )
        log = merge(snap.log, known.log, newest - horizon)
        merged = Snapshot(
            log, max(snap.blocked_until, known.blocked_until), snap.etag, horizon_ms=horizon, writers=snap.writers
        )
        if log != snap.log:
            logger.warning("the rate limit record lacked %d recent sends: restored them", len(log) - len(snap.log))
        self._known = merged
        return merged

    def _save(self, log: Sequence[int], blocked_until: int, etag: str | None, horizon_ms: int, writers: str) -> None:
        try:
            new_etag = self._store.write(log, blocked_until, etag, horizon_ms, writers)
        except Conflict:
            self._cached = None
            raise
        self._cached = self._known = Snapshot(
            tuple(log), blocked_until, new_etag, horizon_ms=horizon_ms, writers=writers
        )
        self._cached_at = self._clock()

    def _reserve_ms(self) -> int:
        """How far ahead to log an immediate send: about the time our write takes to come back."""
        if not self._latencies:
            return DEFAULT_RESERVE_MS
        high = statistics.quantiles(self._latencies, n=10)[-1] if len(self._latencies) > 1 else self._latencies[0]
        return int(min(MAX_RESERVE_MS, max(MIN_RESERVE_MS, high * 1.5 + 1)))
