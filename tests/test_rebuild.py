"""Incremental rebuilds on the demo corpus: only new work is fetched, takedowns and opt-outs
remove samples (and their near copies) for good, retries come back, the diff says so.

One scenario, four generations, run once for the module (`history`); each test checks
one property of it. The loopback server counts every request, so "only new work" is
measured at the server, not inferred from our own counters.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from ccurate.config import parse_config
from ccurate.demo.corpus import generate, landscape
from ccurate.executor import LocalExecutor
from ccurate.rebuild import RebuildConfig, rebuild, rebuild_lock
from ccurate.takedown import TakedownList, image_entry, make_entry


class CountingHandler(SimpleHTTPRequestHandler):
    """Static files + request counts, scripted failures and extra headers per path."""

    hits: ClassVar[Counter[str]] = Counter()
    fail: ClassVar[dict[str, int]] = {}
    headers_for: ClassVar[dict[str, list[tuple[str, str]]]] = {}

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        type(self).hits[self.path] += 1
        code = self.fail.get(self.path)
        if code:
            self.send_error(code)
            return
        super().do_GET()

    def end_headers(self) -> None:
        for k, v in self.headers_for.get(self.path, []):
            self.send_header(k, v)
        super().end_headers()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


FIGURE = (
    '<figure><img src="{src}" alt="{alt}"><figcaption>Photo by <span class="author">Ana Ruiz'
    '</span>, <a rel="license" href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0'
    "</a></figcaption></figure>"
)


def _extra_page(root: Path, copy_of: Path) -> None:
    """A new page: a resized copy of a taken-down image, and a fresh photo."""
    orig = Image.open(copy_of).convert("RGB")
    (root / "img" / "extra-copy.jpg").write_bytes(
        _jpeg(orig.resize((orig.width * 3 // 4, orig.height * 3 // 4), Image.Resampling.LANCZOS))
    )
    (root / "img" / "extra-new.jpg").write_bytes(_jpeg(landscape(987_654, 480, 360)))
    figs = FIGURE.format(src="/img/extra-copy.jpg", alt="valley at dawn by Ana Ruiz")
    figs += FIGURE.format(src="/img/extra-new.jpg", alt="alpine meadow by Ana Ruiz")
    (root / "pages" / "extra-00.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>extra</title></head>"
        f"<body>{figs}</body></html>"
    )


def _config(root: Path, base: str, pages: list[str]) -> Any:
    return parse_config(
        {
            "run": {
                "name": "t",
                "work_dir": str(root / "work"),
                "release_dir": str(root / "releases"),
                "catalog_dir": str(root / "catalog"),
                "partition_size": 8,
            },
            "sources": [{"type": "pages", "urls": [base + p for p in pages]}],
            "ingest": {"allow_private": True, "image_size": 128, "retries": 0, "threads": 8},
            "filters": {
                "watermark": {"enabled": False},
                "safety": {"enabled": False},
                "clip_score": {"enabled": False},
                "aesthetic": {"enabled": False},
            },
            "dedup": {"radius": 6},
            "shards": {"samples_per_shard": 64},
        }
    )


def _release_urls(release: Path) -> set[str]:
    return set(pq.read_table(release / "manifest.parquet", columns=["url"])["url"].to_pylist())


def _served(hits: Counter[str]) -> dict[str, int]:
    return {p: n for p, n in hits.items() if p.startswith(("/img/", "/pages/"))}


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("rebuild")
    corpus = generate(root / "corpus", n_images=24, per_page=4)
    handler: type[CountingHandler] = type(
        "H", (CountingHandler,), {"hits": Counter(), "fail": {}, "headers_for": {}}
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root / "corpus")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    ex = LocalExecutor(1, progress=False)
    quiet: dict[str, Any] = {"report": False, "retry_after_hours": 0.0}
    half = corpus.pages[: len(corpus.pages) // 2]
    keep_first = [i for i in corpus.images if i.expected == "keep" and i.page in half]
    copied = {i.group for i in corpus.images if i.group}
    flaky = next(i for i in keep_first if i.path not in copied)  # no planted copy to win
    keep_first.remove(flaky)
    out: dict[str, Any] = {
        "root": root,
        "base": base,
        "corpus": corpus,
        "half": half,
        "flaky": flaky,
        "gens": [],
        "hits": [],
    }

    def step(pages: list[str], **rc: Any) -> None:
        handler.hits.clear()
        r = rebuild(_config(root, base, pages), RebuildConfig(**quiet, **rc), ex)
        out["gens"].append(r)
        out["hits"].append(_served(handler.hits))

    try:
        # gen 1: half the pages; one image answers 503 (a transient failure)
        handler.fail[flaky.path] = 503
        step(half, recheck_optout_days=None)
        handler.fail.clear()
        rel1 = out["gens"][0].release
        kept1 = [i for i in keep_first if base + i.path in _release_urls(rel1)]
        x, y, w = kept1[0], kept1[1], kept1[2]
        out.update(x=x, y=y, w=w)
        # takedowns: X by its image file (hashes, near copies), Y by URL
        TakedownList(root / "catalog").add(
            [
                image_entry(root / "corpus" / x.path.lstrip("/"), "rights holder asked"),
                make_entry("url", base + y.path, "DMCA notice"),
            ]
        )
        # gen 2: all pages (new sources); the 503 image is due for a retry
        step(corpus.pages, recheck_optout_days=None)
        # gen 3: a new page with a resized copy of X and a new photo; W now opts out
        _extra_page(root / "corpus", root / "corpus" / x.path.lstrip("/"))
        handler.headers_for[w.path] = [("X-Robots-Tag", "noai")]
        pages3 = [*corpus.pages, "/pages/extra-00.html"]
        step(pages3, recheck_optout_days=0)
        # gen 4: everything fetched again; W's opt-out lifted; one page's alt texts changed
        handler.headers_for.clear()
        changed_page = next(
            p
            for p in corpus.pages[len(half) :]
            if any(i.page == p and i.expected == "keep" for i in corpus.images)
        )
        f = root / "corpus" / changed_page.lstrip("/")
        f.write_text(f.read_text().replace(" photographed by ", " captured by "))
        out["changed_page"] = changed_page
        step(pages3, recheck_optout_days=None, refetch_after_days=0)
    finally:
        server.shutdown()
        server.server_close()
    return out


def test_first_rebuild_fetches_everything_once(history: dict[str, Any]) -> None:
    g1, hits = history["gens"][0], history["hits"][0]
    corpus, half = history["corpus"], history["half"]
    want = {p for p in half} | {i.path for i in corpus.images if i.page in half}
    assert set(hits) == want
    assert all(n == 1 for n in hits.values())
    assert g1.release is not None and (g1.release / "_SUCCESS").exists()
    assert g1.info["diff"]["added"] == len(_release_urls(g1.release)) > 0
    assert g1.info["plan"]["new"] == len(half)
    # the 503 is a transient failure, kept for a retry
    retry = pq.read_table(g1.dir / "retry.parquet")
    assert retry["url"].to_pylist() == [history["base"] + history["flaky"].path]


def test_second_rebuild_fetches_only_new_pages_and_the_due_retry(history: dict[str, Any]) -> None:
    g2, hits = history["gens"][1], history["hits"][1]
    corpus, half, flaky = history["corpus"], history["half"], history["flaky"]
    new_pages = set(corpus.pages) - set(half)
    want = new_pages | {i.path for i in corpus.images if i.page in new_pages} | {flaky.path}
    assert set(hits) == want, "only new pages, their images and the retried image are fetched"
    assert not any(p in hits for p in half)
    assert g2.info["plan"]["new"] == len(new_pages)
    assert g2.info["plan"]["retry_due"] == 1
    assert g2.info["plan"]["already_done"] == len(half)
    added = pq.read_table(g2.dir / "diff.parquet").to_pylist()
    by_url = {r["url"]: r for r in added}
    assert by_url[history["base"] + flaky.path]["reason"] == "previously_transient:http_503"


def test_takedowns_remove_samples_and_near_copies(history: dict[str, Any]) -> None:
    base, x, y = history["base"], history["x"], history["y"]
    g1, g2, g3 = history["gens"][:3]
    assert {base + x.path, base + y.path} <= _release_urls(g1.release)
    urls2 = _release_urls(g2.release)
    assert base + x.path not in urls2 and base + y.path not in urls2
    diff2 = json.loads((g2.dir / "diff.json").read_text())
    assert diff2["removed_by_reason"] == {"takedown": 2}
    # the resized copy of X on a page found later never enters a release
    urls3 = _release_urls(g3.release)
    assert base + "/img/extra-copy.jpg" not in urls3
    assert base + "/img/extra-new.jpg" in urls3
    gate = pq.read_table(sorted((g3.dir / "50_release_input").glob("g0003-*.dropped.parquet"))[0])
    why = dict(zip(gate["url"].to_pylist(), gate["drop_reason"].to_pylist(), strict=True))
    assert why[base + "/img/extra-copy.jpg"] == "takedown"
    # the catalog (delta-recorded per generation) explains the removal too
    from ccurate.shards.catalog import Catalog

    with Catalog(history["root"] / "catalog", read_only=True) as cat:
        assert cat.diff(g1.release, g2.release)["removed_why"] == {"dropped:takedown": 2}
        published = {g.release.name for g in history["gens"] if g.release is not None}
        assert set(cat.stats()["releases"]) == published
    # removals are persisted with their hashes (catalog dir, not the work dir)
    removed = pq.read_table(next((history["root"] / "catalog" / "removals").glob("*gen-0002*")))
    assert set(removed["url"].to_pylist()) == {base + x.path, base + y.path}
    assert all(removed["phash"].to_pylist())


def test_optout_recheck_removes_the_opted_out_sample(history: dict[str, Any]) -> None:
    g2, g3, hits3 = history["gens"][1], history["gens"][2], history["hits"][2]
    base, w = history["base"], history["w"]
    assert g3.info["recheck"]["optout_x_robots_tag"] == 1
    assert base + w.path not in _release_urls(g3.release)
    diff3 = json.loads((g3.dir / "diff.json").read_text())
    assert diff3["removed_by_reason"] == {"optout_x_robots_tag": 1}
    assert diff3["added"] == 1 and diff3["added_by_reason"] == {"new": 1}
    # gen 3 planned only the new page; every other image request is a re-check of a
    # released sample (one request each), nothing else was fetched again
    assert g3.info["plan"]["planned"] == 1
    released2 = {u.removeprefix(base) for u in _release_urls(g2.release)}
    img_hits = {p: n for p, n in hits3.items() if p.startswith("/img/")}
    assert set(img_hits) == released2 | {"/img/extra-copy.jpg", "/img/extra-new.jpg"}
    assert all(n == 1 for n in img_hits.values())


def test_removed_samples_never_reappear_and_changes_are_reported(history: dict[str, Any]) -> None:
    g3, g4 = history["gens"][2], history["gens"][3]
    base = history["base"]
    assert g4.info["plan"]["refetch_due"] > 0
    urls4 = _release_urls(g4.release)
    for s in (history["x"], history["y"], history["w"]):
        assert base + s.path not in urls4, f"{s.path} came back"
    assert base + "/img/extra-copy.jpg" not in urls4
    diff4 = json.loads((g4.dir / "diff.json").read_text())
    assert diff4["added"] == 0 and diff4["removed"] == 0
    corpus = history["corpus"]
    on_page = {base + i.path for i in corpus.images if i.page == history["changed_page"]}
    n_changed = len(on_page & _release_urls(g3.release))
    assert n_changed > 0
    assert diff4["changed"] == n_changed
    assert diff4["changed_fields"] == {"alt_text": n_changed}
    assert urls4 == _release_urls(g3.release)


def _tiny_site(root: Path, n: int = 2) -> None:
    (root / "corpus" / "img").mkdir(parents=True)
    (root / "corpus" / "pages").mkdir(parents=True)
    figs = ""
    for i in range(n):
        (root / "corpus" / "img" / f"{i}.jpg").write_bytes(_jpeg(landscape(5 + i, 300, 200)))
        figs += FIGURE.format(src=f"/img/{i}.jpg", alt=f"forest edge {i} by Ana Ruiz")
    (root / "corpus" / "pages" / "p.html").write_text(f"<html><body>{figs}</body></html>")


def _serve(root: Path, handler: type[CountingHandler]) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_unchanged_rebuild_publishes_nothing(tmp_path: Path) -> None:
    """Nothing new, nothing due: a generation is recorded, no release is written."""
    _tiny_site(tmp_path)
    server, base = _serve(tmp_path / "corpus", CountingHandler)
    try:
        cfg = _config(tmp_path, base, ["/pages/p.html"])
        rc = RebuildConfig(report=False, recheck_optout_days=None)
        first = rebuild(cfg, rc, LocalExecutor(1, progress=False))
        second = rebuild(cfg, rc, LocalExecutor(1, progress=False))
    finally:
        server.shutdown()
        server.server_close()
    assert first.release is not None and first.info["diff"]["added"] == 2
    assert second.release is None and second.info["generation"] == 2
    assert second.info["latest_release"] == str(first.release)
    assert second.info["plan"]["planned"] == 0


def test_transient_failures_wait_their_delay_and_give_up_after_max_attempts(tmp_path: Path) -> None:
    _tiny_site(tmp_path)
    handler: type[CountingHandler] = type(
        "H", (CountingHandler,), {"hits": Counter(), "fail": {"/img/1.jpg": 503}, "headers_for": {}}
    )
    server, base = _serve(tmp_path / "corpus", handler)
    cfg = _config(tmp_path, base, ["/pages/p.html"])
    rc = RebuildConfig(report=False, recheck_optout_days=None, retry_after_hours=1, max_attempts=2)
    t0 = 1_800_000_000.0
    plans = []
    try:
        for dt in (0, 600, 2 * 3600, 5 * 3600):  # failure, too early, retry (fails), given up
            r = rebuild(cfg, rc, LocalExecutor(1, progress=False), now=t0 + dt)
            plans.append((r.info["plan"].get("retry_due", 0), r.info["plan"]["planned"]))
            if dt == 600:
                assert r.info["plan"]["retry_waiting_or_given_up"] == 1
        retry_left = pq.read_table(r.dir / "retry.parquet").num_rows
    finally:
        server.shutdown()
        server.server_close()
    assert plans == [(0, 1), (0, 0), (1, 1), (0, 0)]
    assert handler.hits["/img/1.jpg"] == 2 and handler.hits["/img/0.jpg"] == 1
    assert retry_left == 0


def _write_config(path: Path, work: Path, extra: str = "") -> None:
    path.write_text(
        f'[run]\nwork_dir = "{work}"\n'
        '[[sources]]\ntype = "pages"\nurls = ["http://127.0.0.1:9/p.html"]\n'
        f"[rebuild]\nreport = false\n{extra}"
    )


def test_lock_refuses_a_second_rebuild(tmp_path: Path) -> None:
    from ccurate.cli import app

    work = tmp_path / "work"
    code = (
        "import sys, time\nfrom ccurate.rebuild import rebuild_lock\n"
        "with rebuild_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(work)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        cfg = tmp_path / "c.toml"
        _write_config(cfg, work)
        res = CliRunner().invoke(app, ["rebuild", str(cfg)])
        assert res.exit_code == 4, res.output
        text = "".join(res.output.split())  # rich wraps long lines
        assert str(work / ".rebuild.lock") in text
        assert f"pid{holder.pid}" in text
    finally:
        holder.kill()
        holder.wait()
    with rebuild_lock(work):  # released once its holder is gone
        pass


def test_bad_takedown_list_and_bad_rebuild_config_exit_2(tmp_path: Path) -> None:
    from ccurate.cli import app

    cfg = tmp_path / "c.toml"
    _write_config(cfg, tmp_path / "work", 'release_name = "no-generation"\n')
    res = CliRunner().invoke(app, ["rebuild", str(cfg)])
    assert res.exit_code == 2 and "rebuild.release_name" in res.output
    _write_config(cfg, tmp_path / "work")
    (tmp_path / "work" / "catalog").mkdir(parents=True)
    (tmp_path / "work" / "catalog" / "takedowns.jsonl").write_text(
        '{"kind": "url", "value": "http://a.example/x.jpg"}\n{"kind": "domain", "value": "a b"}\n'
    )
    res = CliRunner().invoke(app, ["rebuild", str(cfg)])
    assert res.exit_code == 2
    assert "takedowns.jsonl:2" in " ".join(res.output.split()).replace(" ", "")


def test_rebuild_config_rejects_unknown_keys(tmp_path: Path) -> None:
    from ccurate.config import ConfigError
    from ccurate.rebuild import load_rebuild_config

    cfg = tmp_path / "c.toml"
    _write_config(cfg, tmp_path / "w", "retry_after_hour = 3\n")
    with pytest.raises(ConfigError, match=r"rebuild\.retry_after_hour"):
        load_rebuild_config(cfg)
    _write_config(cfg, tmp_path / "w", "retry_after_hours = 3\nrecheck_optout_days = 7\n")
    _, rc = load_rebuild_config(cfg)
    assert rc.retry_after_hours == 3 and rc.recheck_optout_days == 7


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_lock_records_the_holder_pid(tmp_path: Path) -> None:
    with rebuild_lock(tmp_path) as path:
        assert path.read_text().strip() == str(os.getpid())
        t0 = time.perf_counter()
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys\nfrom ccurate.rebuild import rebuild_lock, RebuildLocked\n"
                "try:\n    rebuild_lock(sys.argv[1]).__enter__()\nexcept RebuildLocked as e:\n"
                "    print(e.pid)\n",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == str(os.getpid())
        assert time.perf_counter() - t0 < 30  # refused at once, not waited for


def test_lookup_on_a_rebuilt_release(history: dict[str, Any], tmp_path: Path) -> None:
    from ccurate.lookup import lookup

    root, base, g3 = history["root"], history["base"], history["gens"][2]
    kept = next(u for u in sorted(_release_urls(g3.release)) if "/img/0" in u)
    src = Image.open(root / "corpus" / kept.removeprefix(base).lstrip("/"))
    resized = tmp_path / "resized.jpg"
    src.resize((src.width // 2, src.height // 2)).save(resized, quality=80)
    taken_down = root / "corpus" / history["x"].path.lstrip("/")
    found, gone = lookup([resized, taken_down], g3.release)
    assert [m.url for m in found.matches] == [kept]
    assert gone.matches == []


@pytest.mark.slow
@pytest.mark.ray
def test_rebuild_on_ray_matches_local(tmp_path: Path) -> None:
    """The rebuild's own stages (opt-out re-check, gate) run on Ray unchanged."""
    ray = pytest.importorskip("ray")
    from ccurate.ray_executor import RayExecutor

    corpus = generate(tmp_path / "corpus", n_images=12, per_page=4)
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(CountingHandler, directory=str(tmp_path / "corpus"))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rc = RebuildConfig(report=False, recheck_optout_days=0)
    try:
        local = rebuild(
            _config(tmp_path / "a", base, corpus.pages), rc, LocalExecutor(1, progress=False)
        )
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            on_ray = [
                rebuild(
                    _config(tmp_path / "b", base, corpus.pages), rc, RayExecutor(progress=False)
                )
                for _ in range(2)
            ]
        finally:
            ray.shutdown()
    finally:
        server.shutdown()
        server.server_close()
    assert local.release is not None and on_ray[0].release is not None
    assert _release_urls(on_ray[0].release) == _release_urls(local.release)
    assert on_ray[1].info["recheck"]["checked"] == len(_release_urls(local.release))
    assert on_ray[1].release is None  # nothing changed


