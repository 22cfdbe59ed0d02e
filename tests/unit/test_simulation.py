"""The two promises, searched for counter-examples in a deterministic virtual world (tests/support/virtual.py).

1. Defender never sees a call too many: several instances with skewed clocks saturate the quota
   while the state store is slow, fails, loses replies and loses the whole record, identity tokens
   come late and sleeps end late. Judged at Defender, on true time: no window over its limit, no
   429, at most two log entries per admission, every send within its slot's slip, and no request
   that timed out only because its wait for a slot ate Defender's budget. When Defender says 429
   of its own, no instance reserves a slot inside the hold it recorded.
2. A cancel asked for once reaches Defender at most once and always ends in an answer: keyed
   requests retried by their callers and redelivered after instance crashes, while Defender's side
   refuses, or acts and loses the answer (a gateway's 502/504, a timeout).

Each example is one schedule: every latency, fault and crash is drawn by hypothesis, and the run
is replayed exactly from the draw. CI replays a fixed sample (tests/conftest.py), developers'
runs explore new ones.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.cancel.commands import CancelCommand
from shared.cancel.service import CancelService, settles
from shared.config.settings import RateWindow
from shared.defender.client import DefenderClient
from shared.defender.retry import RetryPolicy
from shared.errors import AppError, OutcomeUnknown, QuotaExceeded
from shared.formats import Api
from shared.idempotency.table import IdempotencyStore
from shared.ratelimit.limiter import Permit, RateLimiter
from shared.storage.audit import AuditLog
from tests.support.virtual import (
    Defender,
    LogStore,
    StoreFaults,
    Table,
    Tokens,
    Transport,
    UpstreamFault,
    World,
    violations,
)

WINDOWS = ((10, 2000.0), (30, 8000.0))  # (limit, ms): time-compressed like the real-process tests
MARGIN_MS = 200  # slip 50 ms; skew (<= 40) + network (<= 30 each way... counted once) stay within 150
# The oracles' bounds, as the limiter's docstring states them, not imported from the code they judge:
SLIP_MS = 50  # invariant 1: a send leaves at most a quarter of the margin after its logged slot
ENTRIES_PER_ADMISSION = 2  # invariant 2: an admission writes at most two log entries, a given-up slot included
RUN_MS = 20_000.0
SCHEDULES = 1000  # per property (a third of it for lost records); each a 20 s run of 1 to 4 instances


@dataclass
class Instance:
    """One function app instance: its own clock, limiter, token cache and connection pool."""

    world: World
    limiter: RateLimiter
    service: CancelService
    tokens: Tokens
    skew_ms: float = 0.0
    max_admission_entries: int = 0
    max_late_ms: float = 0.0  # how late after its slot a send was let go (its own clock)
    stale_permits: int = 0  # permits the limiter handed out already past their slot's slip
    oversleeps: bool = False  # its sleeps may end late (then on_time, not acquire, must catch a late permit)
    outcomes: list[str] = field(default_factory=list)


class CountingGate:
    """The limiter as the service sees it, counting the log entries each admission applied (the
    store's count, not the limiter's own word)."""

    def __init__(self, limiter: RateLimiter, store: LogStore, instance: Instance) -> None:
        self._limiter = limiter
        self._store = store
        self._instance = instance
        self._start = 0
        self._lost = 0

    def acquire(self, max_wait: float = 0.0, spent: int = 0, share: float = 1.0) -> Permit:
        from greenlet import getcurrent

        me = getcurrent()
        if spent == 0:
            self._start, self._lost = self._store.entries_by[me], self._store.lost
        try:
            permit = self._limiter.acquire(max_wait, spent, share)
            if self._now() > permit.slot + SLIP_MS and not self._instance.oversleeps:  # late only by its write
                self._instance.stale_permits += 1
            return permit
        finally:
            # An entry written into a record that then vanished burns nothing: invariant 2 counts the
            # entries of admissions the record kept.
            if self._store.lost == self._lost:
                used = self._store.entries_by[me] - self._start
                self._instance.max_admission_entries = max(self._instance.max_admission_entries, used)

    def on_time(self, permit: Permit) -> bool:
        going = self._limiter.on_time(permit)
        if going:
            self._instance.max_late_ms = max(self._instance.max_late_ms, self._now() - permit.slot)
        return going

    def _now(self) -> int:
        return int(self._instance.world.now + self._instance.skew_ms)  # as the instance's epoch-ms clock reads

    def throttled(self, retry_after: int) -> None:
        self._limiter.throttled(retry_after)


def build(
    world: World,
    store: LogStore,
    table: Table,
    defender: Defender,
    rng: random.Random,
    skew_ms: float,
    cold_ms: float,
    budget: float,
    lease: float = 60.0,
    refresh_at: float | None = None,
    oversleep: float = 0.0,
) -> Instance:
    windows = [RateWindow(limit, ms / 1000) for limit, ms in WINDOWS]

    def sleep(seconds: float) -> None:
        """A loaded machine's scheduler: now and then a sleep ends late (60 to 300 ms)."""
        late = rng.uniform(60, 300) if rng.random() < oversleep else 0.0
        world.sleep(seconds * 1000 + late)

    limiter = RateLimiter(store, windows, MARGIN_MS, clock=world.epoch_ms(skew_ms), sleep=sleep)
    tokens = Tokens(world, cold_ms, refresh_at)
    instance = Instance(world, limiter, cast(Any, None), tokens, skew_ms, oversleeps=oversleep > 0)
    gate = CountingGate(limiter, store, instance)
    client = DefenderClient(
        "http://127.0.0.1:1",
        cast(Any, tokens),
        budget,
        quotas={Api.CANCEL: gate},
        retry=RetryPolicy(),
        transport=Transport(world, defender, rng, connect_ms=rng.uniform(0, 300)),
        monotonic=world.monotonic,
        sleep=world.sleep_seconds,
    )
    answers = IdempotencyStore(
        cast(Any, table), lease_seconds=lease, clock=lambda: (world.now + skew_ms) / 1000, sleep=world.sleep_seconds
    )
    audit = AuditLog(cast(Any, table))
    instance.service = CancelService(client, audit, answers=answers, budget_seconds=budget, monotonic=world.monotonic)
    return instance


