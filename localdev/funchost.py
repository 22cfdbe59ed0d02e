"""A small stand-in for the Functions host, for machines without Functions Core Tools.

Serves the app's function folders unchanged: HTTP triggers on the routes, methods and authLevel of
each function.json (under host.json's routePrefix), function keys checked from the `x-functions-key`
header or the `code` query parameter; queue triggers polled from Azurite by localdev.queuehost with
the host's semantics, backing off to host.json's maxPollingInterval when idle.

Not emulated: the admin API and master key, anonymous/admin key scopes beyond "a listed key",
HTTP output bindings other than `$return`, timers and other trigger types, CORS, and the worker's
separate process (the functions run in this process, one thread per HTTP request).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote

import azure.functions as func

from localdev.loopback import LoopbackServer, LoopbackService, Request, Response
from localdev.queuehost import QueueFunction, timespan_seconds

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpFunction:
    name: str
    pattern: re.Pattern[str]
    methods: frozenset[str]
    auth_level: str
    param: str
    main: Callable[..., Any]


def _route_pattern(prefix: str, route: str) -> re.Pattern[str]:
    parts = [p for p in f"{prefix}/{route}".split("/") if p]
    regex = "/".join(
        f"(?P<{m.group(1)}>[^/]*)" if (m := re.fullmatch(r"\{(\w+)(?::[^}]*)?\}", part)) else re.escape(part)
        for part in parts
    )
    return re.compile(f"/{regex}/?", re.IGNORECASE)


class FunctionHost(LoopbackService):
    def __init__(self, root: Path, connection_string: str, keys: set[str], port: int = 7071) -> None:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        host = json.loads((root / "host.json").read_text())
        prefix = host.get("extensions", {}).get("http", {}).get("routePrefix", "api")
        queues = host.get("extensions", {}).get("queues", {})
        self.max_polling = timespan_seconds(queues.get("maxPollingInterval", "00:01:00"))
        self.keys = keys
        self.http: list[HttpFunction] = []
        self.queue: list[QueueFunction] = []
        for folder in sorted(p.parent for p in root.glob("*/function.json")):
            bindings = json.loads((folder / "function.json").read_text())["bindings"]
            trigger = next(b for b in bindings if b["direction"] == "in" and b["type"].endswith("Trigger"))
            if trigger["type"] == "httpTrigger":
                module = importlib.import_module(folder.name)
                self.http.append(
                    HttpFunction(
                        folder.name,
                        _route_pattern(prefix, trigger.get("route", folder.name)),
                        frozenset(m.upper() for m in trigger.get("methods", ["get", "post"])),
                        trigger.get("authLevel", "function"),
                        trigger["name"],
                        module.main,
                    )
                )
            elif trigger["type"] == "queueTrigger":
                self.queue.append(QueueFunction(folder, connection_string))
        self._server = LoopbackServer(self.handle, port)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Self:
        super().start()
        for function in self.queue:
            thread = threading.Thread(target=self._poll, args=(function,), name=f"queue-{function.queue_name}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        super().stop()
        for thread in self._threads:
            thread.join(timeout=30)

    def _poll(self, function: QueueFunction) -> None:
        wait = 0.1
        while not self._stop.is_set():
            try:
                busy = function.pump() > 0
            except Exception as exc:  # noqa: BLE001 - storage down: keep polling, as the host does
                logger.warning("polling %s failed: %r", function.queue_name, exc)
                busy = False
            wait = 0.1 if busy or function.in_flight else min(self.max_polling, wait * 2)
            if not busy:
                self._stop.wait(wait)
        function.close()

    def handle(self, request: Request) -> Response:
        for function in self.http:
            match = function.pattern.fullmatch(request.path)
            if match is None:
                continue
            if request.method not in function.methods:
                return Response(405, {"error": "method not allowed"}, {"Allow": ", ".join(sorted(function.methods))})
            if function.auth_level != "anonymous" and not self._authorized(request):
                return Response(401, raw=b"", headers={"WWW-Authenticate": "functions-key"})
            return self._invoke(function, request, {k: unquote(v) for k, v in match.groupdict().items()})
        return Response(404, raw=b"")

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("x-functions-key") or request.query.get("code")
        return given is not None and given in self.keys

    def _invoke(self, function: HttpFunction, request: Request, route_params: dict[str, str]) -> Response:
        http_request = func.HttpRequest(
            method=request.method,
            url=f"http://localhost:{self.port}{request.raw_target}",
            headers=dict(request.headers.items()),
            params=request.query,
            route_params=route_params,
            body=request.body,
        )
        try:
            response: func.HttpResponse = function.main(**{function.param: http_request})
        except Exception:  # the host answers 500 for a function that raises
            logger.exception("%s raised", function.name)
            return Response(500, raw=b"")
        headers = dict(response.headers.items())
        if response.mimetype:
            headers["Content-Type"] = response.mimetype + (f"; charset={response.charset}" if response.charset else "")
        return Response(response.status_code, raw=response.get_body(), headers=headers)
