"""Ingest downloader end to end against a loopback server: every URL ends in one documented status.

Covers HTTP behaviour (retries, Retry-After, redirects, timeouts, caps),
opt-outs (X-Robots-Tag, TDMRep header/meta/well-known, robots.txt, meta
robots), the SSRF guard, the page path, pooling/limits and `plan_retry`.
"""

from __future__ import annotations

import io
import pickle
import socket
import threading
import time
from typing import Any

import pytest
from PIL import Image

from ccurate.executor import ShardTask, run_task
from ccurate.ingest.config import IngestConfig
from ccurate.ingest.fetch import FetchOptions, HostLimiter, HttpClient
from ccurate.ingest.guard import Blocked, Resolver, check_url, is_public_address, parse_networks
from ccurate.ingest.optout import parse_tdmrep, tdmrep_reserved, x_robots_optout
from ccurate.ingest.stage import REASONS, IngestStage, is_transient, plan_retry
from ccurate.record import Sample, make_key
from ccurate.shardio import read_dropped, read_index, write_partition
from tests.httpserver import Reply, TestServer, serve

FAST: dict[str, Any] = dict(
    connect_timeout=1.0,
    read_timeout=0.5,
    total_timeout=4.0,
    retries=1,
    backoff_base=0.05,
    threads=8,
    image_size=64,
)


