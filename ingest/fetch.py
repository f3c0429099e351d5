"""The HTTP client of ingest: pinned connections, per-host limits, retries, bounded bodies.

Threads, not asyncio: every request runs start to finish (fetch, then decode
and resize) in one worker thread. On this workload the CPU-heavy part is
Pillow, which releases the GIL, and the stdlib `http.client` parses headers
in C-backed code; a thread pool measured faster than an asyncio client that
hands decoding to an executor (figures in bench/ingest_vs_img2dataset.py
`--probe`). Keep-alive connections are pooled per host.

Guarantees, whatever the server does:
- every hop (first URL and each redirect) passes the SSRF guard and the
  opt-out policy hook before a connection is made, and the connection goes
  to the address the guard checked;
- a body never grows past its cap (`Content-Length` is checked first, then
  the stream is counted; one cut short of its `Content-Length` is a
  `connection_error`), and no URL takes longer than `total_timeout`,
  retries, backoff and a slow trickle of bytes included;
- transient failures (timeouts, connection errors, 408/429/5xx) are retried
  with exponential backoff and full jitter; `Retry-After` on 429/503 is
  honoured for the whole host (also when the URL that got it has no retries
  left), and a wait longer than `max_retry_after` gives up with the status as
  the reason (so a later retry run picks it up).
"""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import random
import socket
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from ccurate.ingest.guard import Blocked, Resolver, Target, check_url, parse_networks

if TYPE_CHECKING:
    from ccurate.ingest.config import IngestConfig

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK = 256 * 1024
_DRAIN_LIMIT = 64 * 1024  # read at most this much of an error body to keep the connection


@dataclass
class FetchOptions:
    """The knobs of `HttpClient` (taken from `IngestConfig`)."""

    user_agent: str = "ccurate"
    allow_private: bool = False
    allow_networks: tuple[str, ...] = ()
    connect_timeout: float = 10.0
    read_timeout: float = 20.0
    total_timeout: float = 60.0
    retries: int = 2
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 60.0
    max_redirects: int = 5
    per_host_connections: int = 4
    per_host_rate: float = 0.0
    max_idle_connections: int = 256

    @classmethod
    def from_config(cls, c: IngestConfig, threads: int) -> FetchOptions:
        """The client knobs of an `[ingest]` section, pooled for `threads` workers."""
        return cls(
            user_agent=c.user_agent,
            allow_private=c.allow_private,
            allow_networks=tuple(c.allow_networks),
            connect_timeout=c.connect_timeout,
            read_timeout=c.read_timeout,
            total_timeout=c.total_timeout,
            retries=c.retries,
            backoff_base=c.backoff_base,
            backoff_max=c.backoff_max,
            max_retry_after=c.max_retry_after,
            max_redirects=c.max_redirects,
            per_host_connections=c.per_host_connections,
            per_host_rate=c.per_host_rate,
            max_idle_connections=max(64, 4 * threads),
        )


@dataclass
class FetchResult:
    """Outcome of one GET: a 2xx body, or `reason` (an ingest drop reason)."""

    url: str
    reason: str | None = None
    status: int | None = None
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    detail: str = ""
    attempts: int = 0
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def content_type(self) -> str:
        values = self.headers.get("content-type")
        return values[-1].split(";", 1)[0].strip().lower() if values else ""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[-1] if values else None


class _Failure(Exception):
    """Internal: one attempt failed with a drop reason."""

    def __init__(self, reason: str, detail: str = "", transient: bool = False) -> None:
        super().__init__(detail or reason)
        self.reason = reason
        self.detail = detail
        self.transient = transient


class _StaleConnection(Exception):
    """Internal: a reused keep-alive connection was closed by the server; retry on a new one."""


HopCheck = Callable[[Target], str | None]
"""Called for every hop before connecting (robots.txt, TDMRep): a drop reason, or None."""
HeaderCheck = Callable[[int, dict[str, list[str]]], str | None]
"""Called on a final 2xx response before its body is read: a drop reason, or None."""


