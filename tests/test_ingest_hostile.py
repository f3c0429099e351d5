"""The downloader against hostile or broken servers (loopback only): every URL ends in one
documented status, quickly, with bounded memory, and a policy file cannot crash a batch or
switch the opt-outs off.

Raw answers (cut bodies, header floods, endless bodies) are written by route callables that
take over the socket and then hang up.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from ccurate.ingest.fetch import FetchOptions, HostLimiter, HttpClient, _retry_after
from ccurate.ingest.guard import Resolver
from ccurate.ingest.optout import OriginPolicies, PolicyFetch, parse_tdmrep, tdmrep_reserved
from tests.httpserver import Reply, TestServer, serve
from tests.test_ingest_download import JPEG, assert_documented, img_reply, one, rec, run


@pytest.fixture()
def srv():
    with serve() as ts:
        yield ts


def raw(*parts: bytes) -> Callable[[Any], Reply]:
    """A route that writes these bytes as the whole answer, then closes the connection."""

    def route(handler: Any) -> Reply:
        with contextlib.suppress(OSError):
            for part in parts:
                handler.wfile.write(part)
            handler.wfile.flush()
        return Reply(hang_up=True)

    return route


def endless(head: bytes) -> Callable[[Any], Reply]:
    """A route that sends `head` then body bytes until the client goes away (or 64 MiB)."""

    def route(handler: Any) -> Reply:
        block = b"x" * 65536
        with contextlib.suppress(OSError):
            handler.wfile.write(head)
            for _ in range(1024):
                handler.wfile.write(block)
        return Reply(hang_up=True)

    return route


class LoopbackResolver(Resolver):
    """Every host name is 127.0.0.1: many hosts on one loopback server."""

    def resolve(self, host: str, port: int) -> tuple[str, ...]:
        return ("127.0.0.1",)


# ------------------------------------------------------------------ Retry-After
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("\u00b2", None),  # latin-1 superscript two: isdigit() but no float
        ("-5", None),
        ("1.5", None),
        ("Thu, 01 Jan 1998 00:00:00 GMT", 0.0),  # a date in the past: now
        ("Fri, 31 Dec 99999 23:59:59 GMT", None),  # year out of range
        ("99999999999999999999", 1e20),
        ("", None),
    ],
)
def test_retry_after_values(value: str, expected: float | None):
    assert _retry_after(value) == expected


@pytest.mark.parametrize("value", ["\u00b2", "-5", "Thu, 01 Jan 1998 00:00:00 GMT"])
def test_odd_retry_after_falls_back_to_backoff(srv: TestServer, value: str):
    """Before the fix `Retry-After: ²` raised ValueError out of `HttpClient.get`, which
    aborted the whole batch."""
    url = srv.route("/r.jpg", [Reply(503, headers=[("Retry-After", value)]), img_reply()])
    t0 = time.monotonic()
    s = one(url)
    assert s.kept and srv.hits["/r.jpg"] == 2
    assert time.monotonic() - t0 < 2.0


# ------------------------------------------------------------ bodies and headers
def test_body_cut_short_of_content_length_is_a_connection_error(srv: TestServer):
    """The server promises N bytes, sends N/2 and closes: a transient failure, not a
    shorter file (was decode_error, a permanent drop, for an image)."""
    head = f"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {len(JPEG)}\r\n\r\n"
    url = srv.route("/cut.jpg", raw(head.encode(), JPEG[: len(JPEG) // 2]))
    s = one(url)
    assert s.drop_reason == "connection_error"
    assert srv.hits["/cut.jpg"] == 2  # retried


def test_robots_txt_cut_short_is_unreachable_not_a_shorter_file(srv: TestServer):
    """A robots.txt cut after its first group must not be parsed as if the rest allowed all."""
    text = b"User-agent: *\nAllow: /ok\n\nUser-agent: ccurate\nDisallow: /\n"
    head = f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(text)}\r\n\r\n"
    srv.route("/robots.txt", raw(head.encode(), text[:26]))
    s = one(srv.route("/ok.jpg", img_reply()))
    assert s.drop_reason == "connection_error"
    assert srv.hits["/ok.jpg"] == 0


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nX-Flood: " + b"a" * 1_000_000 + b"\r\n\r\n",  # 1 MB header line
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(3000)) + b"\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 100_000 + b"\r\n",
    ],
    ids=["header-line", "header-count", "chunk-size-line"],
)
def test_header_floods_are_connection_errors(srv: TestServer, answer: bytes):
    s = one(srv.route("/flood.jpg", raw(answer)))
    assert s.drop_reason == "connection_error"


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFF\r\n",
    ],
    ids=["no-length", "huge-chunk"],
)
def test_endless_bodies_stop_at_the_cap(srv: TestServer, head: bytes):
    t0 = time.monotonic()
    s = one(srv.route("/endless.jpg", endless(head)), max_bytes=500_000)
    assert s.drop_reason == "too_large"
    assert time.monotonic() - t0 < 3.0


def test_keep_alive_closed_between_requests_is_not_the_urls_fault(srv: TestServer):
    """The server closes each connection after answering without saying so: the next
    request on the pooled connection fails, and goes again on a new one, not as a retry."""

    def close_after(handler: Any) -> Reply:
        handler.close_connection = True
        return img_reply()

    urls = [srv.route(f"/ka{i}.jpg", close_after) for i in range(3)]
    client = HttpClient(FetchOptions(allow_private=True, retries=0, total_timeout=4.0))
    try:
        results = [client.get(u) for u in urls]
    finally:
        client.close()
    assert [r.ok for r in results] == [True] * 3
    assert [r.attempts for r in results] == [1] * 3


def test_redirect_to_a_non_http_scheme(srv: TestServer):
    for i, target in enumerate(["ftp://example.org/x.jpg", "file:///etc/passwd", "gopher://x/"]):
        s = one(srv.route(f"/to{i}.jpg", Reply(302, headers=[("Location", target)])))
        assert s.drop_reason == "bad_scheme"


# ---------------------------------------------------------------------- robots.txt
def test_robots_txt_with_hostile_rate_fields_is_still_honoured(srv: TestServer):
    """robotparser int()s Crawl-delay/Request-rate after isdigit(): `²` or 5000 digits raised
    ValueError, which aborted the batch and left the origin's policy empty (allow all)."""
    srv.route(
        "/robots.txt",
        Reply(
            body=(
                "User-agent: *\nCrawl-delay: \u00b2\nRequest-rate: 1/"
                + "9" * 5000
                + "\nDisallow: /private/\n"
            ).encode("latin-1"),
            content_type="text/plain",
        ),
    )
    urls = [srv.route("/private/a.jpg", img_reply()), srv.route("/pub.jpg", img_reply())]
    out = run([rec(u) for u in urls])
    assert [s.drop_reason for s in out] == ["optout_robots_txt", None]