def jpeg(w: int = 120, h: int = 90, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


JPEG = jpeg()
HTML = b"<!doctype html><html><head><title>t</title></head><body><p>hello</p></body></html>"


def img_reply(**kw) -> Reply:
    return Reply(body=JPEG, content_type="image/jpeg", **kw)


def rec(url: str, **kw) -> Sample:
    return Sample(key=make_key(url), url=url, **kw)


def page_rec(url: str) -> Sample:
    return Sample(key=make_key(url), url=url, page_url=url, mime="text/html")


def run(records: list[Sample], **cfg) -> list[Sample]:
    settings = {"allow_private": True, **FAST, **cfg}
    stage = IngestStage(IngestConfig(**settings))
    stage.setup()
    try:
        return stage.process(records)
    finally:
        stage.teardown()


def one(url: str, **cfg) -> Sample:
    out = run([rec(url)], **cfg)
    assert len(out) == 1
    return out[0]


def assert_documented(samples: list[Sample]) -> None:
    for s in samples:
        if not s.kept:
            assert s.dropped_by == "ingest"
            reason = s.drop_reason or ""
            assert reason in REASONS or reason.startswith("http_"), reason


@pytest.fixture()
def srv():
    with serve() as ts:
        yield ts


# ----------------------------------------------------------------- success path
def test_success_fills_the_record(srv: TestServer):
    url = srv.route("/a.jpg", img_reply())
    s = one(url, user_agent="ccurate-test/1 (+mailto:x@y)")
    assert s.kept, s.drop_reason
    assert s.mime == "image/jpeg"
    assert (s.original_width, s.original_height) == (120, 90)
    assert (s.width, s.height) == (85, 64)  # keep_ratio: smaller side -> 64
    import hashlib

    assert s.sha256 == hashlib.sha256(JPEG).hexdigest()
    assert Image.open(io.BytesIO(s.image or b"")).size == (85, 64)
    assert "ccurate-test/1 (+mailto:x@y)" in srv.user_agents
    assert srv.hits["/robots.txt"] == 1 and srv.hits["/.well-known/tdmrep.json"] == 1


def test_hashes_follow_the_hashing_module(srv: TestServer):
    import importlib.util

    url = srv.route("/h.jpg", img_reply())
    s = one(url)
    assert s.kept
    if importlib.util.find_spec("ccurate.filters.hashing") is None:
        assert s.pixel_sha256 is None and s.phash is None
    else:
        assert s.pixel_sha256 and len(s.pixel_sha256) == 64
        assert s.phash and len(s.phash) == 16


def test_octet_stream_image_is_judged_by_its_bytes(srv: TestServer):
    url = srv.route("/b", Reply(body=JPEG, content_type="application/octet-stream"))
    assert one(url).kept


def test_keep_alive_connections_are_reused(srv: TestServer):
    urls = [srv.route(f"/k{i}.jpg", img_reply()) for i in range(12)]
    out = run(
        [rec(u) for u in urls],
        per_host_connections=2,
        respect_robots_txt=False,
        respect_tdmrep=False,
    )
    assert all(s.kept for s in out)
    assert srv.connections <= 2


def test_connections_are_reused_after_404s_and_redirects(srv: TestServer):
    """robots.txt and tdmrep.json answer 404 and a redirect answers 301: the drained
    connection goes back to the pool, so one host costs one connection, not one per request."""
    target = srv.route("/final.jpg", img_reply())
    urls = [srv.route(f"/m{i}.jpg", img_reply()) for i in range(4)]
    moved = srv.route("/moved.jpg", Reply(301, headers=[("Location", target)]))
    out = run([rec(u) for u in [*urls, moved]], per_host_connections=1, threads=1)
    assert all(s.kept for s in out)
    assert srv.hits["/robots.txt"] == 1 and srv.hits["/.well-known/tdmrep.json"] == 1
    assert srv.connections == 1


def test_per_host_concurrency_limit(srv: TestServer):
    urls = [srv.route(f"/c{i}.jpg", img_reply(hold=0.1)) for i in range(8)]
    out = run([rec(u) for u in urls], per_host_connections=2, threads=8)
    assert all(s.kept for s in out)
    assert srv.max_in_flight <= 2


def test_host_limiter_wakes_waiters_of_the_released_host_only():
    """Slots are per host: 16 threads on one host never hold more than 2 at once, all get
    through, a waiter past its deadline gives up without stranding the others, and a
    thread for another host is never held up by them."""
    lim = HostLimiter(per_host=2, rate=0.0)
    held, peak, done = [0], [0], []
    lock = threading.Lock()

    def worker(i: int) -> None:
        assert lim.acquire("a", time.monotonic() + 10)
        with lock:
            held[0] += 1
            peak[0] = max(peak[0], held[0])
        time.sleep(0.01)
        with lock:
            held[0] -= 1
        lim.release("a")
        done.append(i)

    assert lim.acquire("a", time.monotonic() + 1) and lim.acquire("a", time.monotonic() + 1)
    t0 = time.monotonic()
    assert not lim.acquire("a", time.monotonic() + 0.05)  # full: gives up at its deadline
    assert time.monotonic() - t0 >= 0.04
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    assert lim.acquire("b", time.monotonic() + 0.5)  # another host: not behind "a"'s queue
    lim.release("b")
    time.sleep(0.05)
    assert not done  # all 16 wait while the two slots are taken
    lim.release("a")
    lim.release("a")
    for t in threads:
        t.join(5)
    assert sorted(done) == list(range(16)) and peak[0] == 2
    assert not lim._waits and not lim._waiters  # no condition left behind


def test_compressed_bodies_are_capped_like_raw_ones(srv: TestServer):
    """Content-Encoding is decoded under the same byte cap as the raw body: a 1 MB gzip of
    zeros (a 1 GB-class bomb in miniature) is `too_large`, or cut at the cap where the
    caller reads a prefix (robots.txt); gzip, zlib and raw deflate decode; a corrupt
    body is a connection error, not a crash. Servers may compress even an image GET
    that asked for identity, so this holds for every request."""
    import gzip
    import random
    import zlib

    page = b"<html>" + b"licence " * 2000 + b"</html>"
    bomb = gzip.compress(bytes(4_000_000))
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    gz, defl = [("Content-Encoding", "gzip")], [("Content-Encoding", "deflate")]
    srv.route("/gz.html", Reply(body=gzip.compress(page), headers=gz))
    srv.route("/zl.html", Reply(body=zlib.compress(page), headers=defl))
    srv.route("/raw.html", Reply(body=raw.compress(page) + raw.flush(), headers=defl))
    srv.route("/bomb.jpg", Reply(body=bomb, headers=gz))
    srv.route("/bad.html", Reply(body=b"\x1f\x8bnot gzip", headers=gz))
    # a gzip stream cut before its end (framing complete): a broken transfer, as a short
    # identity body is; a robots.txt cut before its Disallow group must not read as allowed
    noisy = random.Random(0).randbytes(20_000).hex().encode()  # gzip of it: ~22 KB
    srv.route("/noisy.html", Reply(body=gzip.compress(noisy), headers=gz))
    srv.route("/cut.txt", Reply(body=gzip.compress(page)[:-20], headers=gz))
    # RFC 1952: a gzip file is a series of members, all of them the body
    srv.route("/two.html", Reply(body=gzip.compress(page) + gzip.compress(b"<p>2</p>"), headers=gz))
    client = HttpClient(FetchOptions(allow_private=True, retries=0, total_timeout=5.0))
    try:
        for path in ("/gz.html", "/zl.html", "/raw.html"):
            r = client.get(srv.url(path), gzip_ok=True)
            assert r.ok and r.body == page, path
        assert len(bomb) < 10_000
        r = client.get(srv.url("/bomb.jpg"), max_bytes=1_000_000)
        assert r.reason == "too_large" and "decompressed" in r.detail
        r = client.get(srv.url("/bomb.jpg"), max_bytes=1_000_000, truncate=True)
        assert r.ok and r.body == bytes(1_000_000)
        r = client.get(srv.url("/bad.html"), gzip_ok=True)
        assert r.reason == "connection_error" and "bad gzip body" in r.detail
        for kwargs in ({}, {"truncate": True}):
            r = client.get(srv.url("/cut.txt"), gzip_ok=True, **kwargs)  # type: ignore[arg-type]
            assert r.reason == "connection_error" and "ended before its end" in r.detail
        r = client.get(srv.url("/two.html"), gzip_ok=True)
        assert r.ok and r.body == page + b"<p>2</p>"
        # a raw body cut at the cap (a page read as a prefix) may end mid-stream
        r = client.get(srv.url("/noisy.html"), gzip_ok=True, max_bytes=2_000, truncate=True)
        assert r.ok and noisy.startswith(r.body) and 0 < len(r.body) <= 2_000
    finally:
        client.close()


def test_retry_after_takes_seconds_or_an_http_date():
    from email.utils import formatdate

    from ccurate.ingest.fetch import _retry_after

    assert _retry_after("120") == 120.0 and _retry_after(" 7 ") == 7.0
    soon = _retry_after(formatdate(time.time() + 90, usegmt=True))
    assert soon is not None and 85 <= soon <= 91
    assert _retry_after(formatdate(time.time() - 90, usegmt=True)) == 0.0  # already past
    assert _retry_after("soon") is None and _retry_after("") is None and _retry_after(None) is None


def test_per_host_rate_limit(srv: TestServer):
    urls = [srv.route(f"/r{i}.jpg", img_reply()) for i in range(5)]
    t0 = time.monotonic()
    out = run(
        [rec(u) for u in urls], per_host_rate=20.0, respect_robots_txt=False, respect_tdmrep=False
    )
    assert all(s.kept for s in out)
    assert time.monotonic() - t0 >= 0.19  # 5 requests, 50 ms apart


def test_output_order_and_pickling(srv: TestServer):
    urls = [srv.route(f"/o{i}.jpg", img_reply()) for i in range(6)]
    stage = IngestStage(IngestConfig(allow_private=True, **FAST))
    stage.setup()
    try:
        clone = pickle.loads(pickle.dumps(stage))  # picklable even after setup
        out = clone.process([rec(u) for u in urls])
    finally:
        stage.teardown()
        clone.teardown()
    assert [s.url for s in out] == urls


# ----------------------------------------------------------------- HTTP errors
def test_404_is_not_retried(srv: TestServer):
    url = srv.route("/missing.jpg", Reply(404, b"nope"))
    s = one(url)
    assert s.drop_reason == "http_404"
    assert srv.hits["/missing.jpg"] == 1


def test_5xx_then_success(srv: TestServer):
    url = srv.route("/flaky.jpg", [Reply(503), Reply(502), img_reply()])
    s = one(url, retries=2)
    assert s.kept, s.drop_reason
    assert srv.hits["/flaky.jpg"] == 3


def test_5xx_gives_up_after_retries(srv: TestServer):
    url = srv.route("/down.jpg", Reply(500))
    s = one(url, retries=1)
    assert s.drop_reason == "http_500"
    assert srv.hits["/down.jpg"] == 2


def test_429_honours_retry_after(srv: TestServer):
    url = srv.route("/busy.jpg", [Reply(429, headers=[("Retry-After", "1")]), img_reply()])
    t0 = time.monotonic()
    s = one(url, backoff_base=0.01)
    assert s.kept, s.drop_reason
    assert time.monotonic() - t0 >= 0.95
    assert srv.hits["/busy.jpg"] == 2


def test_429_with_long_retry_after_gives_up_now(srv: TestServer):
    url = srv.route("/later.jpg", Reply(429, headers=[("Retry-After", "3600")]))
    t0 = time.monotonic()
    s = one(url)
    assert s.drop_reason == "http_429"
    assert time.monotonic() - t0 < 2.0
    assert srv.hits["/later.jpg"] == 1


def test_a_retry_after_pauses_the_host_even_when_its_url_gives_up(srv: TestServer):
    """The host asked every client to wait an hour: the URL that was told gives up at once,
    and the host's next URL is not requested either (it used to be sent straight away)."""
    first = srv.route("/later.jpg", Reply(429, headers=[("Retry-After", "3600")]))
    second = srv.route("/other.jpg", img_reply())
    client = HttpClient(FetchOptions(allow_private=True, retries=0, total_timeout=2.0))
    try:
        assert client.get(first).reason == "http_429"
        t0 = time.monotonic()
        r = client.get(second)
        assert not r.ok and r.reason == "timeout" and time.monotonic() - t0 < 1.0
    finally:
        client.close()
    assert srv.hits["/later.jpg"] == 1 and srv.hits.get("/other.jpg", 0) == 0


def test_redirect_chain_is_followed(srv: TestServer):
    srv.route("/r1", Reply(301, headers=[("Location", "/r2")]))
    srv.route("/r2", Reply(302, headers=[("Location", srv.url("/r3"))]))
    srv.route("/r3", Reply(307, headers=[("Location", "final.jpg")]))
    srv.route("/final.jpg", img_reply())
    s = one(srv.url("/r1"))
    assert s.kept, s.drop_reason
    assert s.url == srv.url("/r1")  # the record keeps the URL it was planned with


def test_redirect_loop(srv: TestServer):
    srv.route("/loop1", Reply(302, headers=[("Location", "/loop2")]))
    srv.route("/loop2", Reply(302, headers=[("Location", "/loop1")]))
    assert one(srv.url("/loop1")).drop_reason == "too_many_redirects"


def test_redirect_chain_too_long(srv: TestServer):
    for i in range(5):
        srv.route(f"/hop{i}", Reply(301, headers=[("Location", f"/hop{i + 1}")]))
    srv.route("/hop5", img_reply())
    assert one(srv.url("/hop0"), max_redirects=3).drop_reason == "too_many_redirects"
    assert one(srv.url("/hop0"), max_redirects=5).kept


def test_slow_headers_time_out(srv: TestServer):
    url = srv.route("/slow.jpg", img_reply(delay=1.5))
    t0 = time.monotonic()
    s = one(url, read_timeout=0.3, retries=0)
    assert s.drop_reason == "timeout"
    assert time.monotonic() - t0 < 1.4


def test_trickled_body_hits_total_timeout(srv: TestServer):
    url = srv.route("/drip.jpg", Reply(body=b"x" * 100, content_type="image/jpeg", trickle=0.05))
    t0 = time.monotonic()
    s = one(url, read_timeout=0.5, total_timeout=1.0, retries=0)
    assert s.drop_reason == "timeout"
    assert time.monotonic() - t0 < 2.5


def test_trickled_status_line_hits_total_timeout(srv: TestServer):
    head = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nX-Padding: " + b"a" * 200
    url = srv.route("/loris.jpg", Reply(raw_trickle=head, trickle=0.02))
    t0 = time.monotonic()
    s = one(url, read_timeout=0.5, total_timeout=1.0, retries=0)
    assert s.drop_reason == "timeout"
    assert time.monotonic() - t0 < 2.0


def test_body_over_cap_by_content_length(srv: TestServer):
    url = srv.route("/big.jpg", Reply(body=b"\xff" * 50_000, content_type="image/jpeg"))
    assert one(url, max_bytes=10_000).drop_reason == "too_large"


def test_body_over_cap_when_chunked(srv: TestServer):
    url = srv.route(
        "/bigc.jpg", Reply(body=b"\xff" * 300_000, content_type="image/jpeg", chunked=True)
    )
    assert one(url, max_bytes=100_000).drop_reason == "too_large"


def test_chunked_image_within_cap(srv: TestServer):
    url = srv.route("/chunked.jpg", img_reply(chunked=True))
    assert one(url).kept


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    out = one(f"http://127.0.0.1:{port}/x.jpg", retries=0)
    assert out.drop_reason == "connection_error"


def test_server_hangs_up(srv: TestServer):
    url = srv.route("/hangup.jpg", Reply(hang_up=True))
    assert one(url, retries=0).drop_reason == "connection_error"


def test_unknown_host_is_a_connection_error():
    assert one("http://no-such-host.invalid/x.jpg", retries=0).drop_reason == "connection_error"


# ----------------------------------------------------------------- content checks
def test_html_content_type_is_not_an_image(srv: TestServer):
    url = srv.route("/soft404.jpg", Reply(body=HTML, content_type="text/html"))
    assert one(url).drop_reason == "not_an_image"


def test_html_served_as_image(srv: TestServer):
    url = srv.route("/liar.jpg", Reply(body=HTML, content_type="image/jpeg"))
    assert one(url).drop_reason == "not_an_image"


def test_truncated_jpeg_is_a_decode_error(srv: TestServer):
    url = srv.route("/trunc.jpg", Reply(body=JPEG[: len(JPEG) // 3], content_type="image/jpeg"))
    assert one(url).drop_reason == "decode_error"


def test_bomb_header_is_refused(srv: TestServer):
    from tests.test_ingest_download_images import bomb_png

    url = srv.route("/bomb.png", Reply(body=bomb_png(100_000, 100_000), content_type="image/png"))
    assert one(url).drop_reason == "decompression_bomb"


def test_optional_size_filters_only_when_configured(srv: TestServer):
    url = srv.route("/tiny.jpg", Reply(body=jpeg(20, 10), content_type="image/jpeg"))
    assert one(url).kept  # default: the quality filter decides
    assert one(url, min_image_size=32).drop_reason == "image_too_small"
    assert one(url, max_aspect_ratio=1.5).drop_reason == "image_bad_aspect"


# ----------------------------------------------------------------- opt-outs
@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([("X-Robots-Tag", "noai")], "optout_x_robots_tag"),
        ([("X-Robots-Tag", "noindex, noimageai")], "optout_x_robots_tag"),
        ([("X-Robots-Tag", "ccurate: noai")], "optout_x_robots_tag"),
        (
            [("X-Robots-Tag", "otherbot: noai"), ("X-Robots-Tag", "noimageai")],
            "optout_x_robots_tag",
        ),
        ([("X-Robots-Tag", "otherbot: noai")], None),
        ([("X-Robots-Tag", "noindex")], None),
        ([("tdm-reservation", "1")], "optout_tdmrep"),
        ([("tdm-reservation", "0")], None),
    ],
)
def test_header_optouts(srv: TestServer, headers, reason):
    url = srv.route("/o.jpg", img_reply(headers=headers))
    s = one(url)
    assert s.drop_reason == reason
    assert s.kept == (reason is None)


def test_header_optouts_can_be_switched_off(srv: TestServer):
    url = srv.route(
        "/o.jpg", img_reply(headers=[("X-Robots-Tag", "noai"), ("tdm-reservation", "1")])
    )
    assert one(url, respect_x_robots_tag=False, respect_tdmrep=False).kept


def test_x_robots_parser_edge_cases():
    assert x_robots_optout(["CCurate: NoAI"], "ccurate")
    assert not x_robots_optout(
        ["unavailable_after: 25 Jun 2010 15:00:00 PST, otherbot: noai"], "ccurate"
    )
    assert x_robots_optout(["otherbot: nofollow, noai, ccurate: noimageai"], "ccurate")
    assert not x_robots_optout(["max-image-preview:large"], "ccurate")
    assert x_robots_optout(["noindex"], "ccurate", directives=["noindex"])


def test_robots_txt_disallow_is_honoured_and_cached(srv: TestServer):
    srv.route(
        "/robots.txt",
        Reply(
            body=b"User-agent: ccurate\nDisallow: /private/\n\nUser-agent: *\nDisallow: /\n",
            content_type="text/plain",
        ),
    )
    urls = [srv.route(f"/private/{i}.jpg", img_reply()) for i in range(3)]
    urls += [srv.route(f"/public/{i}.jpg", img_reply()) for i in range(3)]
    out = run([rec(u) for u in urls])
    assert [s.drop_reason for s in out[:3]] == ["optout_robots_txt"] * 3
    assert all(s.kept for s in out[3:])
    assert srv.hits["/robots.txt"] == 1
    assert not any(srv.hits[f"/private/{i}.jpg"] for i in range(3))


def test_robots_txt_for_other_bots_does_not_apply(srv: TestServer):
    srv.route(
        "/robots.txt", Reply(body=b"User-agent: otherbot\nDisallow: /\n", content_type="text/plain")
    )
    assert one(srv.route("/x.jpg", img_reply())).kept


def test_robots_txt_5xx_disallows_the_host_and_4xx_allows(srv: TestServer):
    srv.route("/robots.txt", Reply(503))
    assert one(srv.route("/x.jpg", img_reply()), retries=0).drop_reason == "optout_robots_txt"
    srv.routes["/robots.txt"] = Reply(403)
    assert one(srv.url("/x.jpg")).kept
    srv.routes["/robots.txt"] = Reply(404)
    assert one(srv.url("/x.jpg")).kept
    assert one(srv.url("/x.jpg"), respect_robots_txt=False).kept


def test_tdmrep_well_known_rules(srv: TestServer):
    srv.route(
        "/.well-known/tdmrep.json",
        Reply(
            body=b'[{"location": "/free/*", "tdm-reservation": 0},'
            b' {"location": "/tdm/*", "tdm-reservation": 1, "tdm-policy": "https://p/x"}]',
            content_type="application/json",
        ),
    )
    urls = [srv.route(f"/tdm/{i}.jpg", img_reply()) for i in range(2)]
    urls += [srv.route(f"/free/{i}.jpg", img_reply()) for i in range(2)]
    out = run([rec(u) for u in urls])
    assert [s.drop_reason for s in out] == ["optout_tdmrep", "optout_tdmrep", None, None]
    assert srv.hits["/.well-known/tdmrep.json"] == 1


def test_tdmrep_pattern_matching():
    rules = parse_tdmrep(
        b'[{"location": "/a/*.jpg$", "tdm-reservation": 1},'
        b' {"location": "/", "tdm-reservation": 0}, {"bad": 1}]'
    )
    assert tdmrep_reserved(rules, "/a/b/c.jpg")
    assert not tdmrep_reserved(rules, "/a/b/c.jpg?x=1")
    assert not tdmrep_reserved(rules, "/b/c.jpg")
    assert parse_tdmrep(b"not json") == []
    assert parse_tdmrep(b'{"location": "/"}') == []


# ----------------------------------------------------------------- SSRF guard
def test_loopback_is_refused_by_default(srv: TestServer):
    url = srv.route("/a.jpg", img_reply())
    s = one(url, allow_private=False)
    assert s.drop_reason == "ssrf_blocked"
    assert srv.hits["/a.jpg"] == 0 and srv.connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:9/x.jpg",
        "http://2130706433:9/x.jpg",  # 127.0.0.1 as a number
        "http://[::1]:9/x.jpg",
        "http://[::ffff:127.0.0.1]:9/x.jpg",
        "http://10.0.0.1/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://192.168.1.1/x.jpg",
        "http://224.0.0.1/x.jpg",
        "http://0.0.0.0/x.jpg",
    ],
)
def test_private_targets_are_blocked_without_connecting(url: str):
    with pytest.raises(Blocked) as e:
        check_url(url, Resolver(), allow_private=False)
    assert e.value.reason == "ssrf_blocked"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://x/y.jpg",
        "data:image/png;base64,AA",
        "javascript:alert(1)",
        "http:///nohost.jpg",
        "",
    ],
)
def test_bad_schemes(url: str):
    s = one(url)
    assert s.drop_reason == "bad_scheme"