class HostLimiter:
    """Per-host concurrency slots, request spacing, and `Retry-After` pauses.

    Shared by all threads of one worker process. Limits are per process: with
    W workers a host sees at most W x `per_host_connections` connections.
    """

    def __init__(self, per_host: int, rate: float) -> None:
        self.per_host = per_host
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self._lock = threading.Lock()
        # a condition per host that has waiters: a release wakes one waiter of its own host,
        # not every waiting thread of the pool (no speed change measured at 32 threads on the
        # ingest bench; the wake-ups no longer grow with threads x busy hosts)
        self._waits: dict[str, threading.Condition] = {}
        self._waiters: dict[str, int] = {}
        self._active: dict[str, int] = {}
        self._next: dict[str, float] = {}
        self._not_before: dict[str, float] = {}
        self._prune_at = 4096  # times per host: dropped once past, so hosts seen once go

    def acquire(self, host: str, deadline: float) -> bool:
        """Take a slot for `host`; False if none could be had before `deadline`."""
        with self._lock:
            while self._active.get(host, 0) >= self.per_host:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wait(host, left)
            self._active[host] = self._active.get(host, 0) + 1
            now = time.monotonic()
            start = max(now, self._next.get(host, 0.0), self._not_before.get(host, 0.0))
            if self.interval:
                self._next[host] = start + self.interval
            if len(self._next) + len(self._not_before) > self._prune_at:
                self._prune(now)
        if start > deadline:
            self.release(host)
            return False
        if start > now:
            time.sleep(start - now)
        return True

    def _prune(self, now: float) -> None:
        """Forget spacing and pauses already over (holding `_lock`): they hold nobody back,
        and a crawl of millions of hosts would otherwise keep one entry per host."""
        for times in (self._next, self._not_before):
            for h in [h for h, t in times.items() if t <= now]:
                del times[h]
        self._prune_at = max(4096, 2 * (len(self._next) + len(self._not_before)))

    def _wait(self, host: str, timeout: float) -> None:
        """Wait (holding `_lock`) until a slot of `host` is released or `timeout` passes."""
        cond = self._waits.get(host)
        if cond is None:
            cond = self._waits[host] = threading.Condition(self._lock)
        self._waiters[host] = self._waiters.get(host, 0) + 1
        try:
            cond.wait(timeout)
        finally:
            left = self._waiters[host] - 1
            if left:
                self._waiters[host] = left
            else:
                del self._waiters[host], self._waits[host]

    def release(self, host: str) -> None:
        with self._lock:
            n = self._active.get(host, 1) - 1
            if n <= 0:
                self._active.pop(host, None)
            else:
                self._active[host] = n
            cond = self._waits.get(host)
            if cond is not None:
                # one slot, one waiter: it takes the slot when it wakes, even past its deadline
                # (a slot handed to a waiter that then gives up would strand the others)
                cond.notify()

    def pause(self, host: str, until: float) -> None:
        """No new request to `host` before `until` (monotonic), e.g. from Retry-After."""
        with self._lock:
            self._not_before[host] = max(self._not_before.get(host, 0.0), until)
            if len(self._next) + len(self._not_before) > self._prune_at:
                self._prune(time.monotonic())


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to the guard-checked address, never to a fresh DNS answer."""

    def __init__(
        self,
        target: Target,
        connect_timeout: float,
        read_timeout: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        super().__init__(target.host, target.port, timeout=connect_timeout)
        self.addresses = target.addresses
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.server_name = target.host
        self.reused = False
        self.expired = False  # set by the watchdog when the deadline passed

    def connect(self) -> None:
        last: OSError | None = None
        for addr in self.addresses:
            try:
                sock = socket.create_connection((addr, self.port), timeout=self.timeout)
                break
            except OSError as e:
                last = e
        else:
            assert last is not None
            raise last
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.read_timeout)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_name)
        self.sock = sock


class _Watchdog:
    """Shuts down sockets whose request outlived its deadline.

    Socket timeouts bound each `recv`, not a status line or header block
    sent one byte at a time; this daemon thread enforces `total_timeout`
    whatever phase the request is in. The blocked read then fails and the
    request is reported as `timeout`.
    """

    def __init__(self, period: float = 0.1) -> None:
        self.period = period
        self._lock = threading.Lock()
        self._active: dict[int, tuple[float, _PinnedConnection]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, conn: _PinnedConnection, deadline: float) -> None:
        with self._lock:
            self._active[id(conn)] = (deadline, conn)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="ingest-watchdog", daemon=True
                )
                self._thread.start()

    def unwatch(self, conn: _PinnedConnection) -> None:
        with self._lock:
            self._active.pop(id(conn), None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            now = time.monotonic()
            with self._lock:
                late = [c for d, c in self._active.values() if d <= now]
                for c in late:
                    self._active.pop(id(c), None)
            for c in late:
                c.expired = True
                sock = c.sock
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)


@dataclass(frozen=True)
class _Request:
    """What one `HttpClient.get` asks for, the same on every hop and retry."""

    accept: str
    max_bytes: int
    truncate: bool  # return the first max_bytes instead of failing `too_large`
    deadline: float  # time.monotonic() by which the whole get must end
    header_check: HeaderCheck | None
    gzip_ok: bool


class HttpClient:
    """Thread-safe GET client; one per worker process (built in `IngestStage.setup`)."""

    def __init__(self, options: FetchOptions, resolver: Resolver | None = None) -> None:
        self.opt = options
        self.resolver = resolver or Resolver(timeout=options.connect_timeout)
        self._networks = parse_networks(options.allow_networks)
        self.limiter = HostLimiter(options.per_host_connections, options.per_host_rate)
        self._ssl = ssl.create_default_context()
        self._pool: OrderedDict[tuple[str, str, int], list[_PinnedConnection]] = OrderedDict()
        self._idle = 0
        self._pool_lock = threading.Lock()
        self._rng = random.Random()
        self._watchdog = _Watchdog()
        self.requests = 0

    # -- public ------------------------------------------------------------
    def get(
        self,
        url: str,
        *,
        accept: str = "*/*",
        max_bytes: int = 20_000_000,
        truncate: bool = False,
        hop_check: HopCheck | None = None,
        header_check: HeaderCheck | None = None,
        gzip_ok: bool = False,
    ) -> FetchResult:
        """GET `url` following redirects; never raises for network or server trouble.

        `truncate=True` returns the first `max_bytes` instead of failing with
        `too_large` (robots.txt is read that way).
        """
        req = _Request(
            accept, max_bytes, truncate, time.monotonic() + self.opt.total_timeout, header_check,
            gzip_ok,
        )  # fmt: skip
        seen: set[str] = set()
        current = url
        attempts = 0
        for _hop in range(self.opt.max_redirects + 1):
            seen.add(current)
            try:
                target = check_url(current, self.resolver, self.opt.allow_private, self._networks)
            except Blocked as e:
                return FetchResult(current, e.reason, detail=str(e), attempts=attempts)
            except (OSError, UnicodeError) as e:
                return FetchResult(current, "connection_error", detail=f"dns: {e}")
            if hop_check is not None:
                reason = hop_check(target)
                if reason is not None:
                    return FetchResult(current, reason, detail="policy", attempts=attempts)
            res = self._with_retries(target, req)
            attempts += res.attempts
            res.attempts = attempts
            if res.reason is None and res.status in REDIRECT_STATUSES:
                location = res.header("location")
                if not location:
                    return FetchResult(
                        current,
                        f"http_{res.status}",
                        res.status,
                        res.headers,
                        detail="redirect without Location",
                        attempts=attempts,
                    )
                nxt = urljoin(current, location.strip())
                if nxt in seen:
                    return FetchResult(
                        nxt, "too_many_redirects", detail="redirect loop", attempts=attempts
                    )
                current = nxt
                continue
            return res
        return FetchResult(
            current,
            "too_many_redirects",
            detail=f"more than {self.opt.max_redirects}",
            attempts=attempts,
        )

    def close(self) -> None:
        self._watchdog.stop()
        with self._pool_lock:
            conns = [c for lst in self._pool.values() for c in lst]
            self._pool.clear()
            self._idle = 0
        for c in conns:
            c.close()

    # -- retries -------------------------------------------------------------
    def _with_retries(self, target: Target, req: _Request) -> FetchResult:
        deadline = req.deadline
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            if not self.limiter.acquire(target.host, deadline):
                return FetchResult(
                    target.url, "timeout", detail="waiting for a host slot", attempts=attempt - 1
                )
            try:
                res = self._once(target, req)
                res.attempts = attempt
                if res.status not in RETRY_STATUSES:
                    return res
                failure = _Failure(f"http_{res.status}", transient=True)
                retry_after = _retry_after(res.header("retry-after"))
            except _Failure as f:
                if not f.transient:
                    return FetchResult(target.url, f.reason, detail=f.detail, attempts=attempt)
                failure = f
                res = FetchResult(target.url, f.reason, detail=f.detail, attempts=attempt)
            finally:
                self.limiter.release(target.host)
            if res.reason is None:
                res.reason = failure.reason
            if retry_after is not None:
                # the host asked every client to wait: its other URLs wait too, even when
                # this one gives up (no retries left, or a wait past max_retry_after)
                self.limiter.pause(target.host, time.monotonic() + retry_after)
            if attempt > self.opt.retries:
                return res
            backoff = min(self.opt.backoff_max, self.opt.backoff_base * 2 ** (attempt - 1))
            delay = self._rng.uniform(0, backoff)  # full jitter
            if retry_after is not None:
                if retry_after > self.opt.max_retry_after:
                    res.detail = f"Retry-After {retry_after:.0f}s is past max_retry_after"
                    return res
                delay = retry_after + self._rng.uniform(0, 0.1)
            if time.monotonic() + delay >= deadline:
                res.detail = (res.detail + "; " if res.detail else "") + "no time left to retry"
                return res
            time.sleep(delay)

    # -- one request -----------------------------------------------------------
    def _once(self, target: Target, req: _Request) -> FetchResult:
        conn = self._checkout(target)
        while True:
            self._watchdog.watch(conn, req.deadline)
            try:
                return self._once_on(conn, target, req)
            except _StaleConnection:
                # the server closed an idle keep-alive connection: not the URL's fault
                conn = self._new_conn(target)
            except _Failure as f:
                if conn.expired and f.reason == "connection_error":
                    raise _Failure("timeout", "total timeout", True) from None
                raise
            finally:
                self._watchdog.unwatch(conn)

    def _once_on(self, conn: _PinnedConnection, target: Target, req: _Request) -> FetchResult:
        try:
            self._send(conn, target, req)
            resp = conn.getresponse()
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as e:
            conn.close()
            if conn.reused and not conn.expired:
                raise _StaleConnection from None
            raise _Failure("connection_error", str(e) or type(e).__name__, True) from None
        except Exception as e:
            conn.close()
            raise _classify(e) from None
        self.requests += 1
        try:
            headers: dict[str, list[str]] = {}
            for k, v in resp.getheaders():
                headers.setdefault(k.lower(), []).append(v)
            res = FetchResult(target.url, None, resp.status, headers)
            ok = 200 <= resp.status < 300
            check = req.header_check
            refused = check(resp.status, headers) if ok and check is not None else None
            if not ok:
                self._drain(conn, resp, req.deadline)  # then reusable, or closed by _drain
                if resp.status not in REDIRECT_STATUSES:
                    res.reason = f"http_{resp.status}"
            elif refused is not None:
                conn.close()
                res.reason = refused
                return res
            else:
                res.body, res.truncated = self._read_body(conn, resp, req)
                encoding = (res.header("content-encoding") or "").strip().lower()
                if encoding in ("gzip", "x-gzip", "deflate") and res.body:
                    res.body = _decompress(
                        res.body, encoding, req.max_bytes, req.truncate, res.truncated
                    )
        except _Failure:
            conn.close()
            raise
        except Exception as e:
            conn.close()
            raise _classify(e) from None
        if resp.will_close or res.truncated:
            conn.close()
        else:
            self._checkin(target, conn)
        return res

    def _send(self, conn: _PinnedConnection, target: Target, req: _Request) -> None:
        left = req.deadline - time.monotonic()
        if left <= 0:
            raise _Failure("timeout", "total timeout", True)
        if conn.sock is None:
            conn.timeout = min(self.opt.connect_timeout, left)
            conn.read_timeout = min(self.opt.read_timeout, left)
        else:
            conn.sock.settimeout(min(self.opt.read_timeout, left))
        conn.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", target.host_header)
        conn.putheader("User-Agent", self.opt.user_agent)
        conn.putheader("Accept", req.accept)
        conn.putheader("Accept-Encoding", "gzip" if req.gzip_ok else "identity")
        conn.endheaders()

    def _read_body(
        self, conn: _PinnedConnection, resp: http.client.HTTPResponse, req: _Request
    ) -> tuple[bytes, bool]:
        max_bytes, truncate, deadline = req.max_bytes, req.truncate, req.deadline
        length = resp.getheader("content-length")
        if length is not None and not truncate:
            try:
                if int(length) > max_bytes:
                    raise _Failure("too_large", f"Content-Length {length} > {max_bytes}")
            except ValueError:
                pass
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failure("timeout", "total timeout while reading body", True)
            if conn.sock is not None:
                conn.sock.settimeout(min(self.opt.read_timeout, left))
            want = min(_CHUNK, max_bytes + 1 - size)
            chunk = resp.read1(want)  # one recv: a trickle cannot outlast the deadline
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                if truncate:
                    return b"".join(chunks)[:max_bytes], True
                raise _Failure("too_large", f"body over {max_bytes} bytes")
        if resp.length:  # read1 meets EOF quietly: a cut body would pass as a shorter file
            raise _Failure("connection_error", f"body ended {resp.length} bytes short", True)
        if not resp.isclosed() and resp.length == 0:
            resp.read()  # read1 leaves a fully read response open; this completes it
        return b"".join(chunks), False

    def _drain(
        self, conn: _PinnedConnection, resp: http.client.HTTPResponse, deadline: float
    ) -> None:
        """Read a small error/redirect body so the connection can be reused; else close it."""
        try:
            length = resp.getheader("content-length")
            if length is not None and length.isdigit() and int(length) > _DRAIN_LIMIT:
                conn.close()
                return
            left = deadline - time.monotonic()
            if conn.sock is not None and left > 0:
                conn.sock.settimeout(min(self.opt.read_timeout, left, 5.0))
            data = resp.read(_DRAIN_LIMIT + 1)
            if len(data) > _DRAIN_LIMIT or not resp.isclosed():
                conn.close()
        except Exception:
            conn.close()

    # -- connection pool -------------------------------------------------------
    def _new_conn(self, target: Target) -> _PinnedConnection:
        ctx = self._ssl if target.scheme == "https" else None
        return _PinnedConnection(target, self.opt.connect_timeout, self.opt.read_timeout, ctx)

    def _checkout(self, target: Target) -> _PinnedConnection:
        key = (target.scheme, target.host, target.port)
        with self._pool_lock:
            conns = self._pool.get(key)
            found: _PinnedConnection | None = None
            while conns and found is None:
                conn = conns.pop()
                self._idle -= 1
                if conn.addresses == target.addresses and conn.sock is not None:
                    conn.reused = True
                    found = conn
                else:
                    conn.close()
            if conns is not None and not conns:
                del self._pool[key]  # else a key per host ever seen stays behind
        return found if found is not None else self._new_conn(target)

    def _checkin(self, target: Target, conn: _PinnedConnection) -> None:
        if conn.sock is None:
            return
        key = (target.scheme, target.host, target.port)
        evicted: list[_PinnedConnection] = []
        with self._pool_lock:
            conns = self._pool.setdefault(key, [])
            self._pool.move_to_end(key)
            if len(conns) >= self.opt.per_host_connections:
                evicted.append(conn)
            else:
                conns.append(conn)
                self._idle += 1
            while self._idle > self.opt.max_idle_connections and self._pool:
                _, oldest = self._pool.popitem(last=False)
                self._idle -= len(oldest)
                evicted.extend(oldest)
        for c in evicted:
            c.close()


def _classify(e: BaseException) -> _Failure:
    """Map a low-level exception to a drop reason (all transient: worth a retry)."""
    if isinstance(e, _Failure):
        return e
    if isinstance(e, (TimeoutError, socket.timeout)):
        return _Failure("timeout", str(e) or "timed out", True)
    if isinstance(e, ssl.SSLError) and "timed out" in str(e):
        return _Failure("timeout", str(e), True)
    if isinstance(e, (OSError, http.client.HTTPException, ValueError)):
        return _Failure("connection_error", f"{type(e).__name__}: {e}", True)
    raise e


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() is True and float("²") raises
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _decompress(
    body: bytes, encoding: str, max_bytes: int, truncate: bool, cut: bool = False
) -> bytes:
    """gzip/deflate with the same cap as the raw body (a small gzip can inflate to gigabytes).

    Every member of a multi-member gzip is read (RFC 1952 2.2). A stream that ends before
    its end marker is a broken transfer, as a short identity body is: a robots.txt cut
    before its Disallow group must not read as a shorter file. Only a raw body already
    cut at the cap (`cut`, pages read with `truncate`) may end mid-stream."""
    gz = "gzip" in encoding
    wbits = 16 + zlib.MAX_WBITS if gz else zlib.MAX_WBITS
    try:
        d = zlib.decompressobj(wbits)
        out = d.decompress(body, max_bytes + 1)
    except zlib.error:
        try:  # raw deflate, as some servers send
            d = zlib.decompressobj(-zlib.MAX_WBITS)
            out = d.decompress(body, max_bytes + 1)
        except zlib.error as e:
            raise _Failure("connection_error", f"bad {encoding} body: {e}") from None
    while gz and d.eof and d.unused_data and len(out) <= max_bytes:
        rest, d = d.unused_data, zlib.decompressobj(wbits)
        try:
            out += d.decompress(rest, max_bytes + 1 - len(out))
        except zlib.error:  # trailing garbage after a whole member: ignored, as gzip(1) does
            break
    if len(out) > max_bytes:
        if truncate:
            return out[:max_bytes]
        raise _Failure("too_large", f"decompressed body over {max_bytes} bytes")
    if not d.eof and not cut:
        raise _Failure("connection_error", f"{encoding} body ended before its end", True)
    return out