def command(defender: Defender, key: str | None = None) -> CancelCommand:
    action_id = str(uuid.UUID(int=len(defender.states) + 1))
    defender.states[action_id] = "Pending"
    return CancelCommand(action_id, "sim", "corr", "queue", idempotency_key=key)


# --- promise 1: the quota -------------------------------------------------------------------------
store_faults = st.builds(
    StoreFaults,
    latency=st.tuples(st.floats(0.5, 5), st.floats(5, 60)),
    slow_latency=st.sampled_from([0.0, 300.0, 600.0, 900.0]),
    slow_spells=st.lists(
        st.tuples(st.floats(0, RUN_MS), st.floats(500, 6000)).map(lambda s: (s[0], s[0] + s[1])), max_size=2
    ),
    fail_before=st.sampled_from([0.0, 0.0, 0.02, 0.1]),
    fail_after=st.sampled_from([0.0, 0.0, 0.02, 0.1]),
    lost_reply_412=st.sampled_from([0.0, 0.0, 0.02, 0.1]),
    losses=st.just(()),
)


@st.composite
def quota_schedules(draw: st.DrawFn, fewest: int = 2, most: int = 4) -> dict[str, Any]:
    count = draw(st.integers(fewest, most))
    return {
        "faults": draw(store_faults),
        "skews": draw(st.lists(st.floats(-20, 20), min_size=count, max_size=count)),
        "cold": draw(st.lists(st.sampled_from([0.0, 50.0, 800.0, 2500.0]), min_size=count, max_size=count)),
        "starts": draw(st.lists(st.floats(0, RUN_MS / 2), min_size=count, max_size=count)),
        "refresh": draw(st.lists(st.none() | st.floats(0, RUN_MS), min_size=count, max_size=count)),
        "max_wait": draw(st.sampled_from([0.0, 5.0])),
        "budget": draw(st.sampled_from([1.0, 5.0])),
        "oversleep": draw(st.sampled_from([0.0, 0.0, 0.05, 0.2])),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def run_quota(schedule: dict[str, Any]) -> tuple[Defender, list[Instance], LogStore]:
    rng = random.Random(schedule["seed"])
    random.seed(schedule["seed"])  # the limiter's jitter and the retry back-off: the run replays exactly
    world = World()
    store = LogStore(world, schedule["faults"], rng)
    table = Table(world, rng)
    defender = Defender(world, WINDOWS, faults=schedule.get("upstream", {}))
    instances = []
    for skew, cold, start, refresh in zip(
        schedule["skews"], schedule["cold"], schedule["starts"], schedule["refresh"], strict=True
    ):
        instance = build(world, store, table, defender, rng, skew, cold, schedule["budget"], refresh_at=refresh,
                         oversleep=schedule.get("oversleep", 0.0))  # fmt: skip
        instances.append(instance)
        world.spawn(partial(saturate, instance, defender, schedule["max_wait"]), at=start)
    world.run(RUN_MS)
    return defender, instances, store


def saturate(instance: Instance, defender: Defender, max_wait: float) -> None:
    """Call as fast as the quota allows: a refused caller comes back when told to."""
    world = instance.world
    while world.now < RUN_MS:
        try:
            result = instance.service.cancel(command(defender), max_wait)
            instance.outcomes.append(str(result.status))
        except QuotaExceeded as exc:
            instance.outcomes.append("quota")
            world.sleep(exc.wait_seconds * 1000)
        except AppError as exc:
            instance.outcomes.append(type(exc).__name__)
            world.sleep((exc.retry_after or 1) * 1000)


@settings(max_examples=SCHEDULES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=quota_schedules())
def test_no_fault_schedule_puts_a_call_too_many_at_defender(schedule: dict[str, Any]) -> None:
    defender, instances, _ = run_quota(schedule)

    arrivals = [a.at for a in defender.arrivals]
    assert violations(arrivals, WINDOWS) == 0
    assert not any(a.status == 429 for a in defender.arrivals)
    assert max(i.max_admission_entries for i in instances) <= ENTRIES_PER_ADMISSION
    assert max(i.max_late_ms for i in instances) <= SLIP_MS and sum(i.stale_permits for i in instances) == 0
    # Defender always answers within the budget here: a timeout means the slot wait ate it.
    outcomes = {o for i in instances for o in i.outcomes}
    assert not outcomes & {"OutcomeUnknown", "UpstreamTimeout"}, outcomes


@st.composite
def throttle_schedules(draw: st.DrawFn) -> dict[str, Any]:
    """Defender answers some arrivals 429 of its own (a CPU quota, say; Retry-After 1 s)."""
    schedule = draw(quota_schedules())
    at = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3, unique=True))
    schedule["upstream"] = {index: UpstreamFault("throttle") for index in at}
    return schedule