def test_public_address_classification():
    assert is_public_address("8.8.8.8") and is_public_address("2606:4700:4700::1111")
    # IPv6 carrying an IPv4 address is judged by it: mapped, 6to4, NAT64 (well-known prefix)
    for a in ["::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]:
        assert is_public_address(a), a
    for a in [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.0.1",
        "169.254.1.1",
        "100.64.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:10.0.0.1",
        "239.1.1.1",
        "0.0.0.0",
        "198.18.0.1",  # benchmarking
        "2002:a00:1::",  # 6to4 of 10.0.0.1
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b:1::a00:1",  # local-use NAT64 prefix
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo
        "::127.0.0.1",  # IPv4-compatible (deprecated)
        "fec0::1",  # site-local (deprecated; Python calls it global)
        "fe80::1%eth0",  # with a zone
    ]:
        assert not is_public_address(a), a


class _FixedResolver(Resolver):
    """Answers from a table: the guard's decisions without DNS."""

    def __init__(self, table: dict[str, tuple[str, ...]]) -> None:
        super().__init__()
        self.table = table

    def resolve(self, host: str, port: int) -> tuple[str, ...]:
        return self.table[host]


def test_check_url_vets_every_address_and_normalises_the_request_target():
    res = _FixedResolver({
        "pics.example": ("93.184.216.34",),
        "mixed.example": ("93.184.216.34", "10.0.0.5"),  # one private answer is enough
        "lab.example": ("10.20.0.7",),
        "xn--bcher-kva.example": ("93.184.216.34",),
        "none.example": (),
    })  # fmt: skip
    t = check_url("HTTP://Pics.Example./a b/é.jpg?q=1 2", res)
    assert (t.scheme, t.host, t.port) == ("http", "pics.example", 80)
    assert t.path == "/a%20b/%C3%A9.jpg?q=1%202" and t.addresses == ("93.184.216.34",)
    assert check_url("https://bücher.example/x", res).host == "xn--bcher-kva.example"
    with pytest.raises(Blocked, match=r"non-public 10\.0\.0\.5") as e:
        check_url("http://mixed.example/x.jpg", res)
    assert e.value.reason == "ssrf_blocked"
    # a narrow opt-in network admits the lab host, nothing else private
    lab = parse_networks(["10.20.0.0/16"])
    assert check_url("http://lab.example/x", res, allow_networks=lab).addresses == ("10.20.0.7",)
    with pytest.raises(Blocked):
        check_url("http://mixed.example/x", res, allow_networks=lab)
    assert check_url("http://mixed.example/x", res, allow_private=True).port == 80
    with pytest.raises(OSError, match="no address"):
        check_url("http://none.example/", res)
    for bad in ["http://pics.example:99999/", "http://[::1/", "http://xn--a.\udcff/"]:
        with pytest.raises(Blocked) as e:
            check_url(bad, res)
        assert e.value.reason == "bad_scheme", bad


def test_resolver_caches_answers_and_failures(monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []

    def fake(host: str, port: int, type: int = 0) -> list[Any]:
        calls.append(host)
        if host == "dead.example":
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port))] * 2

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    r = Resolver(ttl=60, negative_ttl=60)
    assert r.resolve("ok.example", 80) == ("93.184.216.34",) == r.resolve("ok.example", 80)
    for _ in range(3):
        with pytest.raises(socket.gaierror):
            r.resolve("dead.example", 80)
    assert calls == ["ok.example", "dead.example"]  # one lookup each, failures cached too


