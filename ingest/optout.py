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
- robots.txt for our user-agent token, fetched once per origin and cached,
  read as RFC 9309 says (not `urllib.robotparser`'s 1996 draft, which misses
  wildcard and longest-match opt-outs): the rules of every group whose
  user-agent is our product token (case-insensitive, never merely a part of
  it) are merged, else those of every `*` group; `*` and a trailing `$` are
  wildcards (`%2A` and `%24` match a literal `*` and `$`); the longest
  matching pattern wins and Allow wins a tie; paths and patterns are
  compared percent-decoded then re-encoded; Google's leniencies are kept
  (the `useragent` key, a missing colon, `ccurate (+url)` as our product
  token: all fail closed); `/robots.txt`
  itself is always allowed; a leading BOM is skipped. As Google does: 2xx is
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

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
_DIRECTIVE_SEP = re.compile(r"[\s;]+")
ROBOTS_MAX_BYTES = 512 * 1024
TDMREP_MAX_BYTES = 256 * 1024


def x_robots_optout(
    values: Iterable[str], token: str, directives: Iterable[str] = ("noai", "noimageai")
) -> bool:
    """True if any X-Robots-Tag header value opts out of AI use for everyone or for `token`.

    Handles several header lines, comma-separated directives and the
    `botname: directive, directive` form (the bot name applies to the
    directives that follow it in the same header value). Directives are also
    split on whitespace and `;`, as `<meta name=robots>` is read: the header
    is comma-separated by spec, but a mis-separated opt-out is still one.
    """
    wanted = {d.lower() for d in directives}
    me = token.lower()
    for value in values:
        current: str | None = None  # None: applies to every bot
        for raw in value.split(","):
            item = raw.strip()
            if ":" in item:
                head, rest = item.split(":", 1)
                head = head.strip().lower()
                if head not in _VALUED_DIRECTIVES:
                    if not _UA_NAME.match(head):
                        continue  # e.g. the time of an unavailable_after date
                    current = head
                item = rest  # the directives after `bot:`; a valued one's value, scanned too
            # 'noindex noai' and 'noindex;noai' as <meta name=robots> reads them (fail closed)
            words = _DIRECTIVE_SEP.split(item.lower())
            if wanted.intersection(words) and (current is None or current == me):
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
        return glob_match(self.location, path)


def glob_match(pattern: str, path: str) -> bool:
    """robots.txt-style match (`*` any run, trailing `$` end of path) in O(len(path) x
    len(pattern)), never by regex: a hostile file's `/a*a*a*...b` costs a backtracking
    regex exponential time on a long path."""
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


# Google's accepted misspellings: honouring a misspelt opt-out costs nothing (fail closed)
_DISALLOW_KEYS = frozenset({"disallow", "dissallow", "dissalow", "disalow", "diasllow", "disallaw"})
_USER_AGENT_KEYS = frozenset({"user-agent", "useragent", "user agent"})
# what a robots.txt pattern and a path keep unescaped after decoding, so both compare alike;
# `*` and `$` are not among them: in a path (and `%2A`/`%24` in a pattern) they are literal
# characters, kept escaped so that they never act as a wildcard or an end anchor
_ROBOTS_SAFE = "/?=&;:@!'()+,"
_LITERAL_ESCAPE = re.compile(r"(%2[aA]|%24)")
_UA_TOKEN_CHAR = re.compile(r"[a-z_-]")  # Google's product token: the leading [A-Za-z_-]+


def _robots_norm(text: str, pattern: bool = False) -> str:
    """Percent-decode, then re-encode all but `_ROBOTS_SAFE`: `/%7Ejoe` and `/~joe`, `/é` and
    `/%C3%A9` compare equal, on both sides of the match. `%2A` and `%24` stay escaped (RFC
    9309 2.2.3: they match a literal `*`/`$`), and so do a literal `*` and `$` of a path;
    a `pattern` keeps its `*` wildcards and its trailing `$` end anchor (any other `$` is
    literal)."""
    anchored = pattern and text.endswith("$")
    if anchored:
        text = text[:-1]
    safe = _ROBOTS_SAFE + ("*" if pattern else "")
    parts = _LITERAL_ESCAPE.split(text)
    out = "".join(
        part.upper() if i % 2 else quote(unquote(part), safe=safe) for i, part in enumerate(parts)
    )
    return out + "$" if anchored else out


