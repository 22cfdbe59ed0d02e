"""An HTTP proxy on loopback that forwards to one upstream and records every request it passes.

Put in front of Azurite's table port, it counts the Table requests the app really makes. It can
also slow the writes to one table, as a throttled storage account plus an SDK retry would: half of
the delay before the write reaches the store, half before its reply comes back.
"""

from __future__ import annotations

import http.client
import threading
import time

from localdev.loopback import LoopbackServer, LoopbackService, Request, Response

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "proxy-connection"}


class CountingProxy(LoopbackService):
    WRITES = frozenset({"PUT", "POST", "MERGE", "PATCH", "DELETE"})

    def __init__(
        self, upstream_host: str, upstream_port: int, port: int = 0, write_delay: float = 0.0, slow_path: str = ""
    ) -> None:
        self._upstream = (upstream_host, upstream_port)
        self.write_delay = write_delay  # seconds added to each write whose path holds `slow_path`
        self._slow_path = slow_path
        self._local = threading.local()
        self._lock = threading.Lock()
        self.requests: list[tuple[float, str, str]] = []  # (time.time(), method, path)
        self.applied: list[tuple[float, str]] = []  # (time.time(), path) of each write answered 2xx
        self._server = LoopbackServer(self.handle, port)

    def count_since(self, since: float, path_contains: str = "") -> int:
        with self._lock:
            return sum(1 for at, _, path in self.requests if at >= since and path_contains in path)

    def writes_applied_since(self, since: float, path_contains: str = "") -> int:
        """Writes the store accepted (2xx): for the limiter's table, one log entry each."""
        with self._lock:
            return sum(1 for at, path in self.applied if at >= since and path_contains in path)

    def handle(self, request: Request) -> Response:
        with self._lock:
            self.requests.append((time.time(), request.method, request.path))
        slow = self.write_delay if request.method in self.WRITES and self._slow_path in request.path else 0.0
        time.sleep(slow / 2)  # a server-side queue: the write is applied late...
        answer = self._forward(request)
        if request.method in self.WRITES and 200 <= answer.status < 300:
            with self._lock:
                self.applied.append((time.time(), request.path))
        time.sleep(slow / 2)  # ...and its reply comes back late
        return answer

    def _forward(self, request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        for reused in (True, False):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                reused = False
                conn = self._local.conn = http.client.HTTPConnection(*self._upstream, timeout=30)
            try:
                conn.request(request.method, request.raw_target, body=request.body or None, headers=headers)
                upstream = conn.getresponse()
                raw = upstream.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if reused:  # the upstream closed an idle keep-alive connection: once more, fresh
                    continue
                return Response(502, {"error": "proxy: upstream unreachable"})
            passed = {k: v for k, v in upstream.getheaders() if k.lower() not in HOP_BY_HOP}
            return Response(upstream.status, headers=passed, raw=raw)
        return Response(502, {"error": "proxy: upstream unreachable"})
