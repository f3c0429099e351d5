"""Which scope an RDFa/ccREL licence gets (ingest.html): a block whose RDFa subject is the
document licenses the page, so its licence is page evidence for the page's images, never
`container` (image-level) evidence; Creative Commons licence badges (the chooser's icons,
88x31 buttons) make no block a container and take no licence or author as their own.

A page licence recorded at image level is the worst bug the licence filter can be fed: it
admits a third-party photo under `evidence_levels = ["image"]`."""

from __future__ import annotations

import pytest

from ccurate.filters.license_filter import LicenseConfig, LicenseFilter
from ccurate.ingest.html import PageExtract, extract_images
from ccurate.record import Sample

PAGE = "https://blog.example/2024/post.html"
BY_4 = "https://creativecommons.org/licenses/by/4.0/"
BY_SA_4 = "https://creativecommons.org/licenses/by-sa/4.0/"
NC_ND = "https://creativecommons.org/licenses/by-nc-nd/4.0/?ref=chooser-v1"
WIRE = "https://news-agency.example/wire/photo123.jpg"
BADGES = (
    "https://mirrors.creativecommons.org/presskit/icons/cc.svg?ref=chooser-v1",
    "https://mirrors.creativecommons.org/presskit/icons/by.svg?ref=chooser-v1",
)
# the chooser.creativecommons.org snippet, as it writes it
CHOOSER = (
    '<p xmlns:cc="http://creativecommons.org/ns#" xmlns:dct="http://purl.org/dc/terms/">'
    '<a property="dct:title" rel="cc:attributionURL" href="https://blog.example">Jane\'s photo'
    ' blog</a> by <a rel="cc:attributionURL dct:creator" property="cc:attributionName" '
    'href="https://blog.example/about">Jane Doe</a> is licensed under <a href="'
    f'{NC_ND}" target="_blank" rel="license noopener noreferrer" style="display:inline-block;">'
    f'CC BY-NC-ND 4.0<img style="height:22px!important" src="{BADGES[0]}" alt="">'
    f'<img style="height:22px!important" src="{BADGES[1]}" alt=""></a></p>'
)


def ev(s: Sample | PageExtract) -> list[tuple[str, str, str]]:
    items = s.page_license_evidence if isinstance(s, PageExtract) else s.license_evidence
    return [(e.scope, e.kind, e.value) for e in items]


def read(html: str, url: str = PAGE) -> PageExtract:
    page = extract_images(html, url)
    assert page.error is None
    return page


def by_url(page: PageExtract) -> dict[str, Sample]:
    return {s.url: s for s in page.images}


def image_only_keeps(s: Sample) -> bool:
    return LicenseFilter(LicenseConfig(evidence_levels=["image"])).decide(s).keep


def post(about: str, head: str = "") -> str:
    """A blog post wrapped in a ccREL cc:Work block about `about`, holding a wire photo."""
    return f"""<html><head><title>Post</title>{head}</head><body>
    <div about="{about}" typeof="cc:Work" xmlns:cc="http://creativecommons.org/ns#">
     <h1 property="dct:title">My trip</h1>
     <p>Some text. <img src="{WIRE}" alt="Wire photo"></p>
     <p>This post is licensed under <a rel="cc:license" href="{BY_4}">CC BY 4.0</a></p>
    </div></body></html>"""


# --------------------------------------------------------------------------- about = the page
@pytest.mark.parametrize(
    ("about", "head"),
    [
        (PAGE, ""),
        ("", ""),
        ("post.html", ""),  # relative, against the page URL
        ("/2024/post.html#content", ""),  # a fragment of the page is still the page
        ("http://blog.example/2024/post.html", ""),  # the page under http
        ("post.html", '<base href="https://blog.example/2024/">'),
        ("", '<base href="https://blog.example/2024/post.html">'),
        (
            "https://blog.example/p/42",
            '<link rel="canonical" href="https://blog.example/p/42">',
        ),
    ],
)
def test_block_about_the_page_gives_page_evidence(about: str, head: str) -> None:
    page = read(post(about, head))
    (s,) = page.images
    assert ev(s) == [("page", "ccrel", BY_4)] == ev(page)
    assert s.title == "Post"  # the page's dct:title is not the wire photo's title
    assert not image_only_keeps(s)  # the page's licence is no image-level evidence
    assert LicenseFilter(LicenseConfig()).decide(s).keep  # page level still counts by default
    assert s.license_rule is not None and s.license_rule.endswith("@page")


def test_relative_about_against_base_naming_another_page_stays_in_its_block() -> None:
    """`about` resolved against <base> names some other resource: not the document, so its
    licence is never the page's; it stays with the image inside (the embed pattern)."""
    page = read(post("other.html", '<base href="https://elsewhere.example/x/">'))
    (s,) = page.images
    assert ev(s) == [("container", "ccrel", BY_4)]
    assert ev(page) == []


