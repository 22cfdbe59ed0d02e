"""The admission rule against a plain reference model of rolling windows (property-based)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from localdev.windows import max_allowed, violations
from shared.config.settings import RateWindow
from shared.ratelimit.rule import Window, earliest_slot, record, window_stats, windows_with_margin

windows_st = st.lists(st.builds(Window, limit=st.integers(1, 6), ms=st.integers(1, 400)), min_size=1, max_size=3)
arrivals_st = st.lists(st.integers(0, 2000), min_size=1, max_size=60).map(sorted)


def reference_fits(schedule: list[int], t: int, windows: list[Window]) -> bool:
    """Plain model: with t added, every half-open interval [x, x + ms) holds at most `limit` sends."""
    sends = [*schedule, t]
    return all(sum(1 for s in sends if x <= s < x + w.ms) <= w.limit for w in windows for x in sends)


def schedule_all(arrivals: list[int], windows: list[Window], blocked_until: int = 0, horizon: int | None = None):
    log: list[int] = []
    slots = []
    for arrival in arrivals:
        slot = earliest_slot(log, windows, arrival, blocked_until)
        slots.append(slot)
        log = record(log, slot, horizon or max(w.ms for w in windows))
    return slots


@settings(max_examples=300, deadline=None)
@given(windows=windows_st, arrivals=arrivals_st)
def test_no_rolling_window_ever_holds_more_than_its_limit(windows: list[Window], arrivals: list[int]) -> None:
    slots = schedule_all(arrivals, windows)

    for w in windows:
        for x in slots:
            assert sum(1 for s in slots if x <= s < x + w.ms) <= w.limit


@settings(max_examples=300, deadline=None)
@given(windows=windows_st, arrivals=arrivals_st)
def test_each_slot_is_the_earliest_the_reference_allows(windows: list[Window], arrivals: list[int]) -> None:
    schedule: list[int] = []
    for arrival in arrivals:
        slot = earliest_slot(sorted(schedule), windows, arrival)
        assert slot >= arrival
        assert reference_fits(schedule, slot, windows)
        floor = max([arrival, *schedule])
        if slot > floor:  # waiting was necessary: one ms earlier breaks a window
            assert not reference_fits(schedule, slot - 1, windows)
        schedule.append(slot)


@settings(max_examples=200, deadline=None)
@given(windows=windows_st, arrivals=arrivals_st)
def test_pruning_the_log_changes_no_decision(windows: list[Window], arrivals: list[int]) -> None:
    pruned = schedule_all(arrivals, windows)
    unpruned = schedule_all(arrivals, windows, horizon=10**9)

    assert pruned == unpruned


@settings(max_examples=200, deadline=None)
@given(windows=windows_st, arrivals=arrivals_st, blocked=st.integers(0, 3000))
def test_blocked_until_holds_every_send_back(windows: list[Window], arrivals: list[int], blocked: int) -> None:
    slots = schedule_all(arrivals, windows, blocked_until=blocked)

    assert all(s >= blocked for s in slots)


@settings(max_examples=150, deadline=None)
@given(
    limits=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 5)), min_size=1, max_size=3),
    margin=st.integers(0, 500),
    data=st.data(),
)
def test_margin_absorbs_sends_that_arrive_late(limits: list[tuple[int, int]], margin: int, data: st.DataObject) -> None:
    windows = windows_with_margin([RateWindow(c, s) for c, s in limits], margin)
    slots = schedule_all([0] * 40, list(windows))
    delays = data.draw(st.lists(st.integers(0, margin), min_size=len(slots), max_size=len(slots)))

    # Judged on the plain windows (no margin), sends that each reach the upstream up to `margin`
    # ms after their logged slot still never overflow a window.
    plain = [(c, s * 1000.0) for c, s in limits]
    assert violations([float(s + d) for s, d in zip(slots, delays, strict=True)], plain) == 0


def test_window_stats_count_reservations_and_name_the_next_free_slot() -> None:
    windows = [Window(2, 1000), Window(3, 5000)]
    log = [0, 400, 1000]

    stats = window_stats(log, windows, [1.0, 5.0], now=1100)

    assert [(s.used, s.next_free_ms) for s in stats] == [(2, 1400), (3, 5000)]
    # Defender's Retry-After hold and a reservation ahead of now both push the next free slot back.
    held = window_stats(log, windows, [1.0, 5.0], now=1100, blocked_until=9000)
    ahead = window_stats([0, 400, 1500], [Window(5, 1000)], [1.0], now=1100)
    assert [s.next_free_ms for s in held] == [9000, 9000] and ahead[0].next_free_ms == 1500


def test_max_allowed_matches_the_greedy_schedule() -> None:
    # 10/2 and 30/8 over 20 s: bursts of ten at 0, 2, 4, then 8, 10, 12, then 16, 18, 20.
    assert max_allowed(20.0, [(10, 2.0), (30, 8.0)]) == 90
