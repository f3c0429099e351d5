"""A step's results belong to its settings: changed settings are never silently reused."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccurate.config import load_config
from ccurate.pipeline import Pipeline, PipelineError
from ccurate.shardio import list_shards
from tests.httpserver import Reply, serve

# four far-apart views of the Mandelbrot set: distinct pictures, not crops of one another
# (views 0.1 apart are 4 % crops: the default near dedup rightly merges those)
_VIEWS = [(-2.0, -1.2, 1.0, 1.2), (-0.9, 0.0, -0.6, 0.3), (-1.8, -0.05, -1.7, 0.05),
          (0.25, -0.1, 0.45, 0.1)]  # fmt: skip


def _jpeg(w: int, h: int, seed: int) -> bytes:
    img = Image.effect_mandelbrot((w, h), _VIEWS[seed % len(_VIEWS)], 64).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _kept(step_dir: Path) -> int:
    return sum(pq.ParquetFile(f"{p}.parquet").metadata.num_rows for p in list_shards(step_dir))


def _config(tmp: Path, min_side: int, image_size: int = 64) -> Pipeline:
    (tmp / "run.toml").write_text(
        "[run]\nwork_dir = 'work'\nrelease_dir = 'rel'\nrelease_name = 'v1'\nworkers = 1\n\n"
        "[[sources]]\ntype = 'urls'\npath = 'urls.jsonl'\n\n"
        f"[ingest]\nallow_private = true\nretries = 0\nimage_size = {image_size}\nthreads = 4\n\n"
        "[filters.license]\nenabled = false\n[filters.watermark]\nenabled = false\n"
        "[filters.safety]\nenabled = false\n"
        f"[filters.quality]\nmin_side = {min_side}\n"
    )
    return Pipeline(load_config(tmp / "run.toml"))


def test_changed_filter_settings_recompute_filter_and_everything_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serve() as srv:
        sizes = [(100, 80), (160, 120), (300, 240), (400, 300)]
        for i, (w, h) in enumerate(sizes):
            srv.route(f"/{i}.jpg", Reply(body=_jpeg(w, h, i), content_type="image/jpeg"))
        (tmp_path / "urls.jsonl").write_text(
            "".join(
                json.dumps(
                    {"url": srv.url(f"/{i}.jpg"), "caption": f"a fractal in warm colours, {i}"}
                )
                + "\n"
                for i in range(len(sizes))
            )
        )
        p = _config(tmp_path, min_side=32)
        p.ingest()
        p.filter()
        p.dedup()
        p.caption()
        p.shard()
        work = tmp_path / "work"
        assert _kept(work / "20_filter") == 4

        # performance-only settings (threads) keep every result
        (tmp_path / "run.toml").write_text(
            (tmp_path / "run.toml").read_text().replace("threads = 4", "threads = 2")
        )
        p = Pipeline(load_config(tmp_path / "run.toml"))
        p.finished_inputs("caption")  # dedup is still valid
        p.shard()  # and the release v1 is the one these settings make

        # a threshold change: dedup refuses stale filter output until filter reruns ...
        p = _config(tmp_path, min_side=150)
        with pytest.raises(PipelineError, match=r"'filter' redone.*filters\.quality\.min_side"):
            p.dedup()
        # ... which recomputes it, and dedup after it, from the unchanged downloads
        with caplog.at_level("WARNING", logger="ccurate.pipeline"):
            p.filter()
        assert "filters.quality.min_side" in caplog.text
        assert _kept(work / "20_filter") == 2  # 100x80 and 160x120 are now too small
        p.dedup()
        assert _kept(work / "30_dedup") == 2
        p.caption()
        # the release named v1 holds the old selection: not handed back as if it were new
        with pytest.raises(PipelineError, match=r"release 'v1' exists.*filters\.quality\.min_side"):
            p.shard()

        # ingest is never recomputed behind the user's back (it downloads everything)
        p = _config(tmp_path, min_side=150, image_size=48)
        with pytest.raises(PipelineError, match=r"ingest settings changed.*ingest\.image_size"):
            p.ingest()
        with pytest.raises(PipelineError, match=r"ingest settings changed"):
            p.retry_failed()
        assert _kept(work / "10_ingest") == 4


@pytest.mark.parametrize(
    "section,key,value",
    [
        ("caption", "decode_workers", "8"),
        ("caption", "max_batch_size", "64"),
        ("caption", "cuda_graphs", "false"),
        ("caption", "cache_flush_rows", "100"),
        ("filters.watermark", "ocr_mem_arena", "false"),
    ],
)
def test_operational_settings_keep_a_steps_results(
    tmp_path: Path, section: str, key: str, value: str
) -> None:
    """What the rebuild treats as operational (`configbase.PERF_KEYS`: how fast a step runs,
    never what it outputs) keeps the pipeline's results too; and a step recorded when such a
    key still counted (its `_SETTINGS` holds it) is not recomputed after an upgrade."""
    from ccurate.configbase import PERF_KEYS
    from ccurate.rebuild import settings_digest

    assert key in PERF_KEYS
    base = "[run]\nwork_dir = 'w'\n[caption]\nmodel = 'm'\n"
    (tmp_path / "a.toml").write_text(base)
    if section == "caption":
        (tmp_path / "b.toml").write_text(base + f"{key} = {value}\n")
    else:
        (tmp_path / "b.toml").write_text(base + f"[{section}]\n{key} = {value}\n")
    a = Pipeline(load_config(tmp_path / "a.toml"))
    b = Pipeline(load_config(tmp_path / "b.toml"))
    assert a.step_settings("caption") == b.step_settings("caption")
    assert settings_digest(a.cfg) == settings_digest(b.cfg)

    out = a.step_dir("caption")
    out.mkdir(parents=True)
    want = a.step_settings("caption")
    old = json.loads(json.dumps(want))
    old["caption"][key] = "recorded-before"  # as an older version wrote it
    (out / "_SETTINGS").write_text(json.dumps(old))
    (out / "kept.txt").write_text("a result")
    a._check_settings("caption")
    assert (out / "kept.txt").exists()