def test_cli_rebuild_prints_the_generation_then_nothing_changed(tmp_path: Path) -> None:
    """`ccurate rebuild CONFIG` as cron runs it: a readable summary of each generation."""
    from ccurate.cli import app

    _tiny_site(tmp_path)
    server, base = _serve(tmp_path / "corpus", CountingHandler)
    cfg = tmp_path / "rebuild.toml"
    cfg.write_text(
        f'[run]\nname = "t"\nwork_dir = "{tmp_path / "work"}"\n'
        f'release_dir = "{tmp_path / "releases"}"\ncatalog_dir = "{tmp_path / "catalog"}"\n'
        f'[[sources]]\ntype = "pages"\nurls = ["{base}/pages/p.html"]\n'
        "[ingest]\nallow_private = true\nimage_size = 128\nretries = 0\n"
        "[filters.watermark]\nenabled = false\n[filters.safety]\nenabled = false\n"
        "[rebuild]\nreport = false\n"
    )
    try:
        first = CliRunner().invoke(app, ["rebuild", str(cfg), "--workers", "1"])
        second = CliRunner().invoke(app, ["rebuild", str(cfg), "--workers", "1"])
    finally:
        server.shutdown()
        server.server_close()
    assert first.exit_code == 0, first.output
    out1 = " ".join(first.output.split())  # rich wraps long lines
    assert "generation 1: planned 1 (new 1," in out1
    assert "diff: +2 added, -0 removed" in out1 and "2 samples" in out1
    release = "".join(first.output.split("release: ", 1)[1].split())
    assert Path(release).is_dir() and Path(release).parent == tmp_path / "releases"
    assert second.exit_code == 0, second.output
    out2 = "".join(second.output.split())
    assert "generation2:planned0" in out2
    assert f"nothingchanged:nonewrelease(latest:{release})" in out2


