"""Opt-out parsing without a server: X-Robots-Tag forms, TDMRep JSON variants, robots.txt
groups for our token, and the per-origin policy cache (ingest.optout)."""

from __future__ import annotations

import pytest

from ccurate.ingest.config import IngestConfig
from ccurate.ingest.optout import (
    OriginPolicies,
    PolicyFetch,
    glob_match,
    header_optout,
    open_client,
    parse_robots,
    parse_tdmrep,
    tdmrep_reserved,
    x_robots_optout,
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["noindex,,noai"], True),  # empty items between commas are skipped
        ([" , ", ""], False),
        (["noindex", "NoImageAI"], True),  # several header lines
        # a date's comma splits it: '25 Jun 2010 15:00:00 PST' is no bot name
        (["unavailable_after: Friday, 25 Jun 2010 15:00:00 PST, noai"], True),
        (["otherbot: unavailable_after: 25 Jun 2010 15:00:00 PST, noai"], False),
        (["ccurate:"], False),  # a bot name with nothing after it
        (["ccurate:, noai"], True),  # ... names the bot for what follows
        (["otherbot:, noai"], False),
        (["otherbot: noindex", "noai"], True),  # a new header line is for every bot again
        (["Other Bot: noai"], False),  # not a bot name: the item is ignored
        (["max-image-preview:none, noai"], True),
        # directives separated by spaces or ';', as <meta name=robots> reads them (fail closed)
        (["noindex noai"], True),
        (["noindex;noai"], True),
        (["NOINDEX ;\tNoImageAI"], True),
        (["ccurate: noindex noai"], True),
        (["otherbot: noindex noai"], False),
        (["max-image-preview:none noai"], True),
        (["noindex nofollow", "none;noarchive"], False),
        (["noaix noindex"], False),  # whole words only
    ],
)
def test_x_robots_tag_forms(values: list[str], expected: bool):
    assert x_robots_optout(values, "ccurate") is expected


def test_header_optout_follows_the_config():
    headers = {"x-robots-tag": ["ccurate: noai"], "tdm-reservation": ["1"]}
    assert header_optout(headers, IngestConfig()) == "optout_x_robots_tag"
    off_xr = IngestConfig(respect_x_robots_tag=False)
    assert header_optout(headers, off_xr) == "optout_tdmrep"
    assert header_optout(headers, off_xr.model_copy(update={"respect_tdmrep": False})) is None
    assert header_optout({"tdm-reservation": [" 0 "]}, IngestConfig()) is None
    assert header_optout({"x-robots-tag": ["mybot: noai"]}, IngestConfig(robots_token="MyBot"))


@pytest.mark.parametrize(
    ("value", "reserved"),
    [
        ("1", True),
        ("1.0", True),  # the same JSON number as 1
        ("true", True),
        ('"1"', True),
        ('"True"', True),
        ("0", False),
        ("0.0", False),
        ("false", False),
        ('"0"', False),
        ("null", False),
        ("2", False),
    ],
)
def test_tdmrep_reservation_values(value: str, reserved: bool):
    (rule,) = parse_tdmrep(f'[{{"location": "/", "tdm-reservation": {value}}}]'.encode())
    assert rule.reserved is reserved
    (rule,) = parse_tdmrep(b'[{"location": "/"}]')
    assert rule.reserved is False  # absent: not reserved


def test_tdmrep_locations_full_urls_relative_paths_and_bom():
    body = (
        "\ufeff["
        '{"location": "https://example.org/img/*", "tdm-reservation": 1},'
        '{"location": "https://example.org", "tdm-reservation": 0},'
        '{"location": "docs/*.pdf$", "tdm-reservation": 1},'
        '"not an object", {"tdm-reservation": 1}'
        "]"
    ).encode()
    rules = parse_tdmrep(body)
    assert len(rules) == 3  # the string and the entry without a location are skipped
    assert tdmrep_reserved(rules, "/img/a.jpg")  # a full URL: its path is the pattern
    assert not tdmrep_reserved(rules, "/other.jpg")  # 'https://example.org' -> '/' -> free
    assert not tdmrep_reserved(rules[2:], "/x.jpg")  # no rule matches: not reserved
    assert tdmrep_reserved(rules[2:], "/docs/a/b.pdf")  # 'docs/' means '/docs/'
    assert not tdmrep_reserved(rules[2:], "/docs/a.pdf?x")
    assert parse_tdmrep(b"\xff\xfe[]") == [] and parse_tdmrep(b'{"a": []}') == []