def _robots_line(line: str) -> tuple[str, str] | None:
    """(lower-case key, value) of one robots.txt line, comment dropped; None if it has none.
    As Google's parser: `key: value`, or `key value` (a forgotten colon) when the line is
    exactly two words, which is also tried when the text before a colon is no known key."""
    line = line.split("#", 1)[0].strip()
    key, sep, value = line.partition(":")
    key = " ".join(key.split()).lower()
    if sep and (key in _USER_AGENT_KEYS or key == "allow" or key in _DISALLOW_KEYS):
        return key, value.strip()
    words = line.split()
    if len(words) == 2:
        return words[0].lower(), words[1]
    return (key, value.strip()) if sep else None


def _names_us(agent: str, me: str) -> bool:
    """A user-agent value names the product `me` (lower-case): it starts with it and the
    product token does not go on (Google: the token is the leading `[A-Za-z_-]+` run), so
    `ccurate/1.0`, `ccurate*` and `ccurate (+https://...)` are ours, `ccurate-bot` and
    `ccuratex` are other bots."""
    agent = agent.lower()
    return agent.startswith(me) and not _UA_TOKEN_CHAR.match(agent[len(me) : len(me) + 1])


@dataclass(frozen=True)
class RobotsRules:
    """The Allow/Disallow rules robots.txt sets for our token (RFC 9309 section 2.2)."""

    # (normalised pattern, allow), longest pattern first, Allow first among equals
    rules: tuple[tuple[str, bool], ...] = ()

    @classmethod
    def of(cls, rules: Iterable[tuple[str, bool]]) -> RobotsRules:
        """Rules in the order `allows` needs (the first match is then the deciding one)."""
        unique = set(rules)
        return cls(tuple(sorted(unique, key=lambda r: (-len(r[0]), not r[1], r[0]))))

    def allows(self, path: str) -> bool:
        """The longest matching pattern decides, Allow on a tie (RFC 9309 2.2.2); no match
        allows; `/robots.txt` is always allowed."""
        path = _robots_norm(path)
        if path.split("?", 1)[0] == "/robots.txt":
            return True
        for pattern, rule_allows in self.rules:
            if glob_match(pattern, path):
                return rule_allows
        return True


def parse_robots(body: bytes, token: str) -> RobotsRules:
    """The rules of robots.txt for the product `token` (RFC 9309 2.1-2.2.1).

    A group is one or more consecutive user-agent lines and the rules up to the next
    user-agent line after a rule (blank and other lines end nothing). The rules of all
    groups naming `token` (case-insensitive, as Google reads the product token: `ccurate/1.0`
    and `ccurate (+url)` name it, `ccurate-bot` does not) are merged, else those of all `*`
    groups. An empty Disallow is no rule. Google's leniencies are kept (fail closed): the
    `useragent` and `user agent` keys, misspelt Disallow keys, and a missing colon.
    """
    me = token.strip().lower()
    mine: list[tuple[str, bool]] = []
    anyone: list[tuple[str, bool]] = []
    ours = star = named = in_rules = False
    text = body.decode("utf-8", "replace").removeprefix("\ufeff")
    for line in text.splitlines():
        got = _robots_line(line)
        if got is None:
            continue
        key, value = got
        if key in _USER_AGENT_KEYS:
            if in_rules:  # a user-agent after rules starts the next group
                ours = star = in_rules = False
            us = bool(me) and _names_us(value, me)
            ours = ours or us
            star = star or value == "*" or (value[:1] == "*" and value[1:2].isspace())
            named = named or us
            continue
        allow = key == "allow"
        if not (allow or key in _DISALLOW_KEYS):
            continue  # sitemap, crawl-delay, ...: no rule, and no group boundary
        in_rules = True
        if not value or not (ours or star):
            continue  # empty pattern: no rule; a rule before any user-agent: none
        if not value.startswith(("/", "*")):
            value = "/" + value  # 'images/' means '/images/' (fail closed)
        rule = (_robots_norm(value, pattern=True), allow)
        if ours:
            mine.append(rule)
        if star:
            anyone.append(rule)
    return RobotsRules.of(mine if named else anyone)


@dataclass
class _OriginPolicy:
    ready: threading.Event
    robots: RobotsRules | None = None
    robots_all: bool | None = None  # True allow all, False disallow all, None: parsed
    unreachable: str | None = None  # transient reason when robots.txt could not be fetched
    tdm_rules: list[TdmRule] | None = None


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
            if pol.robots is not None and not pol.robots.allows(path):
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
                pol.robots = parse_robots(got.body, self.token)
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
