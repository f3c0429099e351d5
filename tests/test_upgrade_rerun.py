"""Rerunning a work directory an earlier version made: records it lost to a fixed bug can
be fetched again on request, settings this version added are named as such, and a trainer
error on the way is one line, not a traceback."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from ccurate.cli import _guard, app
from ccurate.config import load_config
from ccurate.pipeline import Pipeline, PipelineError
from tests.httpserver import Reply, serve
from tests.test_retry_failed import _outcomes


def _jpeg() -> bytes:
    img = Image.effect_mandelbrot((96, 80), (-2, -1.2, 1, 1.2), 64).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_retry_reason_fetches_again_what_an_earlier_version_dropped(tmp_path: Path) -> None:
    """`--retry-failed` alone leaves a `decode_error` alone; with `--retry-reason
    decode_error` it is fetched again (the fixed decoder keeps it). Reasons are checked
    against ingest's: an unknown one or an opt-out is a usage error (exit 2)."""
    runner = CliRunner()
    good = _jpeg()
    with serve() as srv:
        srv.route("/img.jpg", Reply(body=good[:300], content_type="image/jpeg"))
        (tmp_path / "urls.jsonl").write_text(
            json.dumps({"url": srv.url("/img.jpg"), "caption": "a fractal"}) + "\n"
        )
        (tmp_path / "run.toml").write_text(
            "[run]\nwork_dir = 'work'\nrelease_dir = 'rel'\n\n"
            "[[sources]]\ntype = 'urls'\npath = 'urls.jsonl'\n\n"
            "[ingest]\nallow_private = true\nretries = 0\nimage_size = 64\n"
        )
        cfg = str(tmp_path / "run.toml")
        assert runner.invoke(app, ["ingest", cfg]).exit_code == 0
        ing = tmp_path / "work" / "10_ingest"
        assert _outcomes(ing)[1] == {srv.url("/img.jpg"): "decode_error"}
        srv.routes["/img.jpg"] = Reply(body=good, content_type="image/jpeg")
        hits = srv.hits["/img.jpg"]
        assert runner.invoke(app, ["ingest", cfg, "--retry-failed"]).exit_code == 0
        assert srv.hits["/img.jpg"] == hits  # not transient: not retried by default
        for bad, says in (("optout_tdmrep", "opt-out"), ("bogus", "decode_error")):
            res = runner.invoke(app, ["ingest", cfg, "--retry-failed", "--retry-reason", bad])
            assert res.exit_code == 2 and says in res.output, res.output
        res = runner.invoke(app, ["ingest", cfg, "--retry-reason", "decode_error"])
        assert res.exit_code == 2 and "needs the retry step" in res.output
        res = runner.invoke(
            app, ["ingest", cfg, "--retry-failed", "--retry-reason", "decode_error"]
        )
        assert res.exit_code == 0, res.output
        assert srv.hits["/img.jpg"] == hits + 1
        kept, dropped = _outcomes(ing)
        assert kept == {srv.url("/img.jpg"): "retry-0001"} and dropped == {}


def _pipeline(tmp: Path) -> Pipeline:
    (tmp / "run.toml").write_text("[run]\nwork_dir = 'work'\nrelease_dir = 'rel'\n")
    return Pipeline(load_config(tmp / "run.toml"))


def _record(pipe: Pipeline, step: str, drop: tuple[str, str]) -> Path:
    """The step's `_SETTINGS` as an earlier version wrote it: without `drop` (section, key)."""
    settings = pipe.step_settings(step)
    section, key = drop
    node = settings
    for part in section.split("."):
        node = node[part]
    del node[key]
    d = pipe.step_dir(step)
    d.mkdir(parents=True)
    (d / "_SETTINGS").write_text(json.dumps(settings))
    (d / "part-00000.parquet").write_bytes(b"")  # a result the check keeps or clears
    return d


def test_a_setting_new_in_this_version_is_named_as_such(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key the recorded settings lack, now at its default, is "new in this version", not
    a user change: filter results are recomputed under it (this version's rules), and
    ingest keeps its downloads (there is nothing to restore) but still refuses a change."""
    pipe = _pipeline(tmp_path)
    filt = _record(pipe, "filter", ("filters.watermark", "stamp_words"))
    with caplog.at_level(logging.WARNING, logger="ccurate.pipeline"):
        pipe._check_settings("filter")
    msg = caplog.text
    assert "new settings in this version, at their defaults (filters.watermark.stamp_words)" in msg
    assert "settings changed" not in msg and "recomputed" in msg
    assert not (filt / "part-00000.parquet").exists()
    ing = _record(pipe, "ingest", ("ingest", "keep_original"))
    pipe._check_settings("ingest")
    assert (ing / "part-00000.parquet").exists()
    assert json.loads((ing / "_SETTINGS").read_text()) == pipe.step_settings("ingest")
    pipe.cfg.ingest.image_size = 77  # the user's own change: still refused
    with pytest.raises(PipelineError, match=r"ingest settings changed \(ingest\.image_size\)"):
        pipe._check_settings("ingest")


def test_a_trainer_error_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`ccurate train` (through the pipeline) prints a checkpoint that does not fit as its
    message, which says how to fix it, with exit code 2, not a traceback."""
    from ccurate.train.checkpoint import CheckpointError

    def fail() -> None:
        raise CheckpointError("ck: written on v1, this run reads v2; set resume_data='restart'")

    with pytest.raises(typer.Exit) as exc:
        _guard(fail)
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert "resume_data='restart'" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_rebuild_retry_reason_fetches_a_page_image_dropped_as_decode_error(
    tmp_path: Path,
) -> None:
    """An image of a page dropped as `decode_error` is never planned again by a rebuild,
    unless asked (`retry_reasons`): then it is fetched directly, without its page, and
    released."""
    from ccurate.executor import LocalExecutor
    from ccurate.rebuild import RebuildConfig, rebuild
    from tests.test_rebuild import _config, _serve, _tiny_site
    from tests.test_rebuild_generations import _handler, _manifest

    _tiny_site(tmp_path)
    img = tmp_path / "corpus" / "img" / "1.jpg"
    good = img.read_bytes()
    img.write_bytes(good[:300])
    h = _handler()
    server, base = _serve(tmp_path / "corpus", h)
    ex = LocalExecutor(1, progress=False)
    rc = RebuildConfig(report=False, recheck_optout_days=None)
    try:
        cfg = _config(tmp_path, base, ["/pages/p.html"])
        g1 = rebuild(cfg, rc, ex)
        img.write_bytes(good)
        g2 = rebuild(cfg, rc, ex)
        g3 = rebuild(cfg, rc, ex, retry_reasons=frozenset({"decode_error"}))
    finally:
        server.shutdown()
        server.server_close()
    assert g1.release is not None and len(_manifest(g1.release)) == 1
    assert g2.info["plan"]["planned"] == 0 and g2.release is None
    assert g3.info["plan"]["retry_reason"] == 1 and h.hits["/pages/p.html"] == 1
    assert g3.release is not None
    assert sorted(r["url"].rsplit("/", 1)[1] for r in _manifest(g3.release)) == ["0.jpg", "1.jpg"]