def test_huge_binary_robots_txt_is_read_up_to_its_cap(srv: TestServer):
    noise = bytes(range(256)) * 8192  # 2 MiB of binary
    srv.route("/robots.txt", Reply(body=b"User-agent: *\nDisallow: /no\n" + noise))
    out = run([rec(srv.route("/no.jpg", img_reply())), rec(srv.route("/yes.jpg", img_reply()))])
    assert [s.drop_reason for s in out] == ["optout_robots_txt", None]


def test_slow_robots_txt_times_out_the_host_once(srv: TestServer):
    """robots.txt that never answers: the host's URLs end in `timeout` within about one
    total_timeout, and robots.txt is not asked again for each of them."""
    srv.route("/robots.txt", Reply(delay=5.0, body=b"User-agent: *\nAllow: /\n"))
    urls = [srv.route(f"/s{i}.jpg", img_reply()) for i in range(6)]
    t0 = time.monotonic()
    out = run([rec(u) for u in urls], total_timeout=1.0)
    assert [s.drop_reason for s in out] == ["timeout"] * 6
    assert time.monotonic() - t0 < 3.0
    assert srv.hits["/robots.txt"] <= 2 and sum(srv.hits[f"/s{i}.jpg"] for i in range(6)) == 0


def test_policy_that_cannot_be_loaded_fails_closed():
    """A failure inside the policy load must not leave an empty (allow-all) policy for the
    origin's other URLs, nor escape into the batch."""

    def fetch(url: str, max_bytes: int) -> PolicyFetch:
        raise RuntimeError("parser bug")

    pol = OriginPolicies(fetch, "ccurate")
    assert pol.check("http://h.test", "/a.jpg") == "connection_error"
    assert pol.check("http://h.test", "/b.jpg") == "connection_error"
    assert pol.fetches == 1


# ---------------------------------------------------------------------- tdmrep.json
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 200_000,  # nests past the recursion limit: RecursionError, not ValueError
        json.dumps(
            [{"location": f"/p{i}/*", "tdm-reservation": 1} for i in range(20_000)]
        ).encode(),
        b"\x00\xff" * 1000,
    ],
    ids=["deep", "enormous", "binary"],
)
def test_broken_tdmrep_json_gives_no_rules(srv: TestServer, body: bytes):
    srv.route("/.well-known/tdmrep.json", Reply(body=body, content_type="application/json"))
    s = one(srv.route("/t.jpg", img_reply()))
    assert s.kept  # enormous is cut at 256 KiB: no longer JSON, so no rules


@pytest.mark.timeout(10)  # the regex took minutes here
def test_tdmrep_wildcards_match_in_linear_time():
    """A backtracking regex took exponential time on `/a*a*...b` against `/aaaa...`."""
    rules = parse_tdmrep(
        json.dumps(
            [
                {"location": "/" + "a*" * 40 + "b", "tdm-reservation": 1},
                {"location": "/x*y*z$", "tdm-reservation": 1},
                {"location": "/img/*.jpg$", "tdm-reservation": 1},
            ]
        ).encode()
    )
    t0 = time.monotonic()
    assert not tdmrep_reserved(rules, "/" + "a" * 5000)
    assert tdmrep_reserved(rules, "/" + "a" * 60 + "b")
    assert time.monotonic() - t0 < 0.5
    assert tdmrep_reserved(rules, "/x1y2z")
    assert not tdmrep_reserved(rules, "/xyz/")
    assert tdmrep_reserved(rules, "/img/a/b.jpg")
    assert not tdmrep_reserved(rules, "/img/a.jpg?x")