def test_cli_rebuild_with_a_missing_url_list_cannot_run(tmp_path: Path) -> None:
    """A source list that is not there is "cannot run" (exit 3) with the message, as in
    `ccurate ingest` — not a crash with a traceback (exit 1)."""
    from ccurate.cli import app

    cfg = tmp_path / "rebuild.toml"
    missing = tmp_path / "lists" / "urls.parquet"
    cfg.write_text(
        f'[run]\nwork_dir = "{tmp_path / "work"}"\n'
        f'[[sources]]\ntype = "urls"\npath = "{missing}"\n[rebuild]\nreport = false\n'
    )
    res = CliRunner().invoke(app, ["rebuild", str(cfg), "--workers", "1"])
    assert res.exit_code == 3, res.output
    text = " ".join(res.output.split())
    assert "cannot run" in text and "urls.parquet" in text and "Traceback" not in text


@pytest.mark.parametrize(
    "template, why",
    [
        ("{nme}-{gen}", "bad release_name template"),
        ("{0}-{gen}", "bad release_name template"),
        ("{gen:q}", "bad release_name template"),
        ("{name}-{date}", "must contain {gen}"),
        ("../{name}-{gen}", "gives a bad directory name"),
        (".{gen}", "gives a bad directory name"),
    ],
)
def test_release_name_templates_are_checked(template: str, why: str) -> None:
    import re

    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=re.escape(why)):
        RebuildConfig(release_name=template)
    assert RebuildConfig(release_name="{name}-{date}-g{gen:03d}").release_name.endswith("03d}")


