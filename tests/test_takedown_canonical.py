"""URL, page and domain takedowns match the resource, not one spelling of its URL.

A takedown of `https://example.com/img/a.jpg` must also remove the rows that
name it as `http://`, `:443`, `example.com.`, `a%2Ejpg`... (RFC 3986 6.2.2-6.2.3),
and only those: another path, query value, port or host stays.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from ccurate.takedown import TakedownError, canonical_host, make_entry, normalize_domain, url_key
from ccurate.takedown_match import Blocklist, match_index

URL = "https://example.com/img/a.jpg"
URL_SAME = [
    "https://example.com:443/img/a.jpg",
    "http://example.com/img/a.jpg",
    "http://example.com:80/img/a.jpg",
    "https://example.com./img/a.jpg",
    "https://example.com/img/a%2Ejpg",
    "https://example.com/img/a%2ejpg",
    "https://example.com/%69mg/a.jpg",
    "https://example.com/img/a.jpg?",
    "https://EXAMPLE.com/img/a.jpg#x",
    "HTTPS://Example.COM.:443/img/a.jpg?#frag",
    "https://example.com/img/./b/../a.jpg",
    "https://example.com/x/../img/a.jpg",
    "https://user:pw@example.com/img/a.jpg",
    "https://example%2Ecom/img/a.jpg",
    " https://example.com/img/a.jpg ",
]
URL_OTHER = [
    "https://example.com/img/b.jpg",  # another path
    "https://example.com/IMG/a.jpg",  # path case is kept
    "https://example.com/img/A.jpg",
    "https://example.com/img/a.jpg?size=2",  # a query may name another resource
    "https://example.com/img/a.jpg/",
    "https://example.com/img/a.jpg%3F",  # an escaped `?` is part of the path
    "https://example.com/img%2Fa.jpg",  # an escaped `/` is not a separator
    "https://example.com:8443/img/a.jpg",  # another port
    "http://example.com:443/img/a.jpg",
    "https://example.com.evil.org/img/a.jpg",  # another host
    "https://evil.org/example.com/img/a.jpg",
    "https://notexample.com/img/a.jpg",
    "https://img.example.com/img/a.jpg",
    "ftp://example.com/img/a.jpg",
]


def _rows(col: str, values: list[str | None]) -> pa.Table:
    n = len(values)
    other = [f"https://cdn.test/{i}.jpg" for i in range(n)]
    cols: dict[str, list[str | None]] = {
        "key": [f"k{i}" for i in range(n)],
        "url": other,
        "page_url": other,
    }
    cols[col] = values
    return pa.table({c: pa.array(v, pa.string()) for c, v in cols.items()})


def _removed(col: str, values: list[str | None], *entries: tuple[str, str]) -> set[str]:
    block = Blocklist()
    block.add_entries([make_entry(kind, value, "DMCA", "me") for kind, value in entries], 8)
    hit = {r["key"] for r in match_index(_rows(col, values), block).to_pylist()}
    return {v for i, v in enumerate(values) if f"k{i}" in hit and v is not None}


def test_url_key_folds_spellings_of_one_resource() -> None:
    assert {url_key(u) for u in [URL, *URL_SAME]} == {"//example.com/img/a.jpg"}
    keys = [url_key(u) for u in URL_OTHER if not u.startswith("ftp:")]
    assert len(set(keys)) == len(keys) and url_key(URL) not in keys
    assert url_key("https://bücher.de/ü x.jpg") == "//xn--bcher-kva.de/%C3%BC%20x.jpg"
    assert url_key("https://xn--bcher-kva.de/%c3%bc%20x.jpg") == url_key(
        "https://bücher.de/ü%20x.jpg"
    )
    assert url_key("https://x.org/a?q=%7e%2f") == "//x.org/a?q=~%2F"
    assert url_key("https://[::1]:443/a") == "//[::1]/a"
    assert url_key("https://x.org/post/", page=True) == url_key("http://x.org/post", page=True)
    assert url_key("https://x.org", page=True) == url_key("https://x.org/", page=True) == "//x.org/"
    for bad in ["mailto:a@b", "https:///a", "https://x.org:99999/", "https://a..b/", "https://%/a"]:
        with pytest.raises(TakedownError):
            url_key(bad)


def test_url_takedown_removes_every_spelling_and_nothing_else() -> None:
    values: list[str | None] = [URL, *URL_SAME, *URL_OTHER, None, "", "not a url", "https://[::1/x"]
    assert _removed("url", values, ("url", URL)) == {URL, *URL_SAME}


def test_url_takedown_keeps_its_query_but_not_its_spelling() -> None:
    entry = "https://example.com/photo.php?id=7&s=l"
    same = [
        "http://example.com./photo.php?id=%37&s=l",
        "https://example.com/photo.php?id=7&s=l#c",
        "https://example.com/photo.php?s=l&id=7",  # parameter order names no other resource
        "https://example.com/photo.php?id=7&utm_source=mail&s=l&fbclid=Ab1",
    ]
    other = [
        "https://example.com/photo.php?id=8&s=l",
        "https://example.com/photo.php?id=7&s=m",
        "https://example.com/photo.php?id=7",
        "https://example.com/photo.php?id=7&s=l&size=big",
        "https://example.com/photo.php",
    ]
    assert _removed("url", [entry, *same, *other], ("url", entry)) == {entry, *same}


def test_page_takedown_ignores_a_trailing_slash_and_the_scheme() -> None:
    entry = "https://blog.example.com/post/"
    same = [
        "https://blog.example.com/post",
        "http://blog.example.com/post/",
        "https://blog.example.com./post",
        "https://blog.example.com/%70ost/",
        "https://blog.example.com/post?utm_source=x&UTM_Medium=y",  # tracking, no resource
        "https://blog.example.com/post/?fbclid=IwAR0&gclid=1",
    ]
    other = [
        "https://blog.example.com/post?p=2",  # another query names another resource
        "https://blog.example.com/post?utm=1",  # not a tracking parameter's name
        "https://blog.example.com/post/2",
        "https://blog.example.com/Post/",
        "https://blog.example.com.evil.org/post/",
    ]
    assert _removed("page_url", [entry, *same, *other], ("page_url", entry)) == {entry, *same}


def test_takedown_of_a_site_root_reads_every_row_of_that_host() -> None:
    same = [
        "http://example.com",
        "https://example.com/",
        "https://example.com/./",
        "https://example.com?",
    ]
    other = ["https://example.com/a", "https://example.com/?p=1", "https://www.example.com/"]
    got = _removed("page_url", [*same, *other], ("page_url", "https://example.com"))
    assert got == set(same)


@pytest.mark.parametrize("padding", [0, 300], ids=["few domains", "many domains"])
def test_domain_takedown_matches_the_host_however_spelled(padding: int) -> None:
    same = [
        "https://example.com./a.jpg",
        "https://img.example.com./a.jpg",
        "https://IMG.Example.COM/a.jpg",
        "https://user@img.example.com:8080/a.jpg",
        "https://img.example%2Ecom/a.jpg",
        "https://b%C3%BCcher.de/x.jpg",
        "https://www.BÜCHER.de/x.jpg",
        "http://xn--bcher-kva.de/x.jpg",
        "https://a.b.c.d.e.f.g.h.i.j.k.example.com/a.jpg",  # deeper than levels peeled at once
    ]
    other = [
        "https://example.com.evil.org/a.jpg",
        "https://notexample.com/a.jpg",
        "https://example.co/a.jpg",
        "https://evil.org/example.com/a.jpg",
        "https://evil.org/?u=https://example.com/a.jpg",
        "https://a.b.c.d.e.f.g.h.i.j.k.example.com.evil.org/a.jpg",
    ]
    entries = [("domain", "example.com"), ("domain", "bücher.de")]
    entries += [("domain", f"pad{i}.test") for i in range(padding)]
    for col in ("url", "page_url"):
        assert _removed(col, [*same, *other], *entries) == set(same)


@pytest.mark.parametrize("padding", [0, 100], ids=["few hosts", "many hosts"])
def test_prefilters_decide_as_url_key_would(padding: int) -> None:
    """The vectorised prefilters only skip rows whose `url_key` cannot be a rule's."""
    rules = [
        "https://example.com/img/a.jpg",
        "https://example.com/img/a b.jpg",
        "https://example.com/img/b.jpg?w=1",
        "https://example.com/ü/c.jpg",
        "https://example.com/d/",
        *[f"https://pad{i}.test/img/a.jpg" for i in range(padding)],
    ]
    paths = ["img/a.jpg", "img/a%20b.jpg", "img/a b.jpg", "img/%61%20b.jpg", "img/b.jpg?w=1"]
    paths += ["img/b.jpg?w=%31", "%C3%BC/c.jpg", "ü/c.jpg", "%c3%bc/%63.jpg", "d", "d/", "d/."]
    paths += ["d/e/..", "img/a.jpg/.", "img/x/%2E%2E/a.jpg", "img/a.jpg/..", "img/A.jpg", "e/"]
    paths += ["img/a.jpg?", "img/a.jpg#f", "img/a.jpg\t", "img\t/a.jpg", "img/a%2Ejpg"]
    hosts = ["example.com", "EXAMPLE.com.", "u@example.com:443", "example.com:80", "x.example.com"]
    hosts += ["exam%70le.com", "[::1]", "example.com.evil.org"]
    values: list[str | None] = [
        f"{scheme}://{h}/{p}" for scheme in ("http", "https") for h in hosts for p in paths
    ]
    keys = {url_key(r) for r in rules}

    def expect(v: str) -> bool:
        try:
            return url_key(v) in keys
        except TakedownError:
            return False

    want = {v for v in values if v is not None and expect(v)}
    assert len(want) > 40
    assert _removed("url", values, *[("url", r) for r in rules]) == want


