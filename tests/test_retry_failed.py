"""`ccurate ingest --retry-failed`: transient failures are fetched again, nothing else is."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image
from typer.testing import CliRunner

from ccurate.cli import app
from ccurate.shardio import list_shards
from tests.httpserver import Reply, serve


def _jpeg(seed: int) -> bytes:
    img = Image.effect_mandelbrot((96, 80), (-2 + seed * 0.1, -1.2, 1, 1.2), 64).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _outcomes(ingest_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    """url -> shard name of kept rows, url -> drop reason of dropped rows, over all shards."""
    kept: dict[str, str] = {}
    dropped: dict[str, str] = {}
    for prefix in list_shards(ingest_dir):
        for url in pq.read_table(f"{prefix}.parquet", columns=["url"])["url"].to_pylist():
            assert url not in kept, f"{url} kept twice"
            kept[url] = prefix.name
        rows = pq.read_table(f"{prefix}.dropped.parquet", columns=["url", "drop_reason"])
        for url, reason in zip(*(rows[c].to_pylist() for c in ("url", "drop_reason")), strict=True):
            assert url not in dropped, f"{url} dropped twice"
            dropped[url] = reason
    return kept, dropped


def test_retry_failed_fetches_only_transient_failures(tmp_path: Path):
    runner = CliRunner()
    with serve() as srv:
        srv.route("/good.jpg", Reply(body=_jpeg(1), content_type="image/jpeg"))
        srv.route("/flaky.jpg", Reply(503))
        srv.route("/gone.jpg", Reply(404))
        urls = [srv.url(p) for p in ("/good.jpg", "/flaky.jpg", "/gone.jpg")]
        (tmp_path / "urls.jsonl").write_text(
            "".join(json.dumps({"url": u, "caption": "a picture"}) + "\n" for u in urls)
        )
        (tmp_path / "run.toml").write_text(
            "[run]\nwork_dir = 'work'\nrelease_dir = 'rel'\n\n"
            "[[sources]]\ntype = 'urls'\npath = 'urls.jsonl'\n\n"
            "[ingest]\nallow_private = true\nretries = 0\nimage_size = 64\n"
        )
        cfg = str(tmp_path / "run.toml")
        res = runner.invoke(app, ["ingest", cfg])
        assert res.exit_code == 0, res.output
        ing = tmp_path / "work" / "10_ingest"
        kept, dropped = _outcomes(ing)
        assert set(kept) == {urls[0]}
        assert dropped == {urls[1]: "http_503", urls[2]: "http_404"}

        srv.routes["/flaky.jpg"] = Reply(body=_jpeg(2), content_type="image/jpeg")
        srv.routes["/gone.jpg"] = Reply(body=_jpeg(3), content_type="image/jpeg")
        hits = dict(srv.hits)
        res = runner.invoke(app, ["ingest", cfg, "--retry-failed"])
        assert res.exit_code == 0, res.output
        assert srv.hits["/flaky.jpg"] == hits["/flaky.jpg"] + 1
        assert srv.hits["/good.jpg"] == hits["/good.jpg"]  # successes are not fetched again
        assert srv.hits["/gone.jpg"] == hits["/gone.jpg"]  # a 404 is not transient
        kept, dropped = _outcomes(ing)
        assert kept == {urls[0]: "part-00000", urls[1]: "retry-0001"}
        assert dropped == {urls[2]: "http_404"}  # the 503 row was superseded, not duplicated
        marker = json.loads((ing / "_COMPLETE").read_text())
        assert marker["retry"][0]["stats"]["kept"] == 1

        # nothing left to retry: a no-op that adds no shard
        res = runner.invoke(app, ["ingest", cfg, "--retry-failed"])
        assert res.exit_code == 0, res.output
        assert len(list_shards(ing)) == 2
    # the grown ingest flows on: filter sees both shards, dedup and caption are redone
    res = runner.invoke(app, ["run", cfg, "--steps", "filter,dedup,caption"])
    assert res.exit_code == 0, res.output
    filtered = list_shards(tmp_path / "work" / "20_filter")
    assert [p.name for p in filtered] == ["part-00000", "retry-0001"]