@settings(max_examples=SCHEDULES // 4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=throttle_schedules())
def test_a_defender_429_holds_every_instance_for_its_retry_after(schedule: dict[str, Any]) -> None:
    """Once an instance has recorded Defender's Retry-After in the shared record, no instance
    reserves a slot inside that hold: judged by the store on the record's own values (every writer
    read the hold it overwrites), so no clock needs converting."""
    defender, _, store = run_quota(schedule)

    assert any(a.status == 429 for a in defender.arrivals)
    assert store.inside_holds == 0
    assert violations([a.at for a in defender.arrivals if a.status != 429], WINDOWS) == 0


@st.composite
def loss_schedules(draw: st.DrawFn) -> dict[str, Any]:
    schedule = draw(quota_schedules(fewest=1, most=1))
    schedule["faults"].losses = draw(st.lists(st.floats(0, RUN_MS), min_size=1, max_size=4))
    return schedule


@settings(max_examples=SCHEDULES // 3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=loss_schedules())
def test_a_lost_record_is_rebuilt_from_what_the_instance_knows(schedule: dict[str, Any]) -> None:
    """The record (or its table) vanishes, any number of times, while a window is full. The instance
    that holds the log rebuilds it; it never admits a window's worth again. (With several instances
    a send known only to one that has not touched the record since can still be missed:
    docs/design/rate-limiter.md says so.)"""
    defender, instances, _ = run_quota(schedule)

    assert violations([a.at for a in defender.arrivals], WINDOWS) == 0
    assert max(i.max_admission_entries for i in instances) <= ENTRIES_PER_ADMISSION


def test_the_simulation_saturates_the_quota() -> None:
    """The property above is worth something only if its runs press on the quota: a calm schedule
    uses nearly all of what the windows allow."""
    from localdev.windows import max_allowed

    schedule = {"faults": StoreFaults(), "skews": [0.0, 10.0, -10.0], "cold": [0.0, 0.0, 800.0],
                "starts": [0.0, 0.0, 0.0], "refresh": [None, None, None], "max_wait": 5.0, "budget": 5.0,
                "seed": 1}  # fmt: skip
    defender, _, _ = run_quota(schedule)

    allowed = max_allowed(RUN_MS / 1000, [(limit, (ms + MARGIN_MS) / 1000) for limit, ms in WINDOWS])
    assert len(defender.arrivals) >= 0.95 * allowed


# --- promise 2: at most once, always an answer -------------------------------------------------------
LEASE_S = 8.0
BUDGET_S = 2.0
REDELIVERY_MS = 3000.0  # a crashed instance's message comes back after its visibility timeout


@dataclass
class Work:
    """Keyed commands and what became of them; the shared "queue" of the at-most-once runs."""

    commands: list[CancelCommand]
    pending: list[tuple[float, int]] = field(default_factory=list)  # (visible at, index)
    answers: dict[int, list[str]] = field(default_factory=dict)
    held: dict[int, int] = field(default_factory=dict)  # index -> instance number holding it

    def take(self, now: float, instance: int) -> int | None:
        self.pending.sort()
        for position, (visible, index) in enumerate(self.pending):
            if visible <= now:
                del self.pending[position]
                self.held[index] = instance
                return index
        return None

    def put_back(self, index: int, at: float) -> None:
        self.held.pop(index, None)
        self.pending.append((at, index))


@st.composite
def once_schedules(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(2, 3))
    kinds = st.sampled_from(["refuse", "gateway", "timeout"])
    statuses = st.sampled_from([500, 502, 504])
    faults = draw(st.dictionaries(st.integers(0, 40), st.builds(UpstreamFault, kinds, statuses), max_size=12))
    return {
        "commands": draw(st.integers(5, 25)),
        "duplicates": draw(st.integers(0, 5)),  # the same key sent again by its caller
        "faults": faults,
        "crashes": draw(st.lists(st.none() | st.floats(0, 15_000), min_size=count, max_size=count)),
        "store": draw(store_faults.map(lambda f: StoreFaults(latency=f.latency, fail_before=f.fail_before))),
        "seed": draw(st.integers(0, 2**32 - 1)),
    }


def run_once(schedule: dict[str, Any]) -> tuple[Defender, Work]:
    rng = random.Random(schedule["seed"])
    random.seed(schedule["seed"])
    world = World()
    store = LogStore(world, schedule["store"], rng)
    table = Table(world, rng)
    defender = Defender(world, ((1000, 2000.0),), faults=schedule["faults"])
    commands = [command(defender, f"queue|message|m{i}") for i in range(schedule["commands"])]
    work = Work(commands + commands[: schedule["duplicates"]])
    work.pending = [(rng.uniform(0, 2000), i) for i in range(len(work.commands))]
    for number, crash_at in enumerate(schedule["crashes"]):
        instance = build(world, store, table, defender, rng, rng.uniform(-20, 20), 100.0, BUDGET_S, LEASE_S)
        world.spawn(partial(drain, instance, number, work), crash_at=crash_at)
        if crash_at is not None:  # its messages come back later; a fresh instance takes its place
            world.spawn(partial(redeliver, world, work, number), at=crash_at + REDELIVERY_MS)
            fresh = build(world, store, table, defender, rng, 0.0, 500.0, BUDGET_S, LEASE_S)
            world.spawn(partial(drain, fresh, number + 10, work), at=crash_at + 1000)
    world.run(120_000.0)
    return defender, work


def redeliver(world: World, work: Work, crashed: int) -> None:
    for index, holder in list(work.held.items()):
        if holder == crashed:
            work.put_back(index, world.now)


def drain(instance: Instance, number: int, work: Work) -> None:
    """A queue worker: answers are kept; what may be retried goes back with a delay."""
    world = instance.world
    while len(work.answers) < len(work.commands) and world.now < 110_000:
        index = work.take(world.now, number)
        if index is None:
            world.sleep(200)
            continue
        try:
            result = instance.service.cancel(work.commands[index], max_wait=5.0)
        except OutcomeUnknown as exc:
            work.answers.setdefault(index, []).append(f"unknown {exc.status}")
            work.held.pop(index, None)
            continue
        except AppError as exc:
            work.put_back(index, world.now + (exc.retry_after or 1) * 1000)
            continue
        if settles(result.status):
            work.answers.setdefault(index, []).append(str(result.status))
            work.held.pop(index, None)
        else:
            work.put_back(index, world.now + 1000)


@settings(max_examples=SCHEDULES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schedule=once_schedules())
def test_no_fault_schedule_sends_a_cancel_twice_or_loses_one(schedule: dict[str, Any]) -> None:
    defender, work = run_once(schedule)

    sends: dict[str, int] = {}
    for arrival in defender.arrivals:
        if arrival.status != 503:  # refused before acting: the one send that may be repeated
            sends[arrival.action_id] = sends.get(arrival.action_id, 0) + 1
    assert max(sends.values(), default=0) <= 1, sends  # at most once per key (one key per action)
    assert not any(a.status == 400 for a in defender.arrivals)  # never "already cancelled"
    assert set(work.answers) == set(range(len(work.commands)))  # every request ended in an answer


def test_a_send_never_starts_once_its_claim_could_have_lapsed() -> None:
    """A holder whose token comes so late that Defender's budget no longer fits in its lease does
    not send: another instance may already have taken the key over."""
    world = World()
    rng = random.Random(3)
    defender = Defender(world, ((1000, 2000.0),))
    table = Table(world, rng)
    instance = build(world, LogStore(world, StoreFaults(), rng), table, defender, rng, 0.0, 0.0, BUDGET_S, LEASE_S)
    instance.tokens = Tokens(world, (LEASE_S - BUDGET_S + 0.5) * 1000)
    instance.service._defender._tokens = cast(Any, instance.tokens)
    late = command(defender, "http|function-key|late")
    outcomes: list[str] = []

    def caller() -> None:
        for _ in range(2):  # the caller retries with the same key; the token is cached by then
            try:
                outcomes.append(str(instance.service.cancel(late).status))
            except AppError as exc:
                outcomes.append(type(exc).__name__)

    world.spawn(caller)
    world.run(60_000.0)

    assert outcomes == ["StateStoreUnavailable", "200"]
    assert len(defender.arrivals) == 1


@pytest.mark.parametrize("insert_ms, taker_skew_ms", [(3500.0, 0.0), (0.0, 2500.0)])
def test_a_live_holder_is_never_taken_over_by_a_slow_insert_or_a_clock_ahead(
    insert_ms: float, taker_skew_ms: float
) -> None:
    """Lease 8 s, budget 2 s. The holder's claim insert is applied at once but answered 3.5 s later
    (or the taker's clock runs 2.5 s ahead), and its token comes 5.8 s after the claim returned.
    With the fence counted from when the claim returned, or the lease judged on the taker's clock, a
    taker read "pending" and sent while the holder's send was on its way (200, then 400, for one
    key). Judged on the store's clock, with the lease counted from before the insert, one send."""
    world = World()
    rng = random.Random(5)
    defender = Defender(world, ((1000, 2000.0),))
    table = Table(world, rng)
    store = LogStore(world, StoreFaults(), rng)
    holder = build(world, store, table, defender, rng, 0.0, 0.0, BUDGET_S, LEASE_S)
    taker = build(world, store, table, defender, rng, taker_skew_ms, 0.0, BUDGET_S, LEASE_S)
    holder.tokens = Tokens(world, 5800.0)  # its send starts 5.8 s after the claim returned
    holder.service._defender._transport = Transport(world, defender, rng)  # connected at once
    holder.service._defender._tokens = cast(Any, holder.tokens)
    keyed = command(defender, "http|function-key|slow-insert")
    table.slow_writes[IdempotencyStore.partition(keyed.idempotency_key or "")] = insert_ms
    outcomes: list[str] = []

    def ask(instance: Instance) -> None:
        try:
            outcomes.append(str(instance.service.cancel(keyed).status))
        except AppError as exc:
            outcomes.append(type(exc).__name__)

    world.spawn(partial(ask, holder))
    for at in range(5000, 12000, 250):  # the taker keeps asking, as a retrying caller would
        world.spawn(partial(ask, taker), at=float(at))
    world.run(30_000.0)

    sent = [a for a in defender.arrivals if a.action_id == keyed.action_id]
    assert len(sent) <= 1 and not any(a.status == 400 for a in sent), (sent, outcomes)