class FakeFetch:
    """Answers policy-file fetches from a table: path -> PolicyFetch; counts calls."""

    def __init__(self, answers: dict[str, PolicyFetch]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def __call__(self, url: str, max_bytes: int) -> PolicyFetch:
        self.calls.append(url)
        path = "/" + url.split("/", 3)[3]
        return self.answers.get(path, PolicyFetch(404))


def robots(text: str) -> dict[str, PolicyFetch]:
    return {"/robots.txt": PolicyFetch(200, text.encode())}


@pytest.mark.parametrize(
    ("text", "allowed", "denied"),
    [
        # a group for a bot whose name is part of ours is not ours (RFC 9309)
        ("User-agent: rat\nAllow: /\n\nUser-agent: *\nDisallow: /\n", [], ["/a.jpg"]),
        ("User-agent: ccurate-images\nAllow: /\n\nUser-agent: *\nDisallow: /\n", [], ["/a.jpg"]),
        # our group, any case, with a version after '/'
        (
            "User-agent: *\nDisallow: /\n\nUser-agent: CCurate/2.0\nDisallow: /p/\n",
            ["/a"],
            ["/p/x"],
        ),
        ("User-agent: otherbot\nUser-agent: ccurate\nDisallow: /x/\n", ["/a"], ["/x/1"]),
        ("User-agent: *\nDisallow: /private/\n", ["/public/a"], ["/private/a"]),
        ("", ["/a"], []),
    ],
)
def test_robots_txt_groups_for_our_token(text: str, allowed: list[str], denied: list[str]):
    pol = OriginPolicies(FakeFetch(robots(text)), "ccurate", tdmrep=False)
    for path in allowed:
        assert pol.check("https://e.test", path) is None, path
    for path in denied:
        assert pol.check("https://e.test", path) == "optout_robots_txt", path


RFC_5_1 = """User-Agent: *
Disallow: *.gif$
Disallow: /example/
Allow: /publications/

User-Agent: foobot
Disallow:/
Allow:/example/page.html
Allow:/example/allowed.gif

User-Agent: barbot
User-Agent: bazbot
Disallow: /example/page.html

User-Agent: quxbot
"""
RFC_5_2 = "User-Agent: foobot\nAllow: /example/page/\nDisallow: /example/page/disallowed.gif\n"

# (robots.txt, our token, path, allowed): RFC 9309's examples, the review's six, and what
# must stay allowed
ROBOTS_CASES: list[tuple[str, str, str, bool]] = [
    # RFC 9309 5.1: our token's group only, else '*'; a group without rules allows all
    (RFC_5_1, "foobot", "/example/page.html", True),
    (RFC_5_1, "foobot", "/example/allowed.gif", True),
    (RFC_5_1, "foobot", "/example/other.html", False),
    (RFC_5_1, "foobot", "/publications/a", False),  # foobot's group, not '*', applies
    (RFC_5_1, "barbot", "/example/page.html", False),
    (RFC_5_1, "bazbot", "/example/page.html", False),
    (RFC_5_1, "bazbot", "/example/x.gif", True),
    (RFC_5_1, "quxbot", "/example/page.html", True),
    (RFC_5_1, "ccurate", "/a/b.gif", False),
    (RFC_5_1, "ccurate", "/a/b.gif?x=1", True),  # '$': a longer path does not match
    (RFC_5_1, "ccurate", "/example/x", False),
    (RFC_5_1, "ccurate", "/publications/x", True),
    # RFC 9309 5.2: the longest match wins
    (RFC_5_2, "foobot", "/example/page/", True),
    (RFC_5_2, "foobot", "/example/page/disallowed.gif", False),
    # RFC 9309 2.2.2/2.2.3: percent-encoding compares equal, wildcards
    ("User-agent: *\nDisallow: /foo/bar/ツ\n", "ccurate", "/foo/bar/%E3%83%84", False),
    ("User-agent: *\nDisallow: /foo/bar/%62%61%7A\n", "ccurate", "/foo/bar/baz", False),
    ("User-agent: *\nDisallow: /%7Ejoe/\n", "ccurate", "/~joe/a.jpg", False),
    ("User-agent: *\nDisallow: /this/*/exactly\n", "ccurate", "/this/a/b/exactly", False),
    ("User-agent: *\nDisallow: /this/path/exactly$\n", "ccurate", "/this/path/exactly", False),
    ("User-agent: *\nDisallow: /this/path/exactly$\n", "ccurate", "/this/path/exactly/", True),
    # the review's six: all opt-outs robotparser missed
    ("User-agent: ccurate\nDisallow: /*.jpg$\n", "ccurate", "/img/a.jpg", False),
    (
        "User-agent: *\nDisallow: /wp-content/uploads/*\n",
        "ccurate",
        "/wp-content/uploads/a.jpg",
        False,
    ),
    ("User-agent: ccurate\nDisallow: /*/images/\n", "ccurate", "/en/images/a.jpg", False),
    ("User-agent: ccurate\nAllow: /\nDisallow: /images/\n", "ccurate", "/images/a.jpg", False),
    (
        "User-agent: ccurate\nDisallow: /a/\n\nUser-agent: ccurate\nDisallow: /b/\n",
        "ccurate",
        "/b/x.jpg",
        False,
    ),
    ("\ufeffUser-agent: *\nDisallow: /\n", "ccurate", "/a.jpg", False),
    # allowed
    (
        "User-agent: *\nDisallow: /images/\nAllow: /images/public/\n",
        "ccurate",
        "/images/public/a.jpg",
        True,
    ),
    (
        "User-agent: *\nDisallow: /images/\nAllow: /images/public/\n",
        "ccurate",
        "/images/a.jpg",
        False,
    ),
    ("User-agent: *\nDisallow: /a\nAllow: /a\n", "ccurate", "/a.jpg", True),  # a tie: Allow
    ("User-agent: *\nDisallow:\n", "ccurate", "/a.jpg", True),  # empty: no rule
    ("User-agent: otherbot\nDisallow: /\n", "ccurate", "/a.jpg", True),
    ("User-agent: *\nDisallow: /*.jpg$\n", "ccurate", "/a.jpg.html", True),
    ("User-agent: *\nDisallow: /\n", "ccurate", "/robots.txt", True),  # always allowed
    ("Disallow: /\nUser-agent: *\nAllow: /\n", "ccurate", "/a.jpg", True),  # rule w/o group
    # grouping: blank lines and other fields end nothing; rules after a user-agent do
    ("User-agent: ccurate\n\nDisallow: /x/\n", "ccurate", "/x/a.jpg", False),
    (
        "User-agent: a\nCrawl-delay: 5\nUser-agent: ccurate\nDisallow: /x/\n",
        "ccurate",
        "/x/1",
        False,
    ),
    ("User-agent: ccurate\nDisallow: /x/\nUser-agent: b\nDisallow: /y/\n", "ccurate", "/y/1", True),
    ("User-agent: *\nDisallow: images/\n", "ccurate", "/images/a.jpg", False),  # no '/'
    ("User-agent: *\nDisalow: /x/\n", "ccurate", "/x/a.jpg", False),  # Google's misspelling
    ("User-agent: *\r\nDisallow: /x/ # comment\r\n", "ccurate", "/x/a.jpg", False),
    ("User-agent: *\nDisallow: /a?b=1\n", "ccurate", "/a?b=1&c", False),  # query included
    # RFC 9309 2.2.3: %2A and %24 in a pattern match a literal '*' and '$', never a
    # wildcard or an end anchor; a literal '*'/'$' in a path is no wildcard either
    ("User-agent: *\nDisallow: /a%24b\n", "ccurate", "/a%24b", False),
    ("User-agent: *\nDisallow: /a%24b\n", "ccurate", "/a$b", False),
    ("User-agent: *\nDisallow: /price%24\n", "ccurate", "/price%24/list", False),
    ("User-agent: *\nDisallow: /price%24\n", "ccurate", "/price", True),
    ("User-agent: *\nDisallow: /file-%2A.html\n", "ccurate", "/file-%2a.html", False),
    ("User-agent: *\nDisallow: /file-%2A.html\n", "ccurate", "/file-*.html", False),
    ("User-agent: *\nDisallow: /file-%2A.html\n", "ccurate", "/file-x.html", True),
    ("User-agent: *\nDisallow: /a$b\n", "ccurate", "/a$b", False),  # '$' inside: literal
    ("User-agent: *\nDisallow: /a$b\n", "ccurate", "/a", True),
    ("User-agent: *\nDisallow: /a$$\n", "ccurate", "/a$", False),
    ("User-agent: *\nDisallow: /a$$\n", "ccurate", "/a$b", True),
    ("User-agent: *\nDisallow: /a/*\n", "ccurate", "/b*/a/", True),  # a path '*' is literal
    ("User-agent: *\nDisallow: /a$\n", "ccurate", "/a%24", True),
    # Google's leniencies, all failing closed: typo'd user-agent keys, a forgotten colon,
    # the product token as the leading [A-Za-z_-]+ of the value
    ("User-agent: ccurate\nDisallow /x\n", "ccurate", "/x/a.jpg", False),
    ("User-agent ccurate\nDisallow: /x\n", "ccurate", "/x/a.jpg", False),
    ("User-agent: *\nDisallow /a:b\n", "ccurate", "/a:b", False),
    ("User-agent: *\nAllow: /\nUseragent: ccurate\nDisallow: /\n", "ccurate", "/x", False),
    ("User agent: ccurate\nDisallow: /\n", "ccurate", "/x", False),
    ("User-agent: *\nAllow: /\nUser  Agent: ccurate\nDisallow: /\n", "ccurate", "/x", False),
    ("User-agent: ccurate (+https://x.example)\nDisallow: /\n", "ccurate", "/x", False),
    ("User-agent: ccurate*\nDisallow: /\n", "ccurate", "/x", False),
    ("User-agent: ccurate 1.0\nDisallow: /\n", "ccurate", "/x", False),
    ("User-agent: * (all)\nDisallow: /\n", "ccurate", "/x", False),
    # ... and a longer product token is another bot's (Google's [A-Za-z_-]+ token)
    ("User-agent: *\nDisallow: /\nUser-agent: ccurate-bot\nAllow: /\n", "ccurate", "/x", False),
    ("User-agent: *\nDisallow: /\nUser-agent: ccuratex\nAllow: /\n", "ccurate", "/x", False),
    ("User-agent: *\nDisallow: /\nUser-agent: ccurate_x\nAllow: /\n", "ccurate", "/x", False),
    ("User-agent: ccurate-bot\nDisallow: /\n", "ccurate", "/x", True),
    ("User-agent: *bot\nDisallow: /\n", "ccurate", "/x", True),  # no '*' group
    ("User agent ccurate\nDisallow: /\n", "ccurate", "/x", True),  # 3 words: no line
    # longest match first, Allow first among equals, whatever the file order
    ("User-agent: *\nAllow: /a/b\nDisallow: /a/b/c\n", "ccurate", "/a/b/c/d", False),
    ("User-agent: *\nDisallow: /a/b/c\nAllow: /a/b\n", "ccurate", "/a/b/x", True),
    ("User-agent: *\nDisallow: /a*\nAllow: /a/\n", "ccurate", "/a/x", True),
    ("User-agent: *\nAllow: /a/\nDisallow: /a*\n", "ccurate", "/a/x", True),
]


@pytest.mark.parametrize(("text", "token", "path", "allowed"), ROBOTS_CASES)
def test_robots_txt_rfc9309(text: str, token: str, path: str, allowed: bool):
    pol = OriginPolicies(FakeFetch(robots(text)), token, tdmrep=False)
    assert pol.check("https://e.test", path) == (None if allowed else "optout_robots_txt")


def test_robots_txt_hostile_patterns_stay_linear():
    # a backtracking regex takes exponential time on these; the glob match is linear-ish
    text = "User-agent: *\n" + "Disallow: /" + "a*" * 2000 + "b\n"
    rules = parse_robots(text.encode(), "ccurate")
    assert rules.allows("/" + "a" * 5000)
    assert not rules.allows("/" + "a" * 5000 + "b")
    assert glob_match("/*x*y$", "/axby") and not glob_match("/*x*y$", "/axbyz")


def test_robots_rules_are_sorted_once_and_the_first_match_decides():
    text = "User-agent: *\n" + "".join(f"Disallow: /d/{i}\n" for i in range(2000))
    text += "Allow: /d/1\nDisallow: /d/1\nDisallow: /d/1\n"
    rules = parse_robots(text.encode(), "ccurate")
    sizes = [len(p) for p, _ in rules.rules]
    assert sizes == sorted(sizes, reverse=True)
    assert rules.rules.count(("/d/1", False)) == 1  # duplicates merged
    assert rules.rules.index(("/d/1", True)) < rules.rules.index(("/d/0", False))
    assert not rules.allows("/d/1999/x") and not rules.allows("/d/10")
    assert rules.allows("/d/1") and rules.allows("/e")


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (PolicyFetch(None, reason="timeout"), "timeout"),  # transient: retried later
        (PolicyFetch(None, reason="connection_error"), "connection_error"),
        (PolicyFetch(None, reason="ssrf_blocked"), None),  # a blocked redirect: no robots.txt
        (PolicyFetch(None, reason="too_large"), None),
        (PolicyFetch(429), "optout_robots_txt"),
        (PolicyFetch(503), "optout_robots_txt"),
        (PolicyFetch(410), None),
        (PolicyFetch(302), None),  # a redirect left over after following: none
    ],
)
def test_robots_txt_fetch_outcomes(answer: PolicyFetch, reason: str | None):
    fetch = FakeFetch({"/robots.txt": answer})
    pol = OriginPolicies(fetch, "ccurate")
    assert pol.check("https://e.test", "/a.jpg") == reason
    # tdmrep.json is not asked for when robots.txt could not be reached at all
    unreachable = reason in ("timeout", "connection_error")
    assert len(fetch.calls) == (1 if unreachable else 2)