def test_redirect_to_private_address_is_blocked(srv: TestServer):
    # loopback allowed as a narrow opt-in; the redirect hop to 10.0.0.1 is still refused
    srv.route("/go", Reply(302, headers=[("Location", "http://10.0.0.1/secret.jpg")]))
    srv.route("/meta", Reply(302, headers=[("Location", "http://169.254.169.254/latest/")]))
    srv.route("/file", Reply(302, headers=[("Location", "file:///etc/passwd")]))
    out = run(
        [rec(srv.url("/go")), rec(srv.url("/meta")), rec(srv.url("/file"))],
        allow_private=False,
        allow_networks=["127.0.0.0/8"],
    )
    assert [s.drop_reason for s in out] == ["ssrf_blocked", "ssrf_blocked", "bad_scheme"]


# ----------------------------------------------------------------- pages
def _page(body: str) -> bytes:
    return f"<!doctype html><html><head><title>P</title></head><body>{body}</body></html>".encode()


def test_page_expands_into_its_images(srv: TestServer):
    srv.route("/img/ok.jpg", img_reply())
    page = srv.route(
        "/p.html",
        Reply(
            body=_page(
                '<img src="/img/ok.jpg" alt="a red thing"><img src="img/missing.jpg" alt="gone">'
                '<img src="/img/ok.jpg" alt="twice">'
            ),
            content_type="text/html; charset=utf-8",
        ),
    )
    pr = page_rec(page)
    pr.extra["source"] = "test-list"
    out = run([pr])
    assert len(out) == 2
    ok, missing = out
    assert ok.kept and ok.url == srv.url("/img/ok.jpg") and ok.alt_text == "a red thing"
    assert ok.page_url == page and ok.extra.get("source") == "test-list"
    assert missing.drop_reason == "http_404"
    assert_documented(out)


