"""Review fixes: run report plots, licence-node ownership, page titles, unreadable WARC headers."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

from PIL import Image

from ccurate.ingest.html import MAX_CONTAINER_DEPTH, extract_images
from ccurate.ingest.warc import iter_warc
from ccurate.record import Sample, make_key
from ccurate.shardio import ShardWriter
from tests.test_ingest_parse import _warc_record

PAGE = "https://example.org/blog/post.html"
BY_4 = "https://creativecommons.org/licenses/by/4.0/"


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (i * 40 % 256, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _sample(i: int, **kw) -> Sample:
    url = f"http://example.org/img/{i}.jpg"
    return Sample(
        key=make_key(url), url=url, image=_jpeg(i), mime="image/jpeg", width=16, height=12, **kw
    )


# --------------------------------------------------------------------------- report
def _report(tmp_path: Path, kept: list[Sample], dropped: Sample) -> str:
    from ccurate.report import write_report

    work = tmp_path / "work"
    w = ShardWriter(work / "30_dedup" / "part-00000")
    for s in [*kept, dropped]:
        w.write(s)
    w.commit({})
    return write_report(work).read_text()


def test_report_survives_non_finite_scores(tmp_path: Path) -> None:
    """An inf score made hist raise, so the whole run ended without its report."""
    values = [0.1, 0.5, float("inf"), float("nan")]
    kept = [_sample(i, scores={"q.sharp": v}) for i, v in enumerate(values)]
    bad = _sample(9)
    bad.drop("too_small", "quality")
    page = _report(tmp_path, kept, bad)
    assert "Score: q.sharp (kept 2, dropped 0, 2 not finite left out)" in page
    assert page.count("data:image/png;base64,") == 3  # drops, sizes, the score histogram


def test_report_survives_dollar_signs_in_reasons_and_score_names(tmp_path: Path) -> None:
    """matplotlib parsed `$...$` in a drop reason or score name as mathtext and raised."""
    kept = [_sample(i, scores={"q.$\\frac$": float(i)}) for i in range(3)]
    bad = _sample(9)
    bad.drop("odd_$\\frac$_reason", "custom")
    page = _report(tmp_path, kept, bad)
    assert "odd_$\\frac$_reason (1)" in page  # the HTML keeps the reason as written
    assert page.count("data:image/png;base64,") == 3


# --------------------------------------------------------------------------- html
def test_licence_in_a_figure_whose_image_is_deeper_than_the_window_is_not_lost() -> None:
    """The licence node went to the figure (nearest container holding an img at any depth)
    but the image only looks MAX_CONTAINER_DEPTH levels up: the evidence vanished."""
    n = MAX_CONTAINER_DEPTH + 1
    deep = "<div>" * n + '<img src="a.jpg" alt="a">' + "</div>" * n
    page = extract_images(
        f'<figure>{deep}<figcaption><a rel="license" href="{BY_4}">CC BY</a></figcaption>'
        '</figure><figure><img src="b.jpg"><a rel="license" href="x">l</a></figure>',
        PAGE,
    )
    a, b = page.images
    assert BY_4 in [e.value for e in a.license_evidence]
    assert BY_4 in [e.value for e in page.page_license_evidence]  # no image-near owner: page
    # the nearby case keeps its container scope
    assert ("container", "rel_license", "https://example.org/blog/x") in [
        (e.scope, e.kind, e.value) for e in b.license_evidence
    ]


def test_inline_svg_title_is_not_the_page_title() -> None:
    html = (
        "<html><head></head><body><svg><title>Search icon</title></svg>"
        '<img src="a.jpg"></body></html>'
    )
    page = extract_images(html, PAGE)
    assert page.title is None and page.images[0].title is None
    page = extract_images(
        "<body><svg><title>icon</title></svg><title>Real</title><img src='a.jpg'></body>", PAGE
    )
    assert page.title == "Real"


# --------------------------------------------------------------------------- warc
def test_warc_clipped_in_http_headers_is_a_page_error_and_dns_is_not_a_status(
    tmp_path: Path,
) -> None:
    """A record clipped inside its HTTP header block was counted as a non-2xx response
    (silently skipped); a dns: response (no HTTP message) was counted as non-2xx."""
    dns = (
        b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Record-ID: <urn:uuid:1>\r\n"
        b"WARC-Date: 2024-05-01T00:00:00Z\r\nWARC-Target-URI: dns:a.test\r\n"
        b"Content-Type: text/dns\r\nContent-Length: 20\r\n\r\n20240501 a.test 1.2.\r\n\r\n"
    )
    ok = _warc_record("http://a.test/1", "200 OK", {"Content-Type": "text/html"}, b"<img src=x>")
    clipped = _warc_record(
        "http://a.test/2", "200 OK", {"Content-Type": "text/html"}, b'<img src="y.jpg">'
    )
    path = tmp_path / "c.warc"
    path.write_bytes(dns + ok + clipped[:-60])
    st: Counter[str] = Counter()
    out = list(iter_warc(path, stats=st))
    assert [s.url for s in out if s.kept] == ["http://a.test/x"]
    errors = [s for s in out if not s.kept]
    assert [(s.url, s.drop_reason) for s in errors] == [("http://a.test/2", "page_error")]
    assert st["page_error"] == 1 and st["non_2xx"] == 0 and st["non_html"] == 1


def test_a_footer_named_wrapper_does_not_pass_a_caption_off_as_the_site_footer():
    """`[class*=footer]` also matches a whole-page wrapper ("no-footer-widgets"): its first
    rights mark is an image caption's. The innermost marked footer is the page's."""
    from ccurate.ingest.html import extract_images

    html = """<html><body><div class="page no-footer-widgets">
      <figure><img src="a.jpg"><figcaption>© Jane Doe, all rights reserved</figcaption></figure>
      <footer><p>Site text under CC BY-SA 4.0. © 2021 ACME Media</p>
        <span class="footer-note">Made with care</span></footer>
    </div></body></html>"""
    page = extract_images(html, "https://example.org/p")
    texts = [e.value for e in page.page_license_evidence if e.kind == "text"]
    assert len(texts) == 1 and "ACME Media" in texts[0] and "Jane" not in texts[0]
    # a footer whose only inner match has no mark is still read as a whole
    html2 = """<html><body><img src="a.jpg"><footer><span class="copyright-year">2020</span>
      All rights reserved ACME</footer></body></html>"""
    texts2 = [e.value for e in extract_images(html2, "https://e.org/").page_license_evidence]
    assert any("All rights reserved ACME" in t for t in texts2)


def test_report_thumbnails_are_upright_and_transparency_is_white():
    import base64
    import io

    from PIL import Image

    from ccurate.report import _thumb

    def decode(uri: str | None) -> Image.Image:
        assert uri is not None and uri.startswith("data:image/jpeg;base64,")
        return Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")

    clear = io.BytesIO()
    Image.new("RGBA", (40, 20), (0, 0, 0, 0)).save(clear, "PNG")
    assert min(decode(_thumb(clear.getvalue())).getpixel((5, 5))) > 240  # not black
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    phone = io.BytesIO()
    Image.new("RGB", (60, 30), (200, 30, 30)).save(phone, "JPEG", exif=exif.tobytes())
    thumb = decode(_thumb(phone.getvalue()))
    assert thumb.height > thumb.width


def test_score_plots_show_what_the_filter_cut_and_where(tmp_path: Path) -> None:
    """A kept-only histogram cannot show the cut: the plot adds the samples that filter
    dropped and the threshold the run was made with; a sample another filter dropped later
    counts as kept by this one (its own decision)."""
    import json

    from ccurate.report import _drops, _thresholds

    work = tmp_path / "work"
    kept = [_sample(i, scores={"quality.blur": 100.0 + i}) for i in range(4)]
    w = ShardWriter(work / "30_dedup" / "part-00000")
    for s in kept:
        w.write(s)
    w.commit({})
    cut = [_sample(10 + i, scores={"quality.blur": 5.0 + i}) for i in range(3)]
    for s in cut:
        s.drop("blurry", "quality")
    other = _sample(20, scores={"quality.blur": 250.0})
    other.drop("watermark", "watermark")  # its blur score is not where quality cut
    w = ShardWriter(work / "20_filter" / "part-00000")
    for s in [*cut, other]:
        w.write(s)
    w.commit({})
    settings = {"ingest": {}, "filters": {"quality": {"min_blur": 42.5}, "safety": {}}}
    (work / "20_filter" / "_SETTINGS").write_text(json.dumps(settings))

    drops = _drops(work, per_reason=2)
    assert drops.counts == Counter({"blurry": 3, "watermark": 1})
    assert _thresholds(work) == {"quality.blur": [("quality.min_blur", 42.5)]}
    from ccurate.report import write_report

    page = write_report(work).read_text()
    assert "Score: quality.blur (kept 5, dropped 3; cut at quality.min_blur = 42.5)" in page
    (work / "20_filter" / "_SETTINGS").write_text("{not json")
    page = write_report(work).read_text()  # settings unreadable: the plot, no line
    assert "Score: quality.blur (kept 5, dropped 3)" in page