def _second_page(root: Path) -> None:
    """`/pages/q.html`: one more photo, for a generation that finds new work."""
    (root / "corpus" / "img" / "9.jpg").write_bytes(_jpeg(landscape(99, 300, 200)))
    figs = FIGURE.format(src="/img/9.jpg", alt="river bend 9 by Ana Ruiz")
    (root / "corpus" / "pages" / "q.html").write_text(f"<html><body>{figs}</body></html>")


def test_a_killed_rebuild_resumes_its_generation_without_fetching_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the plan, the fetch, the pipeline, the opt-out re-check and the gate's
    decisions, a rebuild's rerun finishes the same generation from its markers: no request
    reaches the server again, and the release holds the old and the new samples."""
    import ccurate.rebuild as rb

    _tiny_site(tmp_path)
    _second_page(tmp_path)
    handler: type[CountingHandler] = type(
        "H", (CountingHandler,), {"hits": Counter(), "fail": {}, "headers_for": {}}
    )
    server, base = _serve(tmp_path / "corpus", handler)
    # a generation folder whose rebuild died before writing its metadata: replaced
    (tmp_path / "work" / "gen-0001").mkdir(parents=True)
    (tmp_path / "work" / "gen-0001" / "half-written").write_text("x")
    assert rb.generations(tmp_path / "work") == rb.generations(tmp_path / "nowhere") == []
    rc = RebuildConfig(report=False, recheck_optout_days=0)
    ex = LocalExecutor(1, progress=False)
    real_map_gate = rb._map_gate

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    try:
        g1 = rebuild(_config(tmp_path, base, ["/pages/p.html"]), rc, ex)
        assert g1.generation == 1 and not (g1.dir / "half-written").exists()
        cfg2 = _config(tmp_path, base, ["/pages/p.html", "/pages/q.html"])
        handler.hits.clear()
        monkeypatch.setattr(rb, "_map_gate", killed)
        with pytest.raises(KeyboardInterrupt):
            rebuild(cfg2, rc, ex)
        monkeypatch.setattr(rb, "_map_gate", real_map_gate)
        first_try = _served(handler.hits)
        handler.hits.clear()
        g2 = rebuild(cfg2, rc, ex)
        resumed = _served(handler.hits)
    finally:
        server.shutdown()
        server.server_close()
    assert {"/pages/q.html", "/img/9.jpg", "/img/0.jpg", "/img/1.jpg"} <= set(first_try)
    assert resumed == {}
    assert g2.generation == 2 and g2.dir.name == "gen-0002"
    assert sorted(p.name for p in (tmp_path / "work").glob("gen-*")) == ["gen-0001", "gen-0002"]
    assert g2.info["plan"]["new"] == 1 and g2.info["recheck"]["checked"] == 2
    assert g2.release is not None
    assert _release_urls(g2.release) == {base + f"/img/{i}.jpg" for i in (0, 1, 9)}
    assert g2.info["diff"]["added"] == 1


@pytest.mark.parametrize(
    "spelling",
    ["{base}/pages/q.html", "{https}/pages/%71.html/#top"],  # the plan matches the resource
    ids=["as-fetched", "other-spelling"],
)
def test_a_page_taken_down_before_its_first_fetch_is_never_fetched(
    tmp_path: Path, spelling: str
) -> None:
    _tiny_site(tmp_path)
    _second_page(tmp_path)
    handler: type[CountingHandler] = type(
        "H", (CountingHandler,), {"hits": Counter(), "fail": {}, "headers_for": {}}
    )
    server, base = _serve(tmp_path / "corpus", handler)
    host, port = base.removeprefix("http://").split(":")
    https = f"HTTPS://{host}.:{port}"  # scheme, case and a trailing dot are not the resource
    TakedownList(tmp_path / "catalog").add(
        [make_entry("page_url", spelling.format(base=base, https=https), "site owner asked")]
    )
    pages = ["/pages/p.html", "/pages/q.html", "/pages/p.html"]  # p listed twice
    try:
        r = rebuild(
            _config(tmp_path, base, pages),
            RebuildConfig(recheck_optout_days=None),  # with the generation's HTML report
            LocalExecutor(1, progress=False),
        )
    finally:
        server.shutdown()
        server.server_close()
    assert "/pages/q.html" not in handler.hits and "/img/9.jpg" not in handler.hits
    assert r.info["plan"]["takedown_not_fetched"] == 1
    drops = pq.read_table(r.dir / "00_plan" / "planned-dropped.parquet").to_pylist()
    assert sorted((d["url"], d["drop_reason"], d["dropped_by"]) for d in drops) == [
        (base + "/pages/p.html", "duplicate_url", "ingest"),
        (base + "/pages/q.html", "takedown", "takedown"),
    ]
    assert r.release is not None
    assert _release_urls(r.release) == {base + "/img/0.jpg", base + "/img/1.jpg"}
    report = (r.dir / "report.html").read_text()
    assert "<h3>takedown (1)</h3>" in report and "<h3>duplicate_url (1)</h3>" in report


def test_a_rebuild_without_sources_cannot_run(tmp_path: Path) -> None:
    from ccurate.pipeline import PipelineError

    cfg = parse_config({"run": {"work_dir": str(tmp_path / "work")}})
    with pytest.raises(PipelineError, match="no \\[\\[sources\\]\\] configured"):
        rebuild(cfg, RebuildConfig(report=False), LocalExecutor(1, progress=False))
    assert not (tmp_path / "work").exists()