@pytest.mark.parametrize(
    ("head", "reason"),
    [
        ('<meta name="robots" content="noai, noimageai">', "optout_meta_robots"),
        ('<meta name="ccurate" content="noimageai">', "optout_meta_robots"),
        ('<meta name="tdm-reservation" content="1">', "optout_tdmrep"),
        ('<meta name="otherbot" content="noai">', None),
    ],
)
def test_page_meta_optouts(srv: TestServer, head: str, reason: str | None):
    srv.route("/img/ok.jpg", img_reply())
    body = f'<!doctype html><html><head>{head}</head><body><img src="/img/ok.jpg"></body></html>'
    page = srv.route("/m.html", Reply(body=body.encode(), content_type="text/html"))
    out = run([page_rec(page)])
    assert len(out) == 1
    assert out[0].drop_reason == reason
    if reason is not None:
        assert out[0].url == page and srv.hits["/img/ok.jpg"] == 0


def test_page_header_optouts_and_failures(srv: TestServer):
    srv.route("/img/ok.jpg", img_reply())
    body = _page('<img src="/img/ok.jpg">')
    pages = [
        srv.route(
            "/xr.html",
            Reply(body=body, content_type="text/html", headers=[("X-Robots-Tag", "noai")]),
        ),
        srv.route(
            "/tdm.html",
            Reply(body=body, content_type="text/html", headers=[("tdm-reservation", "1")]),
        ),
        srv.route("/gone.html", Reply(410, b"gone")),
        srv.route("/notpage.html", Reply(body=JPEG, content_type="image/jpeg")),
        srv.route("/empty.html", Reply(body=_page("<p>no images</p>"), content_type="text/html")),
    ]
    out = run([page_rec(p) for p in pages])
    assert [s.drop_reason for s in out] == [
        "optout_x_robots_tag",
        "optout_tdmrep",
        "http_410",
        "page_error",
        "page_no_images",
    ]
    assert [s.url for s in out] == pages
    assert srv.hits["/img/ok.jpg"] == 0
    assert_documented(out)


