"""Machine-readable opt-outs: X-Robots-Tag, TDMRep and robots.txt, checked before we keep a byte.

What counts as an opt-out (all on by default, each can be switched off in
`IngestConfig`, and each recorded as its own drop reason):

- `X-Robots-Tag` response header with `noai` or `noimageai` (configurable
  list), either for every bot (`X-Robots-Tag: noai`) or for our token
  (`X-Robots-Tag: ccurate: noai`); directives addressed to another bot
  (`otherbot: noai`) do not apply to us. -> `optout_x_robots_tag`
- TDMRep (W3C TDM Reservation Protocol): a `tdm-reservation: 1` response
  header, a `<meta name="tdm-reservation" content="1">` in the page (found by
  `ingest.html`), or a matching rule with `"tdm-reservation": 1` in the
  origin's `/.well-known/tdmrep.json` (fetched once per origin, cached for the
  run). Rules are tried in file order and the first whose `location` pattern
  matches decides; patterns use robots.txt syntax (`*` any run, trailing `$`
  end of path). -> `optout_tdmrep`
- robots.txt for our user-agent token, fetched once per origin and cached
  (`urllib.robotparser`, which applies the first matching rule of the
  group; a group is ours when its user-agent is our token, case-insensitive,
  never merely a part of it, as RFC 9309 says). As Google does: 2xx is
  parsed; any 4xx means there is no robots.txt (everything allowed); 429
  and 5xx mean "disallow everything on this host for this run". If
  robots.txt cannot be reached at all (timeout, connection error) the
  host's URLs take that transient reason, so a retry run picks them up;
  so do they when the origin's policy files cannot be processed at all
  (fail closed, `connection_error`). A body that ends before its
  Content-Length is a connection error, never a shorter file.
  The body is read up to 512 KiB, like Google. ->
  `optout_robots_txt`
"""

from __future__ import annotations

import json
import re
import threading
import urllib.robotparser
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from ccurate.ingest.config import IngestConfig
    from ccurate.ingest.fetch import HttpClient

# valued robots directives whose ":" is not a user-agent prefix
_VALUED_DIRECTIVES = {
    "unavailable_after",
    "max-snippet",
    "max-image-preview",
    "max-video-preview",
}
_UA_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
ROBOTS_MAX_BYTES = 512 * 1024
TDMREP_MAX_BYTES = 256 * 1024


def x_robots_optout(
    values: Iterable[str], token: str, directives: Iterable[str] = ("noai", "noimageai")
) -> bool:
    """True if any X-Robots-Tag header value opts out of AI use for everyone or for `token`.

    Handles several header lines, comma-separated directives and the
    `botname: directive, directive` form (the bot name applies to the
    directives that follow it in the same header value).
    """
    wanted = {d.lower() for d in directives}
    me = token.lower()
    for value in values:
        current: str | None = None  # None: applies to every bot
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                continue
            if ":" in item:
                head, rest = item.split(":", 1)
                head = head.strip().lower()
                if head in _VALUED_DIRECTIVES:
                    continue
                if not _UA_NAME.match(head):
                    continue  # e.g. the time of an unavailable_after date
                current = head
                item = rest.strip()
                if not item:
                    continue
            if item.lower() in wanted and (current is None or current == me):
                return True
    return False


def tdm_header_reserved(headers: Mapping[str, list[str]]) -> bool:
    """A `tdm-reservation: 1` response header reserves TDM rights (TDMRep HTTP technique)."""
    return any(v.strip() == "1" for v in headers.get("tdm-reservation", []))


@dataclass(frozen=True)
class TdmRule:
    """One tdmrep.json entry: a robots.txt-style `location` pattern and its reservation."""

    location: str  # '*' any run, trailing '$' end of path
    reserved: bool

    def matches(self, path: str) -> bool:
        """Glob match in O(len(path) x len(pattern)), never by regex: a hostile file's
        `/a*a*a*...b` costs a backtracking regex exponential time on a long path."""
        pattern = self.location
        anchored = pattern.endswith("$")
        parts = (pattern[:-1] if anchored else pattern).split("*")
        head, rest = parts[0], parts[1:]
        if not path.startswith(head):
            return False
        if not rest:
            return not anchored or path == head
        pos = len(head)
        last = rest[-1]
        for part in rest[:-1]:  # leftmost match of each middle literal is always safe
            found = path.find(part, pos)
            if found < 0:
                return False
            pos = found + len(part)
        if anchored:
            return len(path) - len(last) >= pos and path.endswith(last)
        return path.find(last, pos) >= 0


