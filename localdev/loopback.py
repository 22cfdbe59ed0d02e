"""A small threaded JSON HTTP server on a loopback address, the base of the local stack's servers."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

LOOPBACK = "127.0.0.1"


class Request:
    def __init__(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        url = urlsplit(handler.path)
        self.method = handler.command
        self.raw_target = handler.path
        self.path = url.path
        self.query = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.headers = handler.headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


class Response:
    def __init__(self, status: int, body: Any = None, headers: dict[str, str] | None = None, raw: bytes | None = None):
        self.status = status
        self.raw = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        self.headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}


Handler = Callable[[Request], Response | None]


class LoopbackServer:
    """Serves `handle(request)` on 127.0.0.1:`port` (0 = a free port) in a daemon thread; over TLS
    when given a server context (the handshake runs in the request's thread, not the accept loop)."""

    def __init__(self, handle: Handler, port: int = 0, host: str = LOOPBACK, tls: ssl.SSLContext | None = None) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler_class(handle))
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self._scheme = "https" if tls is not None else "http"
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"{self._scheme}://{LOOPBACK}:{self.port}"

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self.serve_forever, name=f"loopback-{self.port}", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class LoopbackService:
    """A server of the local stack (simulator, identity and Entra endpoints, proxy, host): it serves
    its `handle` on one LoopbackServer, whose lifecycle this delegates to."""

    _server: LoopbackServer

    @property
    def base_url(self) -> str:
        return self._server.base_url

    @property
    def port(self) -> int:
        return self._server.port

    def start(self) -> Self:
        self._server.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        self._server.stop()


def _handler_class(handle: Handler) -> type[BaseHTTPRequestHandler]:
    class _Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms stall

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            response = handle(Request(self, body))
            if response is None:  # the handler asked to drop the connection without answering
                self.close_connection = True
                return
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.raw)))
            self.end_headers()
            if self.command != "HEAD":  # a HEAD answer carries the headers of a GET, no body
                self.wfile.write(response.raw)

        # Every method reaches the handler, which answers (404, 405, ...) as the real server would.
        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_QUERY = _serve

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
            pass  # quiet: the servers keep their own records

    return _Handler
