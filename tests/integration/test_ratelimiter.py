"""The limiter over every storage backend: the same test bodies, memory and Table (Azurite)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from localdev.azurite import Azurite
from shared.config.settings import RateWindow
from shared.errors import QuotaExceeded, StateStoreUnavailable
from shared.ratelimit.limiter import RateLimiter, SlidingLogStore
from shared.ratelimit.memory import MemorySlidingLog
from shared.ratelimit.rule import Conflict, Snapshot
from shared.ratelimit.table import TableSlidingLog, pack, unpack
from shared.storage.clients import table_client


class FakeClock:
    """Epoch ms that moves only when someone sleeps."""

    def __init__(self, start: int = 1_700_000_000_000) -> None:
        self.now = start
        self.slept: list[float] = []

    def __call__(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += round(seconds * 1000)


class CountingStore:
    """Counts the requests a store is asked for."""

    def __init__(self, inner: SlidingLogStore) -> None:
        self.inner = inner
        self.reads = 0
        self.writes = 0

    def read(self) -> Snapshot:
        self.reads += 1
        return self.inner.read()

    def write(self, log: Any, blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = "") -> str:
        self.writes += 1
        return self.inner.write(log, blocked_until, etag, horizon_ms, writers)


StoreFactory = Callable[[], SlidingLogStore]


@pytest.fixture(params=["memory", "table"])
def new_store(request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """A factory of handles on ONE shared record, as separate instances would hold."""
    if request.param == "memory":
        shared = MemorySlidingLog()
        yield lambda: shared
        return
    azurite: Azurite = request.getfixturevalue("azurite")
    conn = azurite.connection_string
    from shared.config.settings import StorageConnection

    key = f"k{secrets.token_hex(6)}"
    yield lambda: TableSlidingLog(table_client(StorageConnection(connection_string=conn), "LimiterTests"), key)


def limiter(store: SlidingLogStore, clock: FakeClock, windows: str = "3/1", margin: int = 0) -> RateLimiter:
    parsed = [RateWindow(int(c), float(s)) for c, s in (w.split("/") for w in windows.split(","))]
    return RateLimiter(store, parsed, margin, clock=clock, sleep=clock.sleep)


def test_admits_up_to_the_limit_then_refuses_with_the_exact_wait(new_store: StoreFactory) -> None:
    clock = FakeClock()
    lim = limiter(new_store(), clock, "3/10", margin=500)
    for _ in range(3):
        lim.acquire()

    with pytest.raises(QuotaExceeded) as refused:
        lim.acquire()

    # the first send was reserved ~20 ms ahead; it frees 10 s + 0.5 s margin later
    assert refused.value.retry_after == 11
    assert refused.value.status == 429


def test_a_caller_that_may_wait_is_given_the_next_slot(new_store: StoreFactory) -> None:
    clock = FakeClock()
    lim = limiter(new_store(), clock, "2/1")
    start = clock.now
    lim.acquire()
    lim.acquire()

    lim.acquire(max_wait=2.0)

    assert 1000 <= clock.now - start <= 1100  # slept until the first send's window passed


def test_steady_state_costs_one_write_and_no_read() -> None:
    clock = FakeClock()
    store = CountingStore(MemorySlidingLog())
    lim = limiter(store, clock, "1000/60")
    lim.acquire()
    store.reads = store.writes = 0

    for _ in range(50):
        lim.acquire()

    assert (store.reads, store.writes) == (0, 50)


def test_two_instances_share_one_quota(new_store: StoreFactory) -> None:
    clock = FakeClock()
    first, second = limiter(new_store(), clock, "4/10"), limiter(new_store(), clock, "4/10")
    admitted = 0
    for lim in (first, second, first, second, first, second):
        try:
            lim.acquire()
            admitted += 1
        except QuotaExceeded:
            pass

    assert admitted == 4


def test_throttled_holds_every_instance_off(new_store: StoreFactory) -> None:
    clock = FakeClock()
    told, other = limiter(new_store(), clock, "100/60"), limiter(new_store(), clock, "100/60")
    other.acquire()

    told.throttled(30)

    with pytest.raises(QuotaExceeded) as refused:
        other.acquire()
    assert refused.value.retry_after == 30
    clock.sleep(30.0)
    other.acquire()


def test_stats_report_use_and_next_slot(new_store: StoreFactory) -> None:
    clock = FakeClock()
    lim = limiter(new_store(), clock, "2/10,5/60")
    lim.acquire()
    lim.acquire()

    windows, blocked = lim.stats()

    assert [(w.limit, w.used) for w in windows] == [(2, 2), (5, 2)]
    assert windows[0].next_free_ms > clock.now + 9000
    assert windows[1].next_free_ms <= clock.now + 20
    assert blocked == 0


class BrokenStore:
    def read(self) -> Snapshot:
        raise StateStoreUnavailable("down", retry_after=5)

    def write(self, log: Any, blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = "") -> str:
        raise StateStoreUnavailable("down", retry_after=5)


def test_an_unreachable_store_fails_closed() -> None:
    with pytest.raises(StateStoreUnavailable):
        limiter(BrokenStore(), FakeClock()).acquire()


class AlwaysConflicting(MemorySlidingLog):
    def write(self, log: Any, blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = "") -> str:
        raise Conflict


def test_endless_conflicts_are_bounded() -> None:
    with pytest.raises(StateStoreUnavailable):
        limiter(AlwaysConflicting(), FakeClock()).acquire()


def test_a_write_that_returns_after_its_slot_gives_the_slot_up() -> None:
    clock = FakeClock()

    class SlowStore(MemorySlidingLog):
        calls = 0

        def write(self, log: Any, blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = "") -> str:
            self.calls += 1
            if self.calls == 1:
                clock.now += 2000  # the first write's reply comes back 2 s late
            return super().write(log, blocked_until, etag, horizon_ms, writers)

    store = SlowStore()
    lim = limiter(store, clock, "5/60", margin=100)

    lim.acquire()

    assert store.calls == 2 and len(store.read().log) == 2  # the late slot stays logged (never overshoots)


def test_packing_round_trips() -> None:
    log = (1_700_000_000_000, 1_700_000_000_001, 2**62)
    assert unpack(pack(log, 42)) == (log, 42)
    assert unpack(b"") == ((), 0)


def test_calls_with_room_go_at_once_and_a_waiting_call_leaves_exactly_at_its_slot() -> None:
    clock = FakeClock()
    store = MemorySlidingLog()
    lim = limiter(store, clock, "3/10")
    for _ in range(3):
        lim.acquire()
    assert clock.slept == []  # room to spare: no sleeping out the ~20 ms reservation
    first = store.read().log[0]

    lim.acquire(max_wait=20)  # its window is full: it must not leave before the first call ages out

    assert clock.now == first + 10_000 == store.read().log[-1]


def test_a_store_failing_while_recording_a_429_does_not_raise() -> None:
    limiter(BrokenStore(), FakeClock()).throttled(30)  # Defender's answer must still reach the caller


def test_instances_with_different_windows_on_one_key_keep_each_others_entries() -> None:
    clock = FakeClock()
    store = MemorySlidingLog()
    hourly, busy = limiter(store, clock, "3/60"), limiter(store, clock, "2/1")
    for _ in range(3):
        hourly.acquire()
    for _ in range(4):  # the short-window instance writes (and prunes) after its own horizon
        busy.acquire(max_wait=2)

    with pytest.raises(QuotaExceeded):
        hourly.acquire()  # its three calls are still in the log for its 60 s window
    assert len(store.read().log) == 7


def test_a_lost_record_is_rebuilt_from_what_the_instance_knows() -> None:
    clock = FakeClock()
    store = MemorySlidingLog()
    lim = limiter(store, clock, "3/60")
    for _ in range(3):
        lim.acquire()
    store.lose()  # the table was deleted, or the storage account rebuilt empty

    with pytest.raises(QuotaExceeded):
        lim.acquire()
    clock.sleep(0.3)
    with pytest.raises(QuotaExceeded):
        lim.acquire()  # after a fresh read of the empty record too
    assert store.read().log == () and lim.stats()[0][0].used == 3  # the empty record is not believed


def test_a_slow_store_writes_at_most_two_entries_then_answers_503() -> None:
    clock = FakeClock()

    class CrawlingStore(MemorySlidingLog):
        def write(self, log: Any, blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = "") -> str:
            assert self.requests < 50, "the limiter keeps writing to a store that only gets slower"
            version = super().write(log, blocked_until, etag, horizon_ms, writers)
            clock.now += 600 + len(log) * 1000  # every reply later than the one before
            return version

    store = CrawlingStore()
    lim = limiter(store, clock, "100/60", margin=200)

    with pytest.raises(StateStoreUnavailable):
        lim.acquire()
    assert len(store.read().log) == 2  # not a window's worth of given-up slots


def test_a_write_whose_reply_was_lost_is_kept_as_the_admission() -> None:
    clock = FakeClock()

    class LostReply(MemorySlidingLog):
        first = True

        def write(self, log: Any, blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = "") -> str:
            super().write(log, blocked_until, etag, horizon_ms, writers)
            if self.first:  # applied, then the SDK's retry of the same request heard 412
                self.first = False
                raise Conflict
            return str(self._version)

    store = LostReply()
    lim = limiter(store, clock, "5/60")

    lim.acquire()

    assert len(store.read().log) == 1
