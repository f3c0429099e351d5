"""Rebuilds over several generations (review of nightly rebuilds): what stays released when a
refetch fails or a copy appears, what is never fetched again, which settings a release was
judged under. Loopback servers count every request; each test pins one finding."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest

from ccurate.demo.corpus import landscape
from ccurate.executor import LocalExecutor
from ccurate.rebuild import RebuildConfig, rebuild
from tests.test_rebuild import FIGURE, CountingHandler, _config, _jpeg, _serve, _tiny_site

EX = LocalExecutor(1, progress=False)


def _handler() -> type[CountingHandler]:
    return type("H", (CountingHandler,), {"hits": Counter(), "fail": {}, "headers_for": {}})


def _copy_page(root: Path, name: str, copy: str, of: str = "0.jpg") -> None:
    """A new page holding a byte-identical copy of an image of the site."""
    corpus = root / "corpus"
    (corpus / "img" / copy).write_bytes((corpus / "img" / of).read_bytes())
    fig = FIGURE.format(src=f"/img/{copy}", alt="a copy of the forest edge")
    (corpus / "pages" / name).write_text(f"<html><body>{fig}</body></html>")


def _manifest(release: Path) -> list[dict[str, Any]]:
    cols = ["key", "url", "page_url", "pixel_sha256"]
    return pq.read_table(release / "manifest.parquet", columns=cols).to_pylist()


def _latest(info: dict[str, Any]) -> Path:
    assert info["latest_release"]
    return Path(info["latest_release"])


# --------------------------------------------------------------------------- F1, F5


@pytest.mark.parametrize("code", [503, 404])
def test_failed_refetch_keeps_the_released_image_and_drops_a_new_copy(
    tmp_path: Path, code: int
) -> None:
    """F1: a released image whose refetch fails stays released; a byte-identical copy
    arriving the same generation is its duplicate, not a second release of the same image."""
    _tiny_site(tmp_path)
    h = _handler()
    server, base = _serve(tmp_path / "corpus", h)
    try:
        g1 = rebuild(
            _config(tmp_path, base, ["/pages/p.html"]),
            RebuildConfig(report=False, recheck_optout_days=None),
            EX,
        )
        _copy_page(tmp_path, "q.html", "copy.jpg")
        h.fail["/img/0.jpg"] = code
        g2 = rebuild(
            _config(tmp_path, base, ["/pages/p.html", "/pages/q.html"]),
            RebuildConfig(report=False, recheck_optout_days=None, refetch_after_days=0),
            EX,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None and h.hits["/img/copy.jpg"] == 1  # the copy was fetched
    man = _manifest(_latest(g2.info))
    names = sorted(r["url"].rsplit("/", 1)[1] for r in man)
    assert names == ["0.jpg", "1.jpg"]
    assert len({r["pixel_sha256"] for r in man}) == len(man)
    assert g2.info["diff"]["added"] == 0 and g2.info["diff"]["removed"] == 0


def test_refetch_keeps_a_released_sample_against_a_new_copy_listed_first(tmp_path: Path) -> None:
    """F5: an unchanged released sample, refetched, keeps its key, page and credit; a new copy
    on a page listed before it is dropped as its duplicate (no churn, nothing removed)."""
    _tiny_site(tmp_path)
    h = _handler()
    server, base = _serve(tmp_path / "corpus", h)
    try:
        g1 = rebuild(
            _config(tmp_path, base, ["/pages/p.html"]),
            RebuildConfig(report=False, recheck_optout_days=None),
            EX,
        )
        _copy_page(tmp_path, "a.html", "aaa.jpg")
        g2 = rebuild(
            _config(tmp_path, base, ["/pages/a.html", "/pages/p.html"]),
            RebuildConfig(report=False, recheck_optout_days=None, refetch_after_days=0),
            EX,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None and h.hits["/img/aaa.jpg"] == 1
    before = {r["key"]: r for r in _manifest(g1.release)}
    after = {r["key"]: r for r in _manifest(_latest(g2.info))}
    assert after.keys() == before.keys()
    assert {r["url"] for r in after.values()} == {base + "/img/0.jpg", base + "/img/1.jpg"}
    diff = g2.info["diff"]
    assert diff["removed"] == 0 and diff["added"] == 0, diff
    dedup = pq.read_table(
        next((g2.dir / "30_dedup").glob("*.dropped.parquet")),
        columns=["url", "drop_reason", "duplicate_of"],
    ).to_pylist()
    zero = next(k for k, r in before.items() if r["url"].endswith("/0.jpg"))
    assert dedup == [
        {"url": base + "/img/aaa.jpg", "drop_reason": "duplicate_exact", "duplicate_of": zero}
    ]


# --------------------------------------------------------------------------- F3


def test_taken_down_urls_pages_hosts_and_removed_keys_are_never_requested(
    tmp_path: Path,
) -> None:
    """F3: docs: "URLs, pages and domains on the takedown list are not fetched at all", and
    removed keys are skipped: neither the opt-out re-check nor a refetched page's images
    request them (nor a blocked host's robots.txt / tdmrep.json)."""
    from ccurate.takedown import TakedownList, make_entry

    _tiny_site(tmp_path)
    corpus = tmp_path / "corpus"
    for page, img, seed in (("q.html", "2.jpg", 21), ("b.html", "b.jpg", 22)):
        (corpus / "img" / img).write_bytes(_jpeg(landscape(seed, 300, 200)))
        fig = FIGURE.format(src=f"/img/{img}", alt=f"forest edge {seed} by Ana Ruiz")
        (corpus / "pages" / page).write_text(f"<html><body>{fig}</body></html>")
    h, hb = _handler(), _handler()
    server, base = _serve(corpus, h)
    server_b, base_b = _serve(corpus, hb)
    base_b = base_b.replace("127.0.0.1", "localhost")  # a second host, on loopback
    cfg = _config(tmp_path, base, ["/pages/p.html", "/pages/q.html"])
    cfg.sources[0].urls.append(base_b + "/pages/b.html")
    lst = TakedownList(tmp_path / "catalog")
    try:
        g1 = rebuild(cfg, RebuildConfig(report=False, recheck_optout_days=None), EX)
        lst.add(
            [
                make_entry("url", base + "/img/0.jpg", "DMCA"),
                make_entry("page_url", base + "/pages/q.html", "site owner"),
                make_entry("domain", "localhost", "host owner"),
            ]
        )
        h.hits.clear()
        hb.hits.clear()
        g2 = rebuild(cfg, RebuildConfig(report=False, recheck_optout_days=0), EX)
        gen2 = (Counter(h.hits), Counter(hb.hits))
        # the URL entry withdrawn: /img/0.jpg stays out as a removed key
        lines = lst.path.read_text().splitlines()
        lst.path.write_text("".join(x + "\n" for x in lines if "/img/0.jpg" not in x))
        h.hits.clear()
        hb.hits.clear()
        g3 = rebuild(
            cfg, RebuildConfig(report=False, recheck_optout_days=0, refetch_after_days=0), EX
        )
    finally:
        for s in (server, server_b):
            s.shutdown()
            s.server_close()
    assert g1.release is not None and len(_manifest(g1.release)) == 4
    for hits, b in (gen2, (h.hits, hb.hits)):
        assert not b, b  # the taken-down host: not even robots.txt
        assert not {"/img/0.jpg", "/pages/q.html", "/img/2.jpg"} & set(hits), hits
    assert g2.info["recheck"]["takedown_not_checked"] == 3
    assert gen2[0]["/img/1.jpg"] == 1  # the one still released was re-checked
    assert h.hits["/pages/p.html"] == 1 and h.hits["/img/1.jpg"] >= 1  # refetched
    assert g2.info["diff"]["removed_by_reason"] == {"takedown": 3}
    man = _manifest(_latest(g3.info))
    assert [r["url"] for r in man] == [base + "/img/1.jpg"]
    drops = pq.read_table(
        next((g3.dir / "10_ingest").glob("*.dropped.parquet")), columns=["url", "dropped_by"]
    ).to_pylist()
    assert {"url": base + "/img/0.jpg", "dropped_by": "takedown"} in drops


# --------------------------------------------------------------------------- F2


def test_a_licence_policy_change_reaches_released_samples_and_the_card_says_so(
    tmp_path: Path,
) -> None:
    """F2: after `policy` goes noncommercial -> commercial, a released CC BY-NC sample is
    withdrawn (its stored licence judged by the licence filter's policy, no refetch), and
    rebuild.json and the card say how many samples were judged under earlier settings."""
    import json

    _tiny_site(tmp_path, n=1)
    corpus = tmp_path / "corpus"
    (corpus / "img" / "nc.jpg").write_bytes(_jpeg(landscape(31, 300, 200)))
    fig = FIGURE.format(src="/img/nc.jpg", alt="forest edge nc by Ana Ruiz")
    fig = fig.replace("licenses/by/4.0", "licenses/by-nc/4.0").replace("BY 4.0", "BY-NC 4.0")
    (corpus / "pages" / "nc.html").write_text(f"<html><body>{fig}</body></html>")
    server, base = _serve(corpus, _handler())
    rc = RebuildConfig(report=False, recheck_optout_days=None)
    cfg = _config(tmp_path, base, ["/pages/p.html", "/pages/nc.html"])
    try:
        cfg.filters.license.policy = "noncommercial"
        g1 = rebuild(cfg, rc, EX)
        cfg.filters.license.policy = "commercial"
        g2 = rebuild(cfg, rc, EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None
    assert {r["url"] for r in _manifest(g1.release)} == {base + "/img/0.jpg", base + "/img/nc.jpg"}
    assert g2.release is not None
    assert [r["url"] for r in _manifest(g2.release)] == [base + "/img/0.jpg"]
    assert g2.info["diff"]["removed_by_reason"] == {"license_not_allowed": 1}
    gate = pq.read_table(next((g2.dir / "50_release_input").glob("*.dropped.parquet")))
    assert gate.column("removed_because").to_pylist()[0].startswith("policy changed: CC-BY-NC")
    settings = g2.info["settings"]
    assert settings["changed_since_last_generation"] is True
    assert settings["released_under_earlier_settings"] == 1
    rel = json.loads((g2.release / "release.json").read_text())
    assert rel["run_info"]["rebuild"]["settings"]["released_under_earlier_settings"] == 1
    card = (g2.release / "README.md").read_text()
    assert "1 of the published samples were judged under earlier filter" in card
    assert g1.info["settings"]["released_under_earlier_settings"] == 0


# --------------------------------------------------------------------------- F7


def test_near_copies_of_a_takedown_are_not_captioned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """F7: a resized copy of an `--image` takedown is known by its pHash after ingest: the
    caption step (BLIP-2, the caption cache) never sees it; the gate still drops it."""
    from ccurate.captioning.stage import CaptionStage
    from ccurate.takedown import TakedownList, image_entry
    from tests.test_rebuild import _extra_page

    seen: list[str] = []
    real = CaptionStage.process

    def spy(self: CaptionStage, batch: list[Any]) -> list[Any]:
        seen.extend(s.url for s in batch if s.kept)
        return real(self, batch)

    monkeypatch.setattr(CaptionStage, "process", spy)
    _tiny_site(tmp_path)
    corpus = tmp_path / "corpus"
    server, base = _serve(corpus, _handler())
    rc = RebuildConfig(report=False, recheck_optout_days=None)
    try:
        rebuild(_config(tmp_path, base, ["/pages/p.html"]), rc, EX)
        TakedownList(tmp_path / "catalog").add([image_entry(corpus / "img" / "0.jpg", "request")])
        g2 = rebuild(_config(tmp_path, base, ["/pages/p.html"]), rc, EX)  # 0.jpg removed
        _extra_page(corpus, corpus / "img" / "0.jpg")
        seen.clear()
        g3 = rebuild(_config(tmp_path, base, ["/pages/p.html", "/pages/extra-00.html"]), rc, EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g2.info["diff"]["removed_by_reason"] == {"takedown": 1}
    assert seen == [base + "/img/extra-new.jpg"]
    urls = {r["url"] for r in _manifest(_latest(g3.info))}
    assert urls == {base + "/img/1.jpg", base + "/img/extra-new.jpg"}
    gate = pq.read_table(
        next((g3.dir / "50_release_input").glob("g0003-*.dropped.parquet")),
        columns=["url", "drop_reason"],
    ).to_pylist()
    assert gate == [{"url": base + "/img/extra-copy.jpg", "drop_reason": "takedown"}]


# --------------------------------------------------------------------------- F6


def test_a_rebuild_card_counts_samples_as_the_diff_and_replaced_ones_apart(
    tmp_path: Path,
) -> None:
    """F6: the card of a rebuild release counts per key as diff.json (a key whose plan record
    and released record are both dropped counts once) and lists a refetched, still published
    sample as replaced, not dropped (`superseded`)."""
    import json

    from ccurate.takedown import TakedownList, make_entry

    _tiny_site(tmp_path)
    server, base = _serve(tmp_path / "corpus", _handler())
    cfg = _config(tmp_path, base, ["/pages/p.html"])
    try:
        rebuild(cfg, RebuildConfig(report=False, recheck_optout_days=None), EX)
        TakedownList(tmp_path / "catalog").add([make_entry("url", base + "/img/1.jpg", "DMCA")])
        rc = RebuildConfig(report=False, recheck_optout_days=None, refetch_after_days=0)
        g2 = rebuild(cfg, rc, EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g2.release is not None
    diff = json.loads((g2.dir / "diff.json").read_text())
    assert diff["removed_by_reason"] == {"takedown": 1}
    card = (g2.release / "README.md").read_text()
    selected = card.split("## How samples were selected")[1].split("### Filters")[0]
    assert "1 samples were removed, 0 added and 0 changed" in selected
    assert "1 released samples were fetched again and replaced" in selected
    assert "| `takedown` | 1 |" in selected
    assert "superseded" not in selected


def test_dedup_previous_own_key_is_opt_in(tmp_path: Path) -> None:
    """The dedup switch behind F5: a row matching a `previous` row of its own key is that
    sample again (kept) only with `previous_own_key_kept`; a copy under another key is a
    duplicate either way. Off (the default), `ccurate run` keeps dropping re-released keys."""
    import pyarrow as pa

    from ccurate.filters.dedup import DedupConfig, _load_rows, plan_dedup
    from ccurate.filters.dedup_reference import load_reference

    sha, pix, ph = "a" * 64, "b" * 64, "0123456789abcdef"
    row = {"sha256": sha, "pixel_sha256": pix, "phash": ph, "dhash": ph, "license": "CC-BY-4.0"}
    pq.write_table(
        pa.Table.from_pylist([{"key": "k1", **row}, {"key": "k2", **row}]), tmp_path / "s.parquet"
    )
    pq.write_table(pa.Table.from_pylist([{"key": "k1", **row}]), tmp_path / "prev.parquet")
    for own, kept in ((False, set()), (True, {"k1"})):
        cfg = DedupConfig(previous=[str(tmp_path / "prev.parquet")], previous_own_key_kept=own)
        rows = _load_rows([str(tmp_path / "s")], cfg)
        ref = load_reference(cfg.previous, cfg.hash, cfg.verify == "dhash")
        plan = plan_dedup(rows, cfg, None, ref).table.to_pylist()
        dropped = {r["key"]: r["duplicate_of"] for r in plan if r["action"] == "drop"}
        assert {"k1", "k2"} - dropped.keys() == kept
        assert dropped["k2"] == "k1"


# --------------------------------------------------------------------------- review 2: F1, F2


def test_a_policy_withdrawn_image_is_released_from_its_admitted_copy(tmp_path: Path) -> None:
    """Review 2 F1: the policy goes noncommercial -> commercial as a byte-identical copy of a
    released CC BY-NC image arrives under CC BY. The NC record is withdrawn, so dedup's
    `previous` must not hold it: the BY copy is released, not dropped as its duplicate."""
    _tiny_site(tmp_path, n=1)
    corpus = tmp_path / "corpus"
    (corpus / "img" / "nc.jpg").write_bytes(_jpeg(landscape(31, 300, 200)))
    fig = FIGURE.format(src="/img/nc.jpg", alt="forest edge nc by Ana Ruiz")
    fig = fig.replace("licenses/by/4.0", "licenses/by-nc/4.0").replace("BY 4.0", "BY-NC 4.0")
    (corpus / "pages" / "nc.html").write_text(f"<html><body>{fig}</body></html>")
    server, base = _serve(corpus, _handler())
    rc = RebuildConfig(report=False, recheck_optout_days=None)
    try:
        cfg = _config(tmp_path, base, ["/pages/p.html", "/pages/nc.html"])
        cfg.filters.license.policy = "noncommercial"
        g1 = rebuild(cfg, rc, EX)
        _copy_page(tmp_path, "by.html", "copy.jpg", of="nc.jpg")  # under CC BY 4.0
        cfg = _config(tmp_path, base, ["/pages/p.html", "/pages/nc.html", "/pages/by.html"])
        cfg.filters.license.policy = "commercial"
        g2 = rebuild(cfg, rc, EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None and len(_manifest(g1.release)) == 2
    assert g2.release is not None
    assert {r["url"] for r in _manifest(g2.release)} == {
        base + "/img/0.jpg",
        base + "/img/copy.jpg",
    }
    assert g2.info["diff"]["removed_by_reason"] == {"license_not_allowed": 1}
    assert g2.info["diff"]["added"] == 1
    deduped = [pq.read_table(p).num_rows for p in (g2.dir / "30_dedup").glob("*.dropped.parquet")]
    assert sum(deduped) == 0


class _Redirects(CountingHandler):
    """`redirects`: path -> Location, answered 302 (and counted)."""

    redirects: ClassVar[dict[str, str]] = {}

    def do_GET(self) -> None:
        to = self.redirects.get(self.path)
        if to is None:
            super().do_GET()
            return
        type(self).hits[self.path] += 1
        self.send_response(302)
        self.send_header("Location", to)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _redirect_site(root: Path) -> type[_Redirects]:
    """p.html links /img/0.jpg and /r/x.jpg; /r/x.jpg redirects to /img/t.jpg."""
    _tiny_site(root, n=1)
    corpus = root / "corpus"
    (corpus / "img" / "t.jpg").write_bytes(_jpeg(landscape(41, 300, 200)))
    page = corpus / "pages" / "p.html"
    fig = FIGURE.format(src="/r/x.jpg", alt="forest edge t by Ana Ruiz")
    page.write_text(page.read_text().replace("</body>", f"{fig}</body>"))
    attrs = {"hits": Counter(), "fail": {}, "headers_for": {}, "redirects": {}}
    h = type("H", (_Redirects,), attrs)
    h.redirects["/r/x.jpg"] = "/img/t.jpg"
    return h


def test_a_redirect_to_a_taken_down_url_is_not_followed(tmp_path: Path) -> None:
    """Review 2 F2: a URL taken down before we ever held it, reached through a redirect from
    a linked URL: the hop is not requested and the sample is dropped as a takedown."""
    from ccurate.takedown import TakedownList, make_entry

    h = _redirect_site(tmp_path)
    server, base = _serve(tmp_path / "corpus", h)
    try:
        TakedownList(tmp_path / "catalog").add([make_entry("url", base + "/img/t.jpg", "DMCA")])
        g1 = rebuild(
            _config(tmp_path, base, ["/pages/p.html"]),
            RebuildConfig(report=False, recheck_optout_days=None),
            EX,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert h.hits["/r/x.jpg"] == 1 and "/img/t.jpg" not in h.hits, h.hits
    assert g1.release is not None
    assert [r["url"] for r in _manifest(g1.release)] == [base + "/img/0.jpg"]
    drops = pq.read_table(
        next((g1.dir / "10_ingest").glob("*.dropped.parquet")),
        columns=["url", "drop_reason", "dropped_by", "removed_because"],
    ).to_pylist()
    assert len(drops) == 1 and drops[0]["url"] == base + "/r/x.jpg"
    assert (drops[0]["drop_reason"], drops[0]["dropped_by"]) == ("takedown", "takedown")
    assert drops[0]["removed_because"].startswith(f"redirect to {base}/img/t.jpg")


def test_the_optout_recheck_does_not_follow_a_redirect_to_a_taken_down_url(
    tmp_path: Path,
) -> None:
    """Review 2 F2: released /r/x.jpg was fetched through a redirect to /img/t.jpg, which is
    then taken down: the re-check does not request it, and the sample is withdrawn."""
    from ccurate.takedown import TakedownList, make_entry

    h = _redirect_site(tmp_path)
    server, base = _serve(tmp_path / "corpus", h)
    cfg = _config(tmp_path, base, ["/pages/p.html"])
    try:
        g1 = rebuild(cfg, RebuildConfig(report=False, recheck_optout_days=None), EX)
        TakedownList(tmp_path / "catalog").add([make_entry("url", base + "/img/t.jpg", "DMCA")])
        h.hits.clear()
        g2 = rebuild(cfg, RebuildConfig(report=False, recheck_optout_days=0), EX)
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None and len(_manifest(g1.release)) == 2
    assert h.hits["/r/x.jpg"] == 1 and h.hits["/img/0.jpg"] == 1, h.hits  # both re-checked
    assert "/img/t.jpg" not in h.hits, h.hits
    assert [r["url"] for r in _manifest(_latest(g2.info))] == [base + "/img/0.jpg"]
    assert g2.info["diff"]["removed_by_reason"] == {"takedown": 1}
    gate = pq.read_table(
        next((g2.dir / "50_release_input").glob("*.dropped.parquet")),
        columns=["url", "removed_because"],
    ).to_pylist()
    assert [r["url"] for r in gate] == [base + "/r/x.jpg"]
    assert gate[0]["removed_because"].startswith("redirect to a taken-down URL found by the re")
