"""Which HTML parser ingest should use, measured on real Common Crawl pages.

Times the task ingest does per page (parse, find every <img>, read src/srcset/alt)
with selectolax lexbor, selectolax modest (removed in selectolax 1.0: reported
as unavailable when the import fails), resiliparse's HTMLTree, the stdlib
`html.parser` (the anchor: always there) and BeautifulSoup when installed,
plus ingest's full `extract_images`. Pages: every HTML response of the real
WARCs in ../shared/fixtures/real (the clipped one included: partial HTML is
what crawls give). Prints per-parser time, <img> count (a sanity check that all
parsers see the same page) and the speed-up over the stdlib anchor.

    .venv/bin/python bench/html_parsers.py [--rounds 20] [--fixtures DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

from fastwarc.warc import ArchiveIterator, WarcRecordType
from resiliparse.parse.encoding import bytes_to_str, detect_encoding

from ccurate.ingest.html import extract_images

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FIXTURES = ROOT.parent / "shared" / "fixtures" / "real"


def load_pages(fixtures: Path) -> list[tuple[str, str]]:
    pages: list[tuple[str, str]] = []
    for warc in sorted(fixtures.glob("*.warc.gz")):
        with open(warc, "rb") as fh:
            for rec in ArchiveIterator(fh, record_types=WarcRecordType.response, parse_http=True):
                body = rec.reader.read()
                url = rec.headers.get("WARC-Target-URI") or ""
                enc = detect_encoding(body, from_html_meta=True) or "utf-8"
                pages.append((url, bytes_to_str(body, enc)))
    return pages


class _StdlibImgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.imgs: list[tuple[str | None, str | None, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            a = dict(attrs)
            self.imgs.append((a.get("src"), a.get("srcset"), a.get("alt")))


def stdlib_imgs(html: str) -> int:
    p = _StdlibImgs()
    p.feed(html)
    p.close()
    return len(p.imgs)


def lexbor_imgs(html: str) -> int:
    from selectolax.lexbor import LexborHTMLParser

    n = 0
    for img in LexborHTMLParser(html).css("img"):
        a = img.attributes
        _ = (a.get("src"), a.get("srcset"), a.get("alt"))
        n += 1
    return n


def resiliparse_imgs(html: str) -> int:
    from resiliparse.parse.html import HTMLTree

    n = 0
    doc = HTMLTree.parse(html).document
    assert doc is not None
    for img in doc.query_selector_all("img"):
        _ = (img.getattr("src"), img.getattr("srcset"), img.getattr("alt"))
        n += 1
    return n


def optional_parsers() -> dict[str, Callable[[str], int] | str]:
    out: dict[str, Callable[[str], int] | str] = {}
    try:
        from selectolax.parser import HTMLParser as ModestParser  # type: ignore[attr-defined]

        def modest_imgs(html: str) -> int:
            n = 0
            for img in ModestParser(html).css("img"):
                a = img.attributes
                _ = (a.get("src"), a.get("srcset"), a.get("alt"))
                n += 1
            return n

        out["modest"] = modest_imgs
    except ImportError as exc:
        out["modest"] = f"unavailable (ImportError: {str(exc)[:60]}...)"
    try:
        from bs4 import BeautifulSoup

        def bs4_imgs(html: str) -> int:
            n = 0
            for img in BeautifulSoup(html, "html.parser").find_all("img"):
                _ = (img.get("src"), img.get("srcset"), img.get("alt"))
                n += 1
            return n

        out["bs4"] = bs4_imgs
    except ImportError:
        out["bs4"] = "unavailable (not installed)"
    return out


def _ignore_url(fn: Callable[[str], int]) -> Callable[[str, str], int]:
    return lambda _url, html: fn(html)


def time_parser(
    fn: Callable[[str, str], int], pages: list[tuple[str, str]], rounds: int
) -> tuple[float, int]:
    """Median seconds over `rounds` passes over all pages, and the <img> count of one pass."""
    count = sum(fn(url, html) for url, html in pages)  # warm-up + sanity count
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for url, html in pages:
            fn(url, html)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--fixtures", type=Path, default=DEFAULT_FIXTURES)
    args = ap.parse_args()
    pages = load_pages(args.fixtures)
    if not pages:
        raise SystemExit(f"no WARC pages under {args.fixtures}")
    n_bytes = sum(len(h.encode()) for _, h in pages)
    print(f"{len(pages)} pages, {n_bytes / 1e6:.2f} MB of HTML, {args.rounds} rounds (median)")

    parsers: dict[str, Callable[[str], int] | str] = {
        "stdlib": stdlib_imgs,
        "lexbor": lexbor_imgs,
        "resiliparse": resiliparse_imgs,
        **optional_parsers(),
    }
    results: dict[str, tuple[float, int]] = {}
    for name, fn in parsers.items():
        if isinstance(fn, str):
            print(f"{name:>15}: {fn}")
            continue
        results[name] = time_parser(_ignore_url(fn), pages, args.rounds)
    results["extract_images"] = time_parser(
        lambda u, h: len(extract_images(h, u).images), pages, args.rounds
    )
    anchor = results["stdlib"][0]
    print(f"{'parser':>15}  {'ms/pass':>9}  {'MB/s':>7}  {'imgs':>5}  vs stdlib")
    for name, (sec, count) in results.items():
        note = " (samples: deduplicated, with evidence)" if name == "extract_images" else ""
        print(
            f"{name:>15}  {sec * 1e3:9.2f}  {n_bytes / 1e6 / sec:7.1f}  {count:5d}  "
            f"{anchor / sec:6.1f}x{note}"
        )
    kv = [f"pages={len(pages)}", f"mb={n_bytes / 1e6:.2f}"]
    for name, (sec, count) in results.items():
        kv.append(f"{name}_ms={sec * 1e3:.2f}")
        kv.append(f"{name}_imgs={count}")
    for name in ("lexbor", "resiliparse", "modest", "bs4", "extract_images"):
        if name in results:
            kv.append(f"{name}_vs_stdlib={anchor / results[name][0]:.2f}")
        else:
            kv.append(f"{name}=unavailable")
    print("RESULT html_parsers " + " ".join(kv))


if __name__ == "__main__":
    main()
