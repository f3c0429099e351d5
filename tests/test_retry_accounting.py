"""`--retry-failed` keeps the books: a retried record is counted once, with its newest outcome.

One ingest over a loopback server (a good image, two 503s and a 404), then a retry pass in
which one 503 now succeeds and the other fails again with a 500: each ingest shard's marker
states its files, ingest's stats (its `_COMPLETE` marker and the retry run's summary) count
every URL once (in = kept + dropped, the superseded 503s gone), and a later full run counts
the retry shard under ingest, so filter's input is ingest's kept and the run's books balance
across the side outputs, summary.json, the catalog, the release card and the HTML report
(the checks of tests/test_accounting_review.py, reused on this run).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ccurate.config import parse_config
from ccurate.executor import LocalExecutor
from ccurate.pipeline import Pipeline, _supersede_ingest_drops
from ccurate.record import Sample, make_key
from ccurate.shardio import ShardWriter, list_shards, read_marker
from tests import test_accounting_review as review
from tests.httpserver import Reply, serve
from tests.test_retry_failed import _jpeg

MAP_STEPS = review.MAP_STEPS
STATED = ("in", "kept", "dropped", "drops")
CAPTIONS = ["a red kite", "a storm front", "a lighthouse", "an old bridge"]


def _config(tmp_path: Path, urls: list[str]) -> Any:
    lines = [
        {
            "url": u,
            "caption": f"{CAPTIONS[i]} over a green valley at dusk",
            "license": "https://creativecommons.org/publicdomain/zero/1.0/",
        }
        for i, u in enumerate(urls)
    ]
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return parse_config(
        {
            "run": {
                "work_dir": str(tmp_path / "work"),
                "release_dir": str(tmp_path / "releases"),
                "release_name": "v1",
            },
            "sources": [
                {"type": "urls", "path": str(tmp_path / "urls.jsonl"), "license_col": "license"}
            ],
            "ingest": {"allow_private": True, "retries": 0, "image_size": 64},
            "train": {"enabled": False},
        },
        "retry-accounting",
    )


def _pipe(cfg: Any) -> Pipeline:
    return Pipeline(cfg, LocalExecutor(1, progress=False))


def _stated(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in STATED}


def _ingest_markers_state_their_files(work: Path) -> None:
    for prefix in list_shards(work / "10_ingest"):
        m = read_marker(prefix)
        kept = pq.read_table(f"{prefix}.parquet", columns=["key"]).num_rows
        side = pq.read_table(f"{prefix}.dropped.parquet", columns=["drop_reason"])
        assert (m["kept"], m["dropped"]) == (kept, side.num_rows), prefix.name
        assert Counter(m["drops"]) == Counter(side["drop_reason"].to_pylist()), prefix.name
        assert m["in"] == m["kept"] + m["dropped"], prefix.name  # image URLs: one each


def test_a_retry_and_the_next_full_run_count_each_record_once(tmp_path: Path) -> None:
    with serve() as srv:
        srv.route("/good.jpg", Reply(body=_jpeg(1), content_type="image/jpeg"))
        for path in ("/flaky.jpg", "/again.jpg"):
            srv.route(path, Reply(503))
        srv.route("/gone.jpg", Reply(404))
        cfg = _config(
            tmp_path, [srv.url(p) for p in ("/good.jpg", "/flaky.jpg", "/again.jpg", "/gone.jpg")]
        )
        _pipe(cfg).run(["ingest"])
        srv.routes["/flaky.jpg"] = Reply(body=_jpeg(2), content_type="image/jpeg")
        srv.routes["/again.jpg"] = Reply(500)
        retry_run = _pipe(cfg)
        retry_run.run(["retry"])
        assert srv.hits["/flaky.jpg"] == srv.hits["/again.jpg"] == 2

    work = Path(cfg.run.work_dir)
    sides = review.reasons(review.dropped_rows(work, "ingest"))
    assert sides == Counter(http_404=1, http_500=1)  # the 503s are superseded
    _ingest_markers_state_their_files(work)
    want = {"in": 4, "kept": 2, "dropped": 2, "drops": dict(sides)}
    marker = json.loads((work / "10_ingest" / "_COMPLETE").read_text())
    assert _stated(marker["stats"]) == want
    assert _stated(marker["retry"][0]["stats"]) == {
        "in": 2,
        "kept": 1,
        "dropped": 1,
        "drops": {"http_500": 1},
    }
    summary = {s["stage"]: s for s in json.loads((work / "summary.json").read_text())["steps"]}
    assert list(summary) == ["retry", "ingest"]
    assert _stated(summary["ingest"]) == want and summary["ingest"]["shards"] == 2
    assert _stated(_pipe(cfg).run_info()["stages"]["ingest"]) == want
    # the card's stage table: this run's retry pass once, under its marker's name (it was
    # listed as 'retry-1' from the marker and again as this run's 'retry')
    stages = retry_run.run_info()["stages"]
    assert [k for k in stages if k.startswith("retry")] == ["retry-1"]
    assert _stated(stages["retry-1"]) == _stated(marker["retry"][0]["stats"])

    # the next full run: ingest counts the retry shard (filter reads it), and it all balances
    _pipe(cfg).run()
    books = review.books(tmp_path, cfg)
    ingest, filt = books["summary"][0], books["summary"][1]
    assert _stated(ingest) == want and ingest["shards"] == 2
    assert filt["stage"] == "filter" and filt["in"] == ingest["kept"] == 2
    assert filt["kept"] >= 1, "nothing reached the release: the books below would be empty"
    marker = json.loads((work / "10_ingest" / "_COMPLETE").read_text())
    assert _stated(marker["stats"]) == want and len(marker["retry"]) == 1
    demo = review.Demo(tmp_path, cfg, books, books, books, [])
    review.test_each_shard_is_its_kept_plus_its_dropped(demo)
    review.test_every_key_ends_in_exactly_one_place(demo)
    review.test_the_run_summary_states_the_side_outputs(demo)
    review.test_the_catalog_states_the_side_outputs(demo)
    review.test_the_release_states_the_side_outputs(demo)
    review.test_the_report_states_the_summary_and_the_side_outputs(demo)
    _pipe(cfg).run()  # a rerun of the finished pipeline changes no count
    assert review.books(tmp_path, cfg) == books


def _shard(prefix: Path, kept: list[Sample], dropped: list[Sample], mtime: int) -> None:
    w = ShardWriter(prefix)
    for s in [*kept, *dropped]:
        w.write(s)
    drops = Counter(s.drop_reason for s in dropped)
    n = len(kept) + len(dropped)
    w.commit(
        {
            "stage": "ingest",
            "in": n,
            "kept": len(kept),
            "dropped": len(dropped),
            "drops": dict(drops),
            "shards": 1,
        }
    )
    os.utime(f"{prefix}.done", (mtime, mtime))


def _failed(url: str, reason: str, page_url: str | None = None) -> Sample:
    s = Sample(key=make_key(url, page_url), url=url, page_url=page_url)
    s.drop(reason, "ingest")
    return s


def test_superseding_restates_the_older_markers_once(tmp_path: Path) -> None:
    """A page's transient drop is superseded by the retry's images of that page too (as
    `plan_retry` resolves it), an image URL's by its own key; the older marker loses them
    from `in` and `dropped` and keeps its mtime (completion order decides what is newer);
    rerunning, or finishing after a kill between the file and the marker, changes nothing."""
    page, img = "http://example.org/page.html", "http://example.org/a.jpg"
    lost = "http://example.org/gone.jpg"
    older, newer = tmp_path / "part-00000", tmp_path / "retry-0001"
    _shard(
        older,
        [],
        [_failed(page, "http_503"), _failed(img, "timeout"), _failed(lost, "http_404")],
        1_000,
    )
    image = Sample(
        key=make_key("http://example.org/p1.jpg", page),
        url="http://example.org/p1.jpg",
        page_url=page,
        image=_jpeg(1),
        mime="image/jpeg",
    )
    _shard(newer, [image], [_failed(img, "http_500")], 2_000)

    _supersede_ingest_drops(tmp_path)
    restated = read_marker(older)
    assert Path(f"{older}.done").stat().st_mtime == 1_000
    assert (restated["in"], restated["dropped"], restated["drops"]) == (1, 1, {"http_404": 1})
    assert restated["superseded"] == 2
    side = pq.read_table(f"{older}.dropped.parquet", columns=["url"])["url"].to_pylist()
    assert side == [lost]
    total: Counter[str] = Counter()
    for p in (older, newer):
        m = read_marker(p)
        total.update({k: m[k] for k in ("in", "kept", "dropped")})
    # three planned records in, the page's image and the lost 404 + the retried 500 out
    assert total == Counter({"in": 3, "kept": 1, "dropped": 2})

    _supersede_ingest_drops(tmp_path)  # idempotent
    assert read_marker(older) == restated
    # killed after the side output was rewritten, before its marker: the next call restates
    # it from the file (the count superseded is not taken twice)
    stale = {
        **restated,
        "in": 3,
        "dropped": 3,
        "drops": {"http_503": 1, "timeout": 1, "http_404": 1},
    }
    del stale["superseded"]
    Path(f"{older}.done").write_text(json.dumps(stale))
    os.utime(f"{older}.done", (1_000, 1_000))
    _supersede_ingest_drops(tmp_path)
    assert read_marker(older) == restated