def test_embed_about_a_photo_page_licenses_its_thumbnail_not_the_page() -> None:
    """Flickr's old embed (`about` = the photo's page around its thumbnail) licenses the
    thumbnail; the blogger's own photos beside it get nothing from it, and a credit block
    about another work with no image here is nobody's evidence (never the page's)."""
    html = f"""<html><head><title>Blog</title></head><body>
    <p><img src="/own/1.jpg" alt="my photo"></p>
    <div xmlns:cc="http://creativecommons.org/ns#" about="https://www.flickr.com/photos/j/1">
      <a href="https://www.flickr.com/photos/j/1"><img src="https://live.staticflickr.com/1.jpg"></a>
      <a rel="cc:attributionURL" href="https://www.flickr.com/photos/j/">Jane</a>
      <a rel="license" href="{BY_4}">CC BY</a></div>
    <div xmlns:cc="http://creativecommons.org/ns#" about="https://music.example/song">
      A song by Bob, <a rel="license" href="{BY_SA_4}">CC BY-SA</a></div>
    <div xmlns:cc="http://creativecommons.org/ns#" about="https://other.example/album">
      <img src="/al/1.jpg"><img src="/al/2.jpg"> <a rel="license" href="{BY_SA_4}">by-sa</a></div>
    </body></html>"""
    page = read(html)
    imgs = by_url(page)
    assert ev(imgs["https://live.staticflickr.com/1.jpg"]) == [("container", "ccrel", BY_4)]
    assert ev(imgs["https://blog.example/own/1.jpg"]) == []
    # about an album elsewhere, around two images: not known to be either one's
    assert ev(imgs["https://blog.example/al/1.jpg"]) == ev(imgs["https://blog.example/al/2.jpg"])
    assert ev(imgs["https://blog.example/al/1.jpg"]) == []
    assert ev(page) == []


def test_block_about_one_image_inside_a_block_about_the_page() -> None:
    """An inner `about` naming one image keeps image scope for exactly that image; the outer
    block about the document licenses the page (not the other photo at image level)."""
    html = f"""<html><head><title>Post</title></head><body>
    <article about="" typeof="cc:Work" xmlns:cc="http://creativecommons.org/ns#">
      <div about="/img/mine.jpg"><img src="/img/mine.jpg">
        <a rel="license" href="{BY_SA_4}">CC BY-SA</a></div>
      <p><img src="{WIRE}"></p>
      <a rel="cc:license" href="{BY_4}">This post: CC BY</a>
    </article></body></html>"""
    imgs = by_url(read(html))
    page_ev = [("page", "ccrel", BY_4)]
    mine = imgs["https://blog.example/img/mine.jpg"]
    assert ev(mine) == [("image", "ccrel", BY_SA_4), *page_ev]
    assert image_only_keeps(mine) and mine.license_rule == "commercial:CC-BY-SA-4.0@image"
    assert ev(imgs[WIRE]) == page_ev
    assert not image_only_keeps(imgs[WIRE])


def test_untyped_or_work_typed_block_without_about_is_the_document() -> None:
    """No `about`: `xmlns:cc` alone inherits the document as subject; `typeof="cc:Work"`
    may type the whole post; an image type around several images names none of them."""
    html = f"""<html><head><title>Post</title></head><body>
    <div xmlns:cc="http://creativecommons.org/ns#"><img src="/a.jpg">
      <a rel="cc:license" href="{BY_4}">by</a></div>
    <div typeof="cc:Work"><h2>Post</h2><img src="/b.jpg"><a rel="license" href="{BY_4}">by</a></div>
    <div typeof="dcmitype:StillImage"><img src="/c.jpg"><img src="/d.jpg">
      <a rel="license" href="{BY_SA_4}">by-sa</a></div>
    </body></html>"""
    page = read(html)
    assert {e.scope for s in page.images for e in s.license_evidence} == {"page"}
    assert not any(image_only_keeps(s) for s in page.images)


def test_image_typed_block_of_one_image_stays_its_container() -> None:
    """A block whose `typeof` makes a new subject typed as an image, around one image (a
    lazy-load `<img>` and its `<noscript>` copy are one; a licence badge is none)."""
    html = f"""<html><body>
    <div typeof="schema:Photograph dcmitype:StillImage">
      <img data-src="/a.jpg"><noscript><img src="/a.jpg"></noscript>
      <a rel="license" href="{BY_4}"><img src="https://i.creativecommons.org/l/by/4.0/88x31.png"></a>
    </div></body></html>"""
    imgs = by_url(read(html))
    a = imgs["https://blog.example/a.jpg"]
    assert ev(a) == [("container", "rel_license", BY_4)]
    badge = imgs["https://i.creativecommons.org/l/by/4.0/88x31.png"]
    assert ev(badge) == []