def test_canonical_host_and_domain_entries() -> None:
    assert canonical_host("En.Wikipedia.ORG.") == "en.wikipedia.org"
    assert canonical_host("en．wikipedia．org") == "en.wikipedia.org"  # full-width dots
    assert canonical_host("bücher.de") == "xn--bcher-kva.de"
    for bad in ["en.wikipedia.org%2e", "a..b", "exa mple.com", "", ".", "x/y"]:
        assert canonical_host(bad) is None
    assert normalize_domain("*.Bücher.de.") == "xn--bcher-kva.de"
    assert normalize_domain("https://Example.COM./x") == "example.com"
    with pytest.raises(TakedownError):
        normalize_domain("example%2Ecom")


def test_stored_url_entries_keep_their_form_and_id() -> None:
    """Entry ids hash the stored value: listed ids must keep loading as before."""
    e = make_entry("url", "https://Example.com:443/img/a%2ejpg#x")
    assert e.value == "https://example.com:443/img/a%2ejpg"
    assert e.id == make_entry("url", e.value).id


def test_canonical_host_uses_idna_2008_and_one_form_per_ip() -> None:
    # UTS-46 non-transitional (IDNA 2008), as browsers: faß.de and fass.de are two domains
    assert canonical_host("faß.de") == canonical_host("xn--fa-hia.de") == "xn--fa-hia.de"
    assert canonical_host("FAß.DE.") == "xn--fa-hia.de"
    assert canonical_host("fass.de") == "fass.de"
    assert canonical_host("a_b.bücher.de") == "a_b.xn--bcher-kva.de"
    # IP literals: IPv6 compressed, IPv4-mapped as IPv4, inet_aton's IPv4 spellings
    assert canonical_host("2001:0DB8::1") == canonical_host("2001:db8:0::1") == "2001:db8::1"
    assert canonical_host("::ffff:1.2.3.4") == "1.2.3.4"
    for spelling in ["1.2.3.4", "16909060", "01.02.03.04", "0x1.0x2.0x3.0x4", "1.2.0x304"]:
        assert canonical_host(spelling) == "1.2.3.4", spelling
    assert canonical_host("1.2.3.999") == "1.2.3.999"  # no address: a name, as it is
    for bad in ["fe80::1%eth0", "1:2:3", "faß..de"]:
        assert canonical_host(bad) is None, bad
    assert url_key("https://[2001:0db8::1]/a.jpg") == url_key("https://[2001:db8::1]/a.jpg")
    assert url_key("https://[::ffff:1.2.3.4]/a.jpg") == "//1.2.3.4/a.jpg"
    # an IPv4 domain entry keeps its spelling (its id hashes it); matching canonicalises
    assert normalize_domain("16909060") == "16909060"


