"""A scriptable loopback HTTP/1.1 server for ingest tests: routes, sequences, counters.

Started on 127.0.0.1:0 by the test that needs it and stopped after. Each
route answers with a `Reply` (or a list of them: the n-th hit gets the n-th,
the last one repeats), so tests can script "503, 503, then 200" or
"429 with Retry-After, then 200". The server counts hits per path, TCP
connections, and the highest number of requests in flight at once.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = "application/octet-stream"
    delay: float = 0.0  # before the status line
    chunked: bool = False  # no Content-Length, chunked transfer encoding
    trickle: float = 0.0  # seconds between 1-byte writes of the body
    hang_up: bool = False  # close the connection without answering
    hold: float = 0.0  # keep the request in flight this long after the headers (concurrency)
    raw_trickle: bytes = b""  # send these raw bytes (status line included) one per `trickle` s


Route = Reply | list[Reply] | Callable[["_Handler"], Reply]


class TestServer:
    """Handle to a running server; see module doc."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.user_agents: list[str] = []
        self.hosts: list[str] = []
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.base = ""
        self.port = 0

    def url(self, path: str) -> str:
        return self.base + path

    def route(self, path: str, reply: Route) -> str:
        self.routes[path] = reply
        return self.url(path)

    def _reply_for(self, handler: _Handler) -> Reply:
        path = handler.path
        with self.lock:
            self.hits[path] += 1
            n = self.hits[path]
            self.user_agents.append(handler.headers.get("User-Agent", ""))
            self.hosts.append(handler.headers.get("Host", ""))
        route = self.routes.get(path)
        if route is None:
            return Reply(404, b"not found", content_type="text/plain")
        if isinstance(route, Reply):
            return route
        if isinstance(route, list):
            return route[min(n, len(route)) - 1]
        return route(handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.ts.lock:
            self.server.ts.connections += 1

    def do_GET(self) -> None:
        ts = self.server.ts
        reply = ts._reply_for(self)
        if reply.delay:
            time.sleep(reply.delay)
        if reply.hang_up:
            self.close_connection = True
            return
        if reply.raw_trickle:
            self.close_connection = True
            try:
                for i in range(len(reply.raw_trickle)):
                    self.wfile.write(reply.raw_trickle[i : i + 1])
                    self.wfile.flush()
                    time.sleep(reply.trickle)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        with ts.lock:
            ts.in_flight += 1
            ts.max_in_flight = max(ts.max_in_flight, ts.in_flight)
        try:
            self.send_response(reply.status)
            if reply.content_type:
                self.send_header("Content-Type", reply.content_type)
            for k, v in reply.headers:
                self.send_header(k, v)
            if reply.chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            if reply.hold:
                time.sleep(reply.hold)
            try:
                self._body(reply)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
        finally:
            with ts.lock:
                ts.in_flight -= 1

    def _body(self, reply: Reply) -> None:
        body = reply.body
        if reply.trickle:
            for i in range(len(body)):
                self.wfile.write(body[i : i + 1])
                self.wfile.flush()
                time.sleep(reply.trickle)
            return
        if reply.chunked:
            step = 64 * 1024
            for i in range(0, len(body), step):
                part = body[i : i + step]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    ts: TestServer


@contextmanager
def serve() -> Iterator[TestServer]:
    """Run a `TestServer` on a free loopback port for the duration of the block."""
    ts = TestServer()
    server = _Server(("127.0.0.1", 0), _Handler)
    server.ts = ts
    ts.port = server.server_address[1]
    ts.base = f"http://127.0.0.1:{ts.port}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http", daemon=True
    )
    thread.start()
    try:
        yield ts
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