# --------------------------------------------------------------------------- the CC chooser
def test_chooser_snippet_in_a_sidebar_licenses_the_page() -> None:
    html = f"""<html><head><title>Jane's photo blog</title></head><body><main><figure>
    <img src="/2024/lake.jpg" alt="Lake at dawn"><figcaption>Lake at dawn</figcaption></figure>
    </main><aside class="widget">{CHOOSER}</aside></body></html>"""
    page = read(html)
    imgs = by_url(page)
    assert ev(page) == [("page", "rel_license", NC_ND)]
    lake = imgs["https://blog.example/2024/lake.jpg"]
    assert ev(lake) == [("page", "rel_license", NC_ND)]
    assert lake.author is None  # the page licence's attribution is the page's
    assert lake.extra["page_author"] == "Jane Doe"
    for url in BADGES:  # CC's icons: page evidence like any image, nothing of their own
        assert ev(imgs[url]) == ev(page)
        assert imgs[url].author is None
    # the site licence is non-commercial: not admitted under the commercial policy
    assert not LicenseFilter(LicenseConfig()).decide(lake).keep


def test_chooser_snippet_as_the_only_container_content_is_no_container() -> None:
    """The chooser inside an image-typed block that holds only its badges: no container."""
    html = f"""<html><body><img src="/photo.jpg">
    <div typeof="dcmitype:StillImage">{CHOOSER}</div></body></html>"""
    page = read(html)
    photo = by_url(page)["https://blog.example/photo.jpg"]
    assert ev(photo) == [("page", "rel_license", NC_ND)] == ev(page)


def test_chooser_snippet_below_a_figure_with_its_own_image_licence() -> None:
    """The photo's own licence (image level) decides; the site's chooser licence below it
    is page evidence, after it."""
    html = f"""<html><head><title>Blog</title></head><body><article>
    <figure about="/photos/lake.jpg"><img src="/photos/lake.jpg">
      <figcaption>Photo by Li Wei, <a rel="license" href="{BY_4}">CC BY 4.0</a></figcaption>
    </figure>
    <p>Words.</p>{CHOOSER}</article></body></html>"""
    page = read(html)
    imgs = by_url(page)
    lake = imgs["https://blog.example/photos/lake.jpg"]
    assert ev(lake)[0] == ("image", "ccrel", BY_4)
    assert ("page", "rel_license", NC_ND) in ev(lake)
    assert not any(e[2] == NC_ND and e[0] != "page" for e in ev(lake))
    assert lake.author == "Li Wei"
    decision = LicenseFilter(LicenseConfig()).decide(lake)
    assert decision.keep and lake.license_rule == "commercial:CC-BY-4.0@image"
    for url in BADGES:
        assert ev(imgs[url]) == ev(page) and imgs[url].author is None


def test_chooser_snippet_in_a_figure_caption_is_the_photo_not_the_badges() -> None:
    """The chooser in a figure's caption licenses the figure's photo (container); its badges
    take neither the licence nor the author, nor count as the figure's images."""
    html = f"""<html><head><title>Blog</title></head><body><figure>
    <img src="/lake.jpg"><figcaption>{CHOOSER}</figcaption></figure></body></html>"""
    page = read(html)
    imgs = by_url(page)
    lake = imgs["https://blog.example/lake.jpg"]
    assert ("container", "rel_license", NC_ND) in ev(lake)
    assert not any("mixed-rights" in e[2] for e in ev(lake))  # one image, not three
    assert lake.author == "Jane Doe"
    assert ev(page) == []
    for url in BADGES:
        assert ev(imgs[url]) == [] and imgs[url].author is None


def test_block_about_one_image_lends_its_licence_to_no_other_image_inside() -> None:
    """RDFa: `about` names the subject of the block's `rel=license`; a second photo in the
    same block is not that subject, so it gets no evidence from it (it had `container`)."""
    html = f"""<html><head><title>Post</title></head><body>
    <div about="/img/a.jpg"><img src="/img/a.jpg"><img src="/img/b.jpg">
      <a rel="license" href="{BY_4}">CC BY</a> Photo by <a href="/u/jane">Jane Doe</a></div>
    </body></html>"""
    imgs = by_url(read(html))
    assert ev(imgs["https://blog.example/img/a.jpg"]) == [("image", "ccrel", BY_4)]
    assert ev(imgs["https://blog.example/img/b.jpg"]) == []
    assert not image_only_keeps(imgs["https://blog.example/img/b.jpg"])