def test_policies_are_cached_per_origin_and_bounded():
    fetch = FakeFetch(
        {
            "/robots.txt": PolicyFetch(200, b"User-agent: *\nDisallow: /no/\n"),
            "/.well-known/tdmrep.json": PolicyFetch(
                200, b'[{"location": "/tdm/*", "tdm-reservation": 1}]'
            ),
        }
    )
    pol = OriginPolicies(fetch, "ccurate", max_origins=2)
    assert pol.check("https://a.test", "/tdm/1.jpg") == "optout_tdmrep"
    assert pol.check("https://a.test", "/no/1.jpg") == "optout_robots_txt"
    assert pol.check("https://a.test", "/ok.jpg") is None
    assert pol.fetches == 2  # one robots.txt, one tdmrep.json for the origin
    pol.check("https://b.test", "/ok.jpg")
    pol.check("https://c.test", "/ok.jpg")  # a third origin: the cache starts over
    assert len(pol._origins) <= 2
    pol.check("https://a.test", "/ok.jpg")
    assert fetch.calls.count("https://a.test/robots.txt") == 2 and pol.fetches == 8


def test_policies_off_fetch_nothing():
    fetch = FakeFetch(robots("User-agent: *\nDisallow: /\n"))
    both_off = OriginPolicies(fetch, "ccurate", robots=False, tdmrep=False)
    assert both_off.check("https://e.test", "/") is None
    assert fetch.calls == []
    only_tdm = OriginPolicies(fetch, "ccurate", robots=False)
    assert only_tdm.check("https://e.test", "/a.jpg") is None
    assert fetch.calls == ["https://e.test/.well-known/tdmrep.json"]


def test_open_client_reports_every_policy_fetch():
    seen: list[tuple[str, PolicyFetch]] = []
    client, policies = open_client(IngestConfig(retries=0), 1, lambda u, got: seen.append((u, got)))
    try:
        # loopback is refused by default: no connection is made, and no robots.txt is
        # the same as an empty one
        assert policies.check("http://127.0.0.1:9", "/a.jpg") is None
    finally:
        client.close()
    assert [u for u, _ in seen] == [
        "http://127.0.0.1:9/robots.txt",
        "http://127.0.0.1:9/.well-known/tdmrep.json",
    ]
    assert all(got.status is None and got.reason == "ssrf_blocked" for _, got in seen)