def test_mixed_batch_every_input_has_one_status(srv: TestServer):
    srv.route("/img/ok.jpg", img_reply())
    page = srv.route(
        "/p.html", Reply(body=_page('<img src="/img/ok.jpg">'), content_type="text/html")
    )
    records = [
        rec(srv.route("/a.jpg", img_reply())),
        page_rec(page),
        rec(srv.url("/nothing.jpg")),
        rec("ftp://x/y"),
    ]
    out = run(records)
    assert [s.drop_reason for s in out] == [None, None, "http_404", "bad_scheme"]
    assert out[1].page_url == page


def test_prefetched_bytes_skip_the_network():
    s = rec("http://example.invalid/x.jpg")
    s.image = JPEG
    out = run([s], allow_private=False)
    assert out[0].kept and out[0].width == 85


# ----------------------------------------------------------------- retry planning
def test_plan_retry_replans_only_transient_failures(srv: TestServer, tmp_path):
    srv.route("/good.jpg", img_reply())
    srv.route("/flaky.jpg", Reply(503))
    srv.route("/gone.jpg", Reply(404))
    srv.route("/slow.jpg", img_reply(delay=1.0))
    flaky_page = srv.route("/fp.html", Reply(500))
    records = [rec(srv.url(p)) for p in ("/good.jpg", "/flaky.jpg", "/gone.jpg", "/slow.jpg")]
    records.append(page_rec(flaky_page))
    write_partition(tmp_path / "in" / "shard-00000", records)
    stage = IngestStage(
        IngestConfig(allow_private=True, **{**FAST, "retries": 0, "read_timeout": 0.3})
    )
    stage.setup()
    try:
        run_task(
            stage,
            ShardTask(str(tmp_path / "in" / "shard-00000"), str(tmp_path / "out" / "shard-00000")),
        )
        dropped = {
            r["url"]: r["drop_reason"]
            for r in read_dropped(tmp_path / "out" / "shard-00000").to_pylist()
        }
        assert dropped == {
            srv.url("/flaky.jpg"): "http_503",
            srv.url("/gone.jpg"): "http_404",
            srv.url("/slow.jpg"): "timeout",
            flaky_page: "http_500",
        }
        retry = plan_retry(tmp_path / "out")
        assert sorted(s.url for s in retry) == sorted(
            [srv.url("/flaky.jpg"), srv.url("/slow.jpg"), flaky_page]
        )
        assert all(s.kept and s.image is None and s.drop_reason is None for s in retry)
        assert {s.url: s.mime for s in retry}[flaky_page] == "text/html"
        # the server recovers; the retry run downloads only the failures
        srv.routes["/flaky.jpg"] = img_reply()
        srv.routes["/slow.jpg"] = img_reply()
        srv.routes["/fp.html"] = Reply(
            body=_page('<img src="/good.jpg">'), content_type="text/html"
        )
        good_hits = srv.hits["/good.jpg"]
        write_partition(tmp_path / "in" / "shard-retry-00000", retry)
        time.sleep(0.02)  # distinct marker times
        run_task(
            stage,
            ShardTask(
                str(tmp_path / "in" / "shard-retry-00000"),
                str(tmp_path / "out" / "shard-retry-00000"),
            ),
        )
    finally:
        stage.teardown()
    kept = read_index(tmp_path / "out" / "shard-retry-00000").column("url").to_pylist()
    assert sorted(kept) == sorted(
        [srv.url("/flaky.jpg"), srv.url("/slow.jpg"), srv.url("/good.jpg")]
    )
    assert srv.hits["/good.jpg"] == good_hits + 1  # once, as the retried page's image
    assert plan_retry(tmp_path / "out") == []


