"""A naive limiter to compare against: a fixed-window counter per window, in the same table.

It is what many teams write first. It keeps each calendar window under its limit, but lets up to
twice the limit through across a window boundary, which Defender's rolling windows count as 429s.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableClient, UpdateMode

from shared.config.settings import RateWindow, Settings
from shared.errors import QuotaExceeded
from shared.ratelimit.limiter import Permit
from shared.storage.clients import table_client


class FixedWindowLimiter:
    def __init__(self, table: TableClient, key: str, windows: tuple[RateWindow, ...]) -> None:
        self._table = table
        self._key = key
        self._windows = windows

    @classmethod
    def from_settings(cls, settings: Settings) -> FixedWindowLimiter:
        table = table_client(settings.storage, settings.rate_limit_table)
        return cls(table, settings.rate_limit_key + "-fixed", settings.rate_limits)

    def acquire(self, max_wait: float = 0.0, spent: int = 0, share: float = 1.0) -> Permit:
        deadline = time.time() + max_wait
        while True:
            wait = self._try_take()
            if wait == 0:
                return Permit(int(time.time() * 1000), spent + 1)
            if time.time() + wait > deadline:
                raise QuotaExceeded("fixed window full", wait_seconds=wait)
            time.sleep(wait)

    def on_time(self, permit: Permit) -> bool:
        return True  # a counter has no notion of a send's time

    def throttled(self, retry_after: int) -> None:
        """A fixed-window counter knows nothing of Defender's verdict."""

    def _try_take(self) -> float:
        """0 when a slot was taken in every window, else seconds until the fullest window rolls over."""
        now = time.time()
        for window in self._windows:
            start = math.floor(now / window.seconds) * window.seconds
            if self._count(window, start) >= window.limit:
                return start + window.seconds - now
        for window in self._windows:
            start = math.floor(now / window.seconds) * window.seconds
            self._increment(window, start)
        return 0.0

    def _row(self, window: RateWindow, start: float) -> str:
        return f"fixed-{window.seconds:g}-{int(start * 1000)}"

    def _count(self, window: RateWindow, start: float) -> int:
        try:
            return int(self._table.get_entity(self._key, self._row(window, start))["Count"])
        except ResourceNotFoundError:
            return 0

    def _increment(self, window: RateWindow, start: float) -> None:
        row = self._row(window, start)
        while True:
            try:
                entity: Any = self._table.get_entity(self._key, row)
            except ResourceNotFoundError:
                try:
                    self._table.create_entity({"PartitionKey": self._key, "RowKey": row, "Count": 1})
                    return
                except ResourceExistsError:
                    continue
            entity["Count"] = int(entity["Count"]) + 1
            try:
                self._table.update_entity(
                    entity,
                    UpdateMode.REPLACE,
                    etag=entity.metadata["etag"],
                    match_condition=MatchConditions.IfNotModified,
                )
                return
            except ResourceModifiedError:
                time.sleep(random.uniform(0, 0.01))