# ------------------------------------------------------------ many hosts, memory bounds
def test_host_limiter_forgets_hosts_whose_times_are_over():
    limiter = HostLimiter(per_host=2, rate=10_000.0)
    far = time.monotonic() + 60
    for i in range(20_000):
        assert limiter.acquire(f"h{i}.test", far)
        limiter.release(f"h{i}.test")
        if i % 5000 == 0:
            limiter.pause(f"h{i}.test", time.monotonic() + 0.0001)
    time.sleep(0.01)
    limiter.acquire("last.test", far)
    assert len(limiter._next) + len(limiter._not_before) < 10_000


def test_many_hosts_at_once_leave_no_pool_entries_behind(srv: TestServer):
    """200 host names on 8 threads, each ending on a `Connection: close` answer: all succeed
    and the pool keeps no empty per-host entry."""
    srv.route("/a.jpg", img_reply())
    srv.route("/close.jpg", img_reply(headers=[("Connection", "close")]))
    client = HttpClient(
        FetchOptions(allow_private=True, retries=0, total_timeout=5.0), LoopbackResolver()
    )

    def host(i: int) -> list[bool]:
        base = f"http://h{i}.test:{srv.port}"
        return [client.get(base + p).ok for p in ("/a.jpg", "/close.jpg")]

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(host, range(200)))
        assert all(all(r) for r in results)
        assert len(client._pool) == 0
    finally:
        client.close()


def test_mixed_hostile_batch_ends_with_documented_statuses(srv: TestServer):
    urls = [
        srv.route("/ok.jpg", img_reply()),
        srv.route("/hang.jpg", Reply(hang_up=True)),
        srv.route("/trickle.jpg", img_reply(trickle=0.3)),
        srv.route("/ra.jpg", Reply(429, headers=[("Retry-After", "\u00b2")])),
        srv.route("/loop.jpg", Reply(302, headers=[("Location", "/loop.jpg")])),
        srv.route("/big.jpg", endless(b"HTTP/1.1 200 OK\r\n\r\n")),
    ]
    t0 = time.monotonic()
    out = run([rec(u) for u in urls], total_timeout=2.0, max_bytes=300_000)
    assert time.monotonic() - t0 < 5.0
    assert len(out) == len(urls)
    assert_documented(out)
    assert [s.drop_reason for s in out] == [
        None,
        "connection_error",
        "timeout",
        "http_429",
        "too_many_redirects",
        "too_large",
    ]


# ------------------------------------------------------------------ DNS
def test_dns_lookup_has_a_deadline_and_concurrent_askers_share_one_lookup(
    monkeypatch: pytest.MonkeyPatch,
):
    """A resolver that never answers must not hold a fetch thread past the deadline, and
    the threads that ask for a name being looked up wait for that one lookup."""
    release = threading.Event()
    calls: list[str] = []

    def slow(host: str, port: int, type: int = 0) -> list[Any]:
        calls.append(host)
        if host == "hang.example":
            release.wait(10)
        else:
            time.sleep(0.2)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))]

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    r = Resolver(timeout=0.3, negative_ttl=60)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"hang\.example took over 0\.3 s"):
        r.resolve("hang.example", 80)
    assert time.monotonic() - t0 < 2.0
    with pytest.raises(TimeoutError):  # cached: no second wait, no second lookup
        r.resolve("hang.example", 80)
    got: list[tuple[str, ...]] = []
    threads = [
        threading.Thread(target=lambda: got.append(r.resolve("ok.example", 80))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [("93.184.216.34",)] * 8
    assert calls.count("ok.example") == 1 and calls.count("hang.example") == 1
    # an IP literal is its own answer: no lookup, no thread (the SSRF guard still vets it)
    assert r.resolve("10.0.0.7", 80) == ("10.0.0.7",) and r.resolve("::1", 80) == ("::1",)
    assert len(calls) == 2
    release.set()


def test_a_hanging_dns_lookup_ends_the_url_as_a_connection_error(
    monkeypatch: pytest.MonkeyPatch,
):
    def never(host: str, port: int, type: int = 0) -> list[Any]:
        time.sleep(5)
        raise socket.gaierror("too late")

    monkeypatch.setattr(socket, "getaddrinfo", never)
    client = HttpClient(FetchOptions(connect_timeout=0.2, retries=0, total_timeout=5.0))
    t0 = time.monotonic()
    res = client.get("http://slow-dns.example/a.jpg")
    client.close()
    assert time.monotonic() - t0 < 2.0
    assert res.reason == "connection_error" and "took over 0.2 s" in res.detail