def test_transient_classification():
    for r in ["timeout", "connection_error", "http_429", "http_503", "http_500", "http_408"]:
        assert is_transient(r), r
    for bad in ["http_404", "http_403", "optout_robots_txt", "not_an_image", None, "http_5"]:
        assert not is_transient(bad), bad


def test_images_decode_on_a_few_threads_not_on_every_fetch_thread(
    srv: TestServer, monkeypatch: pytest.MonkeyPatch
):
    import ccurate.ingest.stage as stage_mod

    urls = [srv.route(f"/d{i}.jpg", img_reply()) for i in range(12)]
    names: set[str] = set()
    busy = [0, 0]  # now, most at once
    lock = threading.Lock()
    real = stage_mod.process_image

    def spy(*args, **kw):
        with lock:
            names.add(threading.current_thread().name.split("_")[0])
            busy[0] += 1
            busy[1] = max(busy)
        try:
            time.sleep(0.01)
            return real(*args, **kw)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(stage_mod, "process_image", spy)
    pooled = run([rec(u) for u in urls], threads=6, decode_threads=2)
    assert names == {"decode"} and busy[1] <= 2
    names.clear()
    inline = run([rec(u) for u in urls], threads=6, decode_threads=6)  # as many: no hand-over
    assert names == {"ingest"}
    assert pooled == inline
    assert all(s.kept and s.phash for s in pooled)