def test_url_takedown_by_idna_2008_host_and_ip_literal() -> None:
    rows = ["https://xn--fa-hia.de/a.jpg", "https://FAß.de/a.jpg", "https://fass.de/a.jpg"]
    assert _removed("url", rows, ("url", "https://faß.de/a.jpg")) == set(rows[:2])
    rows = ["https://[2001:0db8::1]/a.jpg", "https://[2001:db8:0::1]/a.jpg", "https://[::2]/a.jpg"]
    assert _removed("url", rows, ("url", "https://[2001:db8::1]/a.jpg")) == set(rows[:2])
    rows = [
        "https://16909060/a.jpg",
        "https://01.02.03.04./a.jpg",
        "https://[::ffff:1.2.3.4]/a.jpg",
        "https://1.2.3.4/a.jpg",
        "https://1.2.3.5/a.jpg",
    ]
    assert _removed("url", rows, ("url", "https://1.2.3.4/a.jpg")) == set(rows[:4])
    assert _removed("url", rows, ("url", "https://16909060/a.jpg")) == set(rows[:4])
    for col in ("url", "page_url"):
        assert _removed(col, rows, ("domain", "16909060")) == set(rows[:4])
        assert _removed(col, rows, ("domain", "[::ffff:1.2.3.4]")) == set(rows[:4])
    rows = ["https://x.faß.de/a.jpg", "https://xn--fa-hia.de/b.jpg", "https://fass.de/a.jpg"]
    assert _removed("url", rows, ("domain", "faß.de")) == set(rows[:2])
    assert _removed("url", rows, ("domain", "fass.de")) == {rows[2]}
