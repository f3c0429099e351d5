"""SSRF guard: decide which addresses a URL may be fetched from, before connecting.

A crawler that follows URLs from the web must not be steered into the
operator's own network (cloud metadata at 169.254.169.254, admin panels on
10.x, services on localhost). We resolve the host name ourselves, refuse it if
*any* of its addresses is private, loopback, link-local, multicast, reserved or
unspecified (a name with one public and one private record is a rebinding
trick), and hand the checked addresses to the HTTP client, which connects to
exactly those: the name is never resolved a second time, so there is no
time-of-check/time-of-use gap. Every redirect hop goes through the same check.

`allow_private=True` (tests, the loopback demo, the benchmark) skips the
address check but keeps the scheme check and still pins the connection to the
resolved address. `allow_networks` is the narrower opt-in: only the listed
CIDRs (e.g. `127.0.0.0/8` for a loopback demo) are let through, every other
non-public address is still refused.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}


class Blocked(Exception):
    """The URL may not be fetched; `reason` is an ingest drop reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    """A URL split into what the client needs, with the addresses it may connect to."""

    url: str
    scheme: str
    host: str  # lower-case host name or literal, without brackets
    port: int
    path: str  # path + query, never empty
    addresses: tuple[str, ...]

    @property
    def origin(self) -> str:
        default = DEFAULT_PORTS[self.scheme]
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}" + ("" if self.port == default else f":{self.port}")

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052's well-known prefix


def is_public_address(addr: str) -> bool:
    """True for globally routable unicast addresses.

    IPv6 that carries an IPv4 address is judged by that address: IPv4-mapped, 6to4 and
    NAT64 (`64:ff9b::10.0.0.1` reaches 10.0.0.1 through a DNS64/NAT64 gateway; a public
    one is fetched, as IPv6-only hosts must). Site-local `fec0::/10` is refused, though
    Python counts it as global."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            ip = ip.sixtofour
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        elif ip.is_site_local:
            return False
    return bool(
        ip.is_global
        and not ip.is_multicast
        and not ip.is_private
        and not ip.is_loopback
        and not ip.is_link_local
        and not ip.is_reserved
        and not ip.is_unspecified
    )


def split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) or `Blocked('bad_scheme')` for anything but http(s)."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        if scheme not in ALLOWED_SCHEMES:
            raise Blocked("bad_scheme", f"scheme {scheme!r} in {url[:100]!r}")
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as e:  # bad port, bad IPv6 literal
        raise Blocked("bad_scheme", f"unparsable URL {url[:100]!r}: {e}") from None
    if not host:
        raise Blocked("bad_scheme", f"no host in {url[:100]!r}")
    try:
        host = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise Blocked("bad_scheme", f"bad host name in {url[:100]!r}") from None
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    # requote spaces and non-ASCII so the request line stays valid
    if _UNQUOTED.search(path):
        path = "".join(c if 33 <= ord(c) < 127 else _pct(c) for c in path)
    return scheme, host.lower(), port, path


_UNQUOTED = re.compile(r"[^\x21-\x7e]")  # what a request line cannot carry as is


def _pct(c: str) -> str:
    return "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))


class Resolver:
    """getaddrinfo with a small TTL cache, shared by the threads of one worker.

    Failures are cached briefly too, so a batch with a thousand URLs on a
    dead host costs one lookup, not a thousand. Threads asking for a name that
    is being looked up wait for that lookup instead of starting their own, and
    nobody waits longer than `timeout`: the system resolver has no deadline of
    its own that we control (glibc retries for up to 30 s), so each lookup runs
    in a daemon thread, and a lookup past the deadline fails as a cached
    `TimeoutError` while it finishes in the background.
    """

    def __init__(
        self, ttl: float = 300.0, negative_ttl: float = 30.0, timeout: float = 10.0
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.timeout = timeout
        self._cache: dict[tuple[str, int], tuple[float, tuple[str, ...] | OSError]] = {}
        self._inflight: dict[tuple[str, int], Future[tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def resolve(self, host: str, port: int) -> tuple[str, ...]:
        try:  # an IP literal needs no lookup (nor a thread to wait on one)
            return (str(ipaddress.ip_address(host)),)
        except ValueError:
            pass
        key = (host, port)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                if isinstance(hit[1], OSError):
                    raise hit[1]
                return hit[1]
            fut = self._inflight.get(key)
            if fut is None:
                fut = self._inflight[key] = Future()
                threading.Thread(target=self._lookup, args=(key, fut), daemon=True).start()
        try:
            return fut.result(timeout=self.timeout)
        except FutureTimeout:
            err = TimeoutError(f"lookup of {host} took over {self.timeout:g} s")
            self._store(key, err)
            raise err from None

    def _lookup(self, key: tuple[str, int], fut: Future[tuple[str, ...]]) -> None:
        try:
            infos = socket.getaddrinfo(key[0], key[1], type=socket.SOCK_STREAM)
        except OSError as e:  # gaierror is an OSError
            self._store(key, e, fut)
            fut.set_exception(e)
            return
        except BaseException as e:  # UnicodeError from the IDNA codec, ...: the caller sees it
            with self._lock:
                self._inflight.pop(key, None)
            fut.set_exception(e)
            return
        addrs = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
        self._store(key, addrs, fut)
        fut.set_result(addrs)

    def _store(
        self,
        key: tuple[str, int],
        answer: tuple[str, ...] | OSError,
        done: Future[tuple[str, ...]] | None = None,
    ) -> None:
        ttl = self.negative_ttl if isinstance(answer, OSError) else self.ttl
        with self._lock:
            if done is not None and self._inflight.get(key) is done:
                del self._inflight[key]
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[key] = (time.monotonic() + ttl, answer)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: list[str] | tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def _allowed(addr: str, networks: tuple[Network, ...]) -> bool:
    if is_public_address(addr):
        return True
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    return any(ip.version == n.version and ip in n for n in networks)


def check_url(
    url: str,
    resolver: Resolver,
    allow_private: bool = False,
    allow_networks: tuple[Network, ...] = (),
) -> Target:
    """Parse, resolve and vet one URL; raises `Blocked` or `OSError` (DNS failure).

    Returns the addresses the client must connect to (public ones, or in
    `allow_networks`, unless `allow_private`).
    """
    scheme, host, port, path = split_url(url)
    addrs = resolver.resolve(host, port)
    if not addrs:
        raise OSError(f"no address for {host}")
    if not allow_private:
        bad = [a for a in addrs if not _allowed(a, allow_networks)]
        if bad:
            raise Blocked("ssrf_blocked", f"{host} resolves to non-public {bad[0]}")
    return Target(url, scheme, host, port, path, addrs)
