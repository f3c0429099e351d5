"""The pipeline driver's refusals and resumes: a step over an unfinished or missing input step,
a rerun over grown inputs (and one that dies), runs that cannot start, a killed
`--retry-failed` finished by the next one, and the release a `train` step would use."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from ccurate.config import ConfigError, parse_config
from ccurate.executor import LocalExecutor
from ccurate.pipeline import Pipeline, PipelineError
from ccurate.record import Decision, Sample, make_key
from ccurate.shardio import ShardWriter, is_done, list_shards
from ccurate.stage import Filter, FilterStage
from tests.httpserver import Reply, serve


def _jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    img = Image.new("RGB", size, (seed * 37 % 255, seed * 91 % 255, seed * 13 % 255))
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def _pipe(tmp_path: Path, **extra: Any) -> Pipeline:
    cfg = parse_config(
        {
            "run": {
                "work_dir": str(tmp_path / "work"),
                "release_dir": str(tmp_path / "releases"),
            },
            **extra,
        }
    )
    return Pipeline(cfg, LocalExecutor(1, progress=False))


def _shards(d: Path, n: int = 3, per: int = 2) -> list[str]:
    out = []
    for k in range(n):
        w = ShardWriter(d / f"part-{k:05d}")
        for i in range(k * per, (k + 1) * per):
            url = f"http://example.org/{i}.jpg"
            w.write(Sample(key=make_key(url), url=url, image=_jpeg(i), mime="image/jpeg"))
        w.commit({"stage": "ingest", "in": per, "kept": per, "dropped": 0})
        out.append(str(d / f"part-{k:05d}"))
    return out


class _Odd(Filter):
    name = "odd"

    def decide(self, s: Sample) -> Decision:
        n = int(s.url.rsplit("/", 1)[1].split(".")[0])
        return self.reject("odd_number") if n % 2 else self.keep()


class _Boom(Filter):
    """Fails on one URL: a crash part-way through a step."""

    name = "boom"

    def __init__(self, bad: str) -> None:
        self.bad = bad

    def decide(self, s: Sample) -> Decision:
        if s.url.endswith(self.bad):
            raise RuntimeError(f"boom on {s.url}")
        return self.keep()


# --------------------------------------------------------------------------- step inputs


def test_a_step_refuses_a_missing_or_unfinished_input_step(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)
    with pytest.raises(PipelineError, match=r"needs the output of 'ingest'.*run it first"):
        pipe.finished_inputs("filter")
    ingest = pipe.step_dir("ingest")
    prefixes = _shards(ingest)
    with pytest.raises(PipelineError, match="it did not finish: rerun 'ingest'"):
        pipe.finished_inputs("filter")  # every shard done, but no _COMPLETE: it was killed
    (ingest / "_COMPLETE").write_text("{}")
    assert pipe.finished_inputs("filter") == prefixes
    Path(f"{prefixes[1]}.done").unlink()
    with pytest.raises(PipelineError, match="1 of 3 are not: rerun 'ingest'"):
        pipe.finished_inputs("filter")


def test_a_rerun_over_grown_inputs_and_one_that_dies(tmp_path: Path) -> None:
    """A finished step run again over more inputs loses its _COMPLETE first: if the rerun
    dies, the next step refuses it instead of reading a step with a shard missing."""
    pipe = _pipe(tmp_path)
    inputs = _shards(tmp_path / "in", n=3)
    first = pipe.map_step("filter", FilterStage([_Odd()]), inputs[:2])
    assert first.stats.shards == 2 and len(pipe.finished_inputs("dedup")) == 2
    with pytest.raises(RuntimeError, match=r"boom on http://example\.org/4\.jpg"):
        pipe.map_step("filter", FilterStage([_Odd(), _Boom("/4.jpg")]), inputs)
    with pytest.raises(PipelineError, match="it did not finish: rerun 'filter'"):
        pipe.finished_inputs("dedup")
    again = pipe.map_step("filter", FilterStage([_Odd(), _Boom("/never.jpg")]), inputs)
    assert (again.stats.shards, again.stats.skipped_shards, again.stats.n_in) == (3, 2, 6)
    assert again.stats.drops == {"odd_number": 3}
    assert len(pipe.finished_inputs("dedup")) == 3
    marker = json.loads((pipe.step_dir("filter") / "_COMPLETE").read_text())
    assert marker["shards"] == 3 and marker["stats"]["in"] == 6


# --------------------------------------------------------------------------- cannot run


def test_runs_that_cannot_start_say_why(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)
    with pytest.raises(PipelineError, match=r"no \[\[sources\]\] configured"):
        pipe.ingest()
    with pytest.raises(PipelineError, match="retry-failed needs a finished ingest"):
        pipe.retry_failed()
    with pytest.raises(PipelineError, match="unknown step 'captions'; expected one of ingest, "):
        pipe.run(["captions"])
    assert not (tmp_path / "work" / "summary.json").exists()
    missing = tmp_path / "lists" / "urls.parquet"
    listed = _pipe(tmp_path, sources=[{"type": "urls", "path": str(missing)}])
    with pytest.raises(ConfigError, match=r"urls\.parquet.*not found"):  # exit 2, as a config
        listed.ingest()
    assert not listed.step_dir("ingest").exists()


def test_latest_release_is_the_newest_complete_one(tmp_path: Path) -> None:
    pipe = _pipe(tmp_path)
    with pytest.raises(PipelineError, match=r"no finished release in .*run 'ccurate shard'"):
        pipe.latest_release()
    root = tmp_path / "releases"
    (root / "v1").mkdir(parents=True)  # a half release (no _SUCCESS) never counts
    with pytest.raises(PipelineError, match="no finished release"):
        pipe.latest_release()
    (root / "v1" / "_SUCCESS").write_text("{}")
    assert pipe.latest_release() == root / "v1"
    named = _pipe(tmp_path, run={"work_dir": str(tmp_path / "w"), "release_dir": str(root)})
    named.cfg.run.release_name = "v2"
    with pytest.raises(PipelineError, match="no finished release"):
        named.latest_release()


# --------------------------------------------------------------------------- retry-failed


def test_a_killed_retry_is_finished_by_the_next_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after its partition was planned, `--retry-failed` resumes that partition:
    the flaky image is fetched once, under one retry shard, and the card's stage stats
    show the retry pass."""
    with serve() as srv:
        srv.route("/good.jpg", Reply(body=_jpeg(1), content_type="image/jpeg"))
        srv.route("/flaky.jpg", Reply(503))
        urls = [srv.url("/good.jpg"), srv.url("/flaky.jpg")]
        (tmp_path / "urls.jsonl").write_text(
            "".join(json.dumps({"url": u, "caption": "a picture"}) + "\n" for u in urls)
        )
        extra = {
            "sources": [{"type": "urls", "path": str(tmp_path / "urls.jsonl")}],
            "ingest": {"allow_private": True, "retries": 0, "image_size": 64},
        }
        _pipe(tmp_path, **extra).ingest()
        srv.routes["/flaky.jpg"] = Reply(body=_jpeg(2), content_type="image/jpeg")
        before = srv.hits["/flaky.jpg"]

        real_map_step = Pipeline.map_step

        def killed(self: Pipeline, step: str, stage: Any, inputs: list[str], name: Any = None):
            if name == "retry":
                raise KeyboardInterrupt  # the kill lands after the retry partition is written
            return real_map_step(self, step, stage, inputs, name)

        monkeypatch.setattr(Pipeline, "map_step", killed)
        with pytest.raises(KeyboardInterrupt):
            _pipe(tmp_path, **extra).retry_failed()
        monkeypatch.setattr(Pipeline, "map_step", real_map_step)
        retries = tmp_path / "work" / "00_plan" / "retries"
        assert [p.name for p in retries.glob("*.parquet")] == ["retry-0001.parquet"]
        ingest = tmp_path / "work" / "10_ingest"
        assert not is_done(ingest / "retry-0001") and srv.hits["/flaky.jpg"] == before

        pipe = _pipe(tmp_path, **extra)
        result = pipe.retry_failed()
        assert srv.hits["/flaky.jpg"] == before + 1
    assert [p.name for p in retries.glob("*.parquet")] == ["retry-0001.parquet"]
    assert [p.name for p in list_shards(ingest)] == ["part-00000", "retry-0001"]
    assert (result.step, result.stats.n_kept) == ("retry", 1)
    stages = pipe.run_info()["stages"]
    # the flaky image's 503 was superseded by its retry: ingest keeps both images and
    # drops nothing (it counted the 503 as dropped too, next to the retry's kept image)
    assert stages["retry-1"]["kept"] == 1
    assert {k: stages["ingest"][k] for k in ("in", "kept", "dropped")} == {
        "in": 2,
        "kept": 2,
        "dropped": 0,
    }
