"""An in-memory sliding log store with ETag semantics: for tests and single-process tools."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from shared.ratelimit.rule import Conflict, Snapshot


class MemorySlidingLog:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snapshot = Snapshot((), 0, None)
        self._version = 0
        self.requests = 0

    def read(self) -> Snapshot:
        with self._lock:
            self.requests += 1
            return self._snapshot

    def write(
        self, log: Sequence[int], blocked_until: int, etag: str | None, horizon_ms: int = 0, writers: str = ""
    ) -> str:
        with self._lock:
            self.requests += 1
            if etag != self._snapshot.etag:
                raise Conflict
            self._version += 1
            self._snapshot = Snapshot(
                tuple(log), blocked_until, str(self._version), horizon_ms=horizon_ms, writers=writers
            )
            return str(self._version)

    def lose(self) -> None:
        """The record vanishes (a deleted table, a rebuilt store)."""
        with self._lock:
            self._snapshot = Snapshot((), 0, None)