def parse_tdmrep(body: bytes) -> list[TdmRule]:
    """Rules of a `/.well-known/tdmrep.json` file; malformed files or entries give no rules."""
    try:
        data = json.loads(body.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[..." nests past the stack
        return []
    if not isinstance(data, list):
        return []
    rules: list[TdmRule] = []
    for entry in data:
        if not isinstance(entry, dict) or "location" not in entry:
            continue
        loc = str(entry["location"])
        if loc.startswith(("http://", "https://")):
            loc = urlsplit(loc).path or "/"
        if not loc.startswith(("/", "*")):
            loc = "/" + loc
        value = entry.get("tdm-reservation", 0)
        # JSON 1 and 1.0 are one number; "1" and true are common spellings of it
        reserved = value == 1 or str(value).strip().lower() in ("1", "true")
        rules.append(TdmRule(loc, reserved))
    return rules


def tdmrep_reserved(rules: list[TdmRule], path: str) -> bool:
    """First rule whose location matches `path` (path + query) decides."""
    for rule in rules:
        if rule.matches(path):
            return rule.reserved
    return False


@dataclass(frozen=True)
class PolicyFetch:
    """What fetching a policy file gave: the final status and body, or a failure reason."""

    status: int | None
    body: bytes = b""
    reason: str | None = None  # set when no HTTP status was obtained (timeout, ...)


def header_optout(headers: Mapping[str, list[str]], c: IngestConfig) -> str | None:
    """The opt-out a response's headers declare (X-Robots-Tag, TDMRep), as the config honours."""
    if c.respect_x_robots_tag and x_robots_optout(
        headers.get("x-robots-tag", []), c.robots_token, c.optout_directives
    ):
        return "optout_x_robots_tag"
    if c.respect_tdmrep and tdm_header_reserved(headers):
        return "optout_tdmrep"
    return None


def fetch_policy_file(client: HttpClient, url: str, max_bytes: int) -> PolicyFetch:
    """GET robots.txt or tdmrep.json with the ingest client (truncated, gzip allowed)."""
    res = client.get(
        url,
        accept="text/plain,application/json,*/*;q=0.5",
        max_bytes=max_bytes,
        truncate=True,
        gzip_ok=True,
    )
    if res.ok:
        return PolicyFetch(res.status, res.body)
    if res.status is not None and res.reason == f"http_{res.status}":
        return PolicyFetch(res.status)
    return PolicyFetch(None, reason=res.reason)


def open_client(
    c: IngestConfig, threads: int, on_policy: Callable[[str, PolicyFetch], None] | None = None
) -> tuple[HttpClient, OriginPolicies]:
    """The ingest HTTP client and the per-origin opt-out policies fetched through it (what
    ingest and the opt-out re-check both need); `on_policy` sees every policy-file fetch."""
    from ccurate.ingest.fetch import FetchOptions, HttpClient

    client = HttpClient(FetchOptions.from_config(c, threads))

    def fetch(url: str, max_bytes: int) -> PolicyFetch:
        got = fetch_policy_file(client, url, max_bytes)
        if on_policy is not None:
            on_policy(url, got)
        return got

    policies = OriginPolicies(fetch, c.robots_token, c.respect_robots_txt, c.respect_tdmrep)
    return client, policies


@dataclass
class _OriginPolicy:
    ready: threading.Event
    robots: urllib.robotparser.RobotFileParser | None = None
    robots_all: bool | None = None  # True allow all, False disallow all, None: parsed
    unreachable: str | None = None  # transient reason when robots.txt could not be fetched
    tdm_rules: list[TdmRule] | None = None


def _exact_agents(parser: urllib.robotparser.RobotFileParser, token: str) -> None:
    """Keep only the groups named for our product token (RFC 9309: case-insensitive, the
    name before any '/version'). robotparser would apply a group to every agent whose name
    *contains* the group's ('User-agent: rat' to 'ccurate'), so a group meant for another
    bot could allow what `User-agent: *` disallows for us."""
    me = token.strip().lower()
    for entry in getattr(parser, "entries", []):
        ours = any(a.split("/")[0].strip().lower() == me for a in entry.useragents)
        entry.useragents = [me] if ours else []


_UNUSED_ROBOTS_FIELDS = frozenset({"crawl-delay", "request-rate"})


def _robots_lines(body: bytes) -> list[str]:
    """robots.txt lines for robotparser, less the rate fields we never read: robotparser
    int()s them after `isdigit()`, so `Crawl-delay: ²` or a 5000-digit delay raises."""
    return [
        line
        for line in body.decode("utf-8", "replace").splitlines()
        if line.split("#", 1)[0].split(":", 1)[0].strip().lower() not in _UNUSED_ROBOTS_FIELDS
    ]


PolicyFetcher = Callable[[str, int], PolicyFetch]
"""`fetch(url, max_bytes) -> PolicyFetch`, supplied by the HTTP client (redirects, SSRF guard)."""


class OriginPolicies:
    """Per-origin robots.txt and tdmrep.json, fetched once (single-flight) and cached for the run.

    Thread-safe: the first thread that needs an origin fetches its files;
    the others wait for it instead of fetching again.
    """

    def __init__(
        self,
        fetch: PolicyFetcher,
        token: str,
        robots: bool = True,
        tdmrep: bool = True,
        max_origins: int = 200_000,
    ) -> None:
        self.fetch = fetch
        self.token = token
        self.robots = robots
        self.tdmrep = tdmrep
        self.max_origins = max_origins
        self._lock = threading.Lock()
        self._origins: dict[str, _OriginPolicy] = {}
        self.fetches = 0

    def check(self, origin: str, path: str) -> str | None:
        """Drop reason for fetching `origin` + `path`, or None if allowed."""
        if not (self.robots or self.tdmrep):
            return None
        pol = self._get(origin)
        if pol.unreachable is not None:
            return pol.unreachable
        if self.robots:
            if pol.robots_all is False:
                return "optout_robots_txt"
            if pol.robots is not None and not pol.robots.can_fetch(self.token, origin + path):
                return "optout_robots_txt"
        if self.tdmrep and pol.tdm_rules and tdmrep_reserved(pol.tdm_rules, path):
            return "optout_tdmrep"
        return None

    def _get(self, origin: str) -> _OriginPolicy:
        with self._lock:
            pol = self._origins.get(origin)
            mine = pol is None
            if pol is None:
                if len(self._origins) >= self.max_origins:
                    self._origins.clear()
                pol = _OriginPolicy(threading.Event())
                self._origins[origin] = pol
        if mine:
            try:
                self._load(origin, pol)
            except Exception:
                # fail closed: an empty policy would let every URL of the origin through
                # while the first caller's batch died; this way a retry run tries again
                pol.unreachable = "connection_error"
            finally:
                pol.ready.set()
        else:
            pol.ready.wait()
        return pol

    def _load(self, origin: str, pol: _OriginPolicy) -> None:
        if self.robots:
            self.fetches += 1
            got = self.fetch(origin + "/robots.txt", ROBOTS_MAX_BYTES)
            if got.status is None:
                if got.reason in ("timeout", "connection_error"):
                    pol.unreachable = got.reason
                else:  # blocked redirect, bad body...: as if there were no robots.txt
                    pol.robots_all = True
            elif 200 <= got.status < 300:
                parser = urllib.robotparser.RobotFileParser()
                parser.parse(_robots_lines(got.body))
                _exact_agents(parser, self.token)
                pol.robots = parser
            elif got.status == 429 or got.status >= 500:
                pol.robots_all = False
            else:  # 3xx left after redirects, 4xx: no robots.txt
                pol.robots_all = True
        if self.tdmrep and pol.unreachable is None:
            self.fetches += 1
            got = self.fetch(origin + "/.well-known/tdmrep.json", TDMREP_MAX_BYTES)
            if got.status is not None and 200 <= got.status < 300:
                pol.tdm_rules = parse_tdmrep(got.body)
            else:
                pol.tdm_rules = []
