"""A deterministic virtual world for the limiter and the cancel service: one clock, many instances.

Each instance is a greenlet running the real `RateLimiter`, `CancelService`, `DefenderClient` and
`IdempotencyStore`; only their I/O is replaced: the sliding log's store, the idempotency table, the
identity token and the HTTP transport each take virtual time (drawn by the test) and may fail the
way their real counterparts do. Exactly one greenlet runs at a time and they resume in order of
virtual time, so a schedule is fully reproducible and a 20 s run takes milliseconds.

`Defender` is the judge: it records when each request arrives (true time, no skew) and what it did.
"""

from __future__ import annotations

import email.utils
import heapq
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from azure.core import MatchConditions
from azure.core.exceptions import (
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import TableEntity
from greenlet import GreenletExit, getcurrent, greenlet

from shared.defender.transport import NotSent
from shared.errors import StateStoreUnavailable, UpstreamTimeout
from shared.ratelimit.rule import Conflict, Snapshot


class World:
    """Virtual time in ms; actors are greenlets resumed in order of their wake-up time."""

    def __init__(self) -> None:
        self.now = 0.0
        self._queue: list[tuple[float, int, greenlet]] = []
        self._seq = itertools.count()
        self._main = getcurrent()
        self._crash_at: dict[greenlet, float] = {}
        self.crashed: set[greenlet] = set()

    def spawn(self, run: Callable[[], None], at: float = 0.0, crash_at: float | None = None) -> greenlet:
        actor = greenlet(run, parent=self._main)
        if crash_at is not None:
            self._crash_at[actor] = crash_at
        heapq.heappush(self._queue, (at, next(self._seq), actor))
        return actor

    def sleep(self, ms: float) -> None:
        me = getcurrent()
        if me in self.crashed:
            raise GreenletExit
        heapq.heappush(self._queue, (self.now + max(0.0, ms), next(self._seq), me))
        self._main.switch()
        if me in self.crashed:  # resumed only by the garbage collector: a dead process does nothing
            raise GreenletExit

    def alive(self) -> None:
        if getcurrent() in self.crashed:
            raise GreenletExit

    def run(self, until: float) -> None:
        while self._queue:
            at, _, actor = heapq.heappop(self._queue)
            if at > until:
                break
            if self._crash_at.get(actor, float("inf")) <= at:
                self.crashed.add(actor)  # killed: never resumed again, its state left as it was
                continue
            self.now = at
            actor.switch()

    # clocks as each instance sees them
    def epoch_ms(self, skew_ms: float) -> Callable[[], int]:
        return lambda: int(self.now + skew_ms)

    def monotonic(self) -> float:
        return self.now / 1000

    def sleep_seconds(self, seconds: float) -> None:
        self.sleep(seconds * 1000)


@dataclass
class StoreFaults:
    """How the state store misbehaves: latencies (ms) and fault rates, drawn per operation."""

    latency: tuple[float, float] = (1.0, 20.0)
    slow_latency: float = 0.0  # a write during a slow spell takes this long (a throttled account)
    slow_spells: Sequence[tuple[float, float]] = ()  # (from, to) ms
    fail_before: float = 0.0  # the request never reaches the store
    fail_after: float = 0.0  # applied, then its reply is lost: the SDK gives up...
    lost_reply_412: float = 0.0  # ...or its retry hears 412
    losses: Sequence[float] = ()  # times at which the record (the table) vanishes


class LogStore:
    """The sliding log's store (shared by every instance's `RateLimiter`), like Table Storage."""

    def __init__(self, world: World, faults: StoreFaults, rng: random.Random) -> None:
        self._world = world
        self._faults = faults
        self._rng = rng
        self._record = Snapshot((), 0, None)
        self._version = 0
        self._losses = sorted(faults.losses)
        self.entries_by: dict[greenlet, int] = defaultdict(int)  # reservations each actor applied
        self.inside_holds = 0  # slots written inside the record's own Retry-After hold (blocked_until)
        self.lost = 0  # how often the record vanished

    def _latency(self, write: bool) -> float:
        low, high = self._faults.latency
        ms = self._rng.uniform(low, high)
        if write and any(a <= self._world.now < b for a, b in self._faults.slow_spells):
            ms += self._faults.slow_latency
        return ms / 2

    def _lose_due(self) -> None:
        while self._losses and self._losses[0] <= self._world.now:
            self._losses.pop(0)
            self._record = Snapshot((), 0, None)
            self.lost += 1

    def read(self) -> Snapshot:
        self._world.sleep(self._latency(False))
        self._world.alive()
        self._lose_due()
        if self._rng.random() < self._faults.fail_before:
            raise StateStoreUnavailable("virtual store down", retry_after=1)
        record = self._record
        self._world.sleep(self._latency(False))
        return record

    def write(
        self, log: Sequence[int], blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = ""
    ) -> str:
        self._world.sleep(self._latency(True))
        self._world.alive()
        self._lose_due()
        if self._rng.random() < self._faults.fail_before:
            raise StateStoreUnavailable("virtual store down", retry_after=1)
        if etag != self._record.etag:
            self._world.sleep(self._latency(True))
            raise Conflict
        added = Counter(log) - Counter(self._record.log)  # what this write reserves
        self.inside_holds += sum(1 for slot in added.elements() if slot < self._record.blocked_until)
        self._version += 1
        etag = str(self._version)
        if writers.rsplit(",", 1)[-1] not in self._record.writers.split(","):  # an admission's write
            self.entries_by[getcurrent()] += 1
        self._record = Snapshot(tuple(log), blocked_until, etag, horizon_ms=horizon_ms, writers=writers)
        self._world.sleep(self._latency(True))
        roll = self._rng.random()
        if roll < self._faults.fail_after:
            raise StateStoreUnavailable("virtual store: reply lost", retry_after=1)
        if roll < self._faults.fail_after + self._faults.lost_reply_412:
            raise Conflict
        return etag


EPOCH_S = 1_767_225_600.0  # virtual time 0 on the store's clock: 2026-01-01T00:00:00Z


class Table:
    """The idempotency table: create/get/update/delete with ETags, as azure-data-tables answers: an
    ETag is checked only with `match_condition=IfNotModified` (the SDK's default is unconditional),
    each entity carries the store's Timestamp (true time, when the write is applied) and every
    reply's `Date` (whole seconds, as the service sends it) reaches a `raw_response_hook`."""

    def __init__(self, world: World, rng: random.Random, latency: tuple[float, float] = (1.0, 10.0)) -> None:
        self._world = world
        self._rng = rng
        self.latency = latency
        self.slow_writes: dict[str, float] = {}  # partition key -> ms one write's reply takes (once), after it applied
        self._rows: dict[tuple[str, str], tuple[dict[str, Any], str, float]] = {}
        self._etags = itertools.count(1)

    def _io(self, partition_key: str | None = None, write: bool = False) -> float:
        """The way there; what the way back will take (a slow write: applied at once, answered late)."""
        slow = self.slow_writes.pop(partition_key, None) if write and partition_key is not None else None
        half = self._rng.uniform(*self.latency) / 2
        self._world.sleep(half)
        self._world.alive()
        return slow if slow is not None else half

    def _reply(self, half: float, hook: Any = None) -> None:
        self._world.sleep(half)
        if hook is not None:
            date = email.utils.formatdate(int(EPOCH_S + self._world.now / 1000), usegmt=True)
            hook(SimpleNamespace(http_response=SimpleNamespace(headers={"Date": date})))

    def _put(self, entity: Mapping[str, Any], half: float) -> dict[str, str]:
        etag = f"W/{next(self._etags)}"
        self._rows[(entity["PartitionKey"], entity["RowKey"])] = (dict(entity), etag, self._world.now)
        self._reply(half)
        return {"etag": etag}

    def _matches(self, key: tuple[str, str], etag: str | None, condition: Any) -> None:
        if key not in self._rows:
            raise ResourceNotFoundError("gone")
        if condition == MatchConditions.IfNotModified and self._rows[key][1] != etag:
            raise ResourceModifiedError("412")

    def create_table(self) -> None:
        return None

    def create_entity(self, entity: Mapping[str, Any], **_: Any) -> dict[str, str]:
        half = self._io(entity["PartitionKey"], write=True)
        if (entity["PartitionKey"], entity["RowKey"]) in self._rows:
            self._reply(half)
            raise ResourceExistsError("exists")
        return self._put(entity, half)

    def get_entity(self, partition_key: str, row_key: str, *, raw_response_hook: Any = None, **_: Any) -> TableEntity:
        half = self._io()
        if (partition_key, row_key) not in self._rows:
            self._reply(half)
            raise ResourceNotFoundError("not found")
        row, etag, stamped = self._rows[(partition_key, row_key)]
        entity = TableEntity(**row)
        timestamp = datetime.fromtimestamp(EPOCH_S + stamped / 1000, tz=UTC)
        cast(Any, entity)._metadata = {"etag": etag, "timestamp": timestamp}
        self._reply(half, raw_response_hook)
        return entity

    def update_entity(
        self, entity: Mapping[str, Any], *, etag: str | None = None, match_condition: Any = None, **_: Any
    ) -> dict[str, str]:
        half = self._io(entity["PartitionKey"], write=True)
        self._matches((entity["PartitionKey"], entity["RowKey"]), etag, match_condition)
        return self._put(entity, half)

    def upsert_entity(self, entity: Mapping[str, Any], **_: Any) -> dict[str, str]:
        return self._put(entity, self._io(entity["PartitionKey"], write=True))

    def delete_entity(
        self, partition_key: str, row_key: str, *, etag: str | None = None, match_condition: Any = None, **_: Any
    ) -> None:
        half = self._io(partition_key, write=True)
        try:
            self._matches((partition_key, row_key), etag, match_condition)
        except ResourceNotFoundError:
            self._reply(half)
            return  # deleting what is gone succeeds, as the SDK's delete does
        del self._rows[(partition_key, row_key)]
        self._reply(half)


class Tokens:
    """The managed identity: the first token of an instance comes after `cold_ms`, then from cache,
    until a refresh at `refresh_at` takes `cold_ms` again."""

    def __init__(self, world: World, cold_ms: float, refresh_at: float | None = None, fail: bool = False) -> None:
        self._world = world
        self._cold_ms = cold_ms
        self._refresh_at = refresh_at
        self._fresh = False
        self._fail = fail
        self.requests = 0

    def token(self) -> str:
        refresh = self._refresh_at is not None and self._world.now >= self._refresh_at
        if not self._fresh or refresh:
            self.requests += 1
            self._world.sleep(self._cold_ms)
            if self._fail:
                from shared.errors import TokenUnavailable

                raise TokenUnavailable("virtual identity endpoint down")
            self._fresh = True
            if refresh:
                self._refresh_at = None
        return "virtual-token"


@dataclass
class UpstreamFault:
    """What Defender's side does to one request: refuse it (503), act then lose the answer (a
    gateway's 502/504, or a cut connection), or be slow."""

    kind: str  # "refuse", "gateway", "timeout", "throttle" (429 with Retry-After 1 s)
    status: int = 503


@dataclass
class Arrival:
    at: float  # true virtual ms
    action_id: str
    status: int
    acted: bool


@dataclass
class Defender:
    """Defender's cancel endpoint with its own rolling windows (true time)."""

    world: World
    windows: Sequence[tuple[int, float]]  # (limit, ms)
    net_ms: tuple[float, float] = (0.0, 30.0)
    faults: dict[int, UpstreamFault] = field(default_factory=dict)  # by arrival index
    states: dict[str, str] = field(default_factory=dict)
    arrivals: list[Arrival] = field(default_factory=list)
    counted: list[float] = field(default_factory=list)

    def handle(self, action_id: str) -> tuple[int, bool]:
        fault = self.faults.get(len(self.arrivals))
        now = self.world.now
        if fault is not None and fault.kind == "refuse":
            return 503, False
        if fault is not None and fault.kind == "throttle":  # a 429 of Defender's own (a CPU quota, say)
            return 429, False
        for limit, ms in self.windows:
            if sum(1 for t in self.counted if t > now - ms) >= limit:
                return 429, False
        self.counted.append(now)
        if self.states.get(action_id, "Pending") != "Pending":
            return 400, False
        self.states[action_id] = "Cancelled"
        return 200, True


class Transport:
    """The HTTP transport of one instance: a connection warmed ahead, a POST that takes network time."""

    def __init__(self, world: World, defender: Defender, rng: random.Random, connect_ms: float = 0.0) -> None:
        self._world = world
        self._defender = defender
        self._rng = rng
        self._connect_ms = connect_ms
        self._connected = False

    def warm(self, url: str) -> None:
        if not self._connected:
            self._world.sleep(self._connect_ms)
            self._connected = True

    def post(
        self, url: str, payload: str, headers: Mapping[str, str], deadline: float
    ) -> tuple[int, bytes, Mapping[str, str]]:
        world, defender = self._world, self._defender
        world.alive()
        if not self._connected:
            raise NotSent("no connection")
        world.sleep(self._rng.uniform(*defender.net_ms))  # on the way
        action_id = url.rsplit("/", 2)[-2]
        fault = defender.faults.get(len(defender.arrivals))
        status, acted = defender.handle(action_id)
        defender.arrivals.append(Arrival(world.now, action_id, status, acted))
        world.sleep(self._rng.uniform(*defender.net_ms))  # on the way back
        if world.monotonic() > deadline:
            raise UpstreamTimeout("virtual: no answer within the budget")
        if fault is not None and fault.kind == "gateway":
            return fault.status, b'{"error": {"code": "BadGateway", "message": "gateway"}}', {}
        if fault is not None and fault.kind == "timeout":
            raise UpstreamTimeout("virtual: the answer was lost")
        if status == 429:
            return 429, b'{"error": {"code": "TooManyRequests", "message": "slow down"}}', {"Retry-After": "1"}
        return status, b'{"id": "%s", "status": "x"}' % action_id.encode(), {}

    def get(self, url: str, headers: Mapping[str, str], deadline: float) -> tuple[int, bytes, Mapping[str, str]]:
        """Defender's record of an action: a cancel that took effect shows, one that never arrived
        does not (what a taken-over key reads before it may send)."""
        world, defender = self._world, self._defender
        world.alive()
        if not self._connected:
            raise NotSent("no connection")
        world.sleep(self._rng.uniform(*defender.net_ms))
        action_id = url.rsplit("/", 1)[-1]
        state = defender.states.get(action_id, "Pending")
        world.sleep(self._rng.uniform(*defender.net_ms))
        if world.monotonic() > deadline:
            raise UpstreamTimeout("virtual: no answer within the budget")
        cancelled = '"2026-01-01T00:00:00Z"' if state == "Cancelled" else "null"
        return 200, b'{"id": "%s", "status": "%s", "cancellationDateTimeUtc": %s}' % (
            action_id.encode(), state.encode(), cancelled.encode()), {}  # fmt: skip


def violations(arrivals: Sequence[float], windows: Sequence[tuple[int, float]]) -> int:
    from localdev.windows import violations as judge

    return judge(arrivals, windows)
