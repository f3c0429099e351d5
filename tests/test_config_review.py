"""Config review: typos get a suggestion, contradictory or unusable settings fail when the
file is loaded (not hours later in the step that uses them), `--steps` is checked first."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest

from ccurate.config import ConfigError, load_config, parse_config
from tests.test_cli_errors import _config, _flat, _invoke
from tests.test_config_cli import write


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(data, "t")
    return " ".join(str(err.value).split())


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("[run]\nwokers = 2\n", ["run.wokers", "[run]", "did you mean 'workers'"]),
        ("[filters.quality]\nmin_sid = 9\n", ["[filters.quality]", "did you mean 'min_side'"]),
        ("[filtres.license]\npolicy = 'commercial'\n", ["filtres", "did you mean 'filters'"]),
        ("[ingest]\nimage_szie = 256\n", ["ingest.image_szie", "did you mean 'image_size'"]),
        ("[[sources]]\ntype = 'urls'\npth = 'a.parquet'\n", ["[[sources]]", "'path'"]),
        ("[dedup]\nradious = 4\n", ["dedup.radious", "did you mean 'radius'"]),
    ],
)
def test_unknown_key_names_its_section_and_the_near_name(
    tmp_path: Path, text: str, needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, msg


def test_unknown_key_without_a_near_name_has_no_guess() -> None:
    msg = _error({"run": {"zzzzzz": 1}})
    assert "run.zzzzzz" in msg and "did you mean" not in msg


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ".hidden"])
def test_bad_release_name_fails_at_load(name: str) -> None:
    """It used to pass, and the shard step (after every other step) raised a traceback."""
    assert "run.release_name" in _error({"run": {"release_name": name}})


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"ingest": {"jpeg_draft_factor": float("inf")}}, "ingest.jpeg_draft_factor"),
        ({"ingest": {"total_timeout": float("inf")}}, "ingest.total_timeout"),
        ({"ingest": {"backoff_base": float("nan")}}, "ingest.backoff_base"),
    ],
)
def test_infinite_or_nan_floats_are_refused(data: dict[str, Any], needle: str) -> None:
    """inf passed every bound: jpeg_draft_factor = inf dropped every JPEG as decode_error."""
    assert needle in _error(data)


def test_ingest_min_size_above_max_size_is_refused() -> None:
    msg = _error({"ingest": {"min_image_size": 512, "max_image_size": 256}})
    assert "min_image_size" in msg and "max_image_size" in msg
    ok = parse_config({"ingest": {"min_image_size": 512, "max_image_size": 0}})  # 0 = off
    assert ok.ingest.min_image_size == 512


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"caption": {"device": "gpu"}}, "caption.device"),
        ({"caption": {"device": "mps"}}, "caption.device"),  # pick_device refuses it
        ({"train": {"device": "gpu"}}, "train.device"),
        ({"train": {"adam_beta1": 1.0}}, "train.adam_beta1"),
        ({"train": {"adam_beta2": -0.1}}, "train.adam_beta2"),
        ({"train": {"adam_eps": -1e-8}}, "train.adam_eps"),
        ({"dedup": {"semantic_device": "gpu"}}, "dedup.semantic_device"),
        ({"filters": {"quality": {"alt_min_chars": 50, "alt_max_chars": 10}}}, "alt_min_chars"),
    ],
)
def test_settings_that_fail_in_setup_fail_at_load(data: dict[str, Any], needle: str) -> None:
    assert needle in _error(data)


def test_valid_devices_and_betas_still_load() -> None:
    cfg = parse_config(
        {
            "caption": {"device": "cuda:1"},
            "train": {"device": "mps", "adam_beta1": 0.0, "adam_beta2": 0.95, "adam_eps": 0.0},
        }
    )
    assert (cfg.caption.device, cfg.train.device) == ("cuda:1", "mps")


def test_clip_score_on_captions_is_refused_in_a_pipeline() -> None:
    """The filter step runs before captioning: every sample would be kept unscored."""
    clip = {"weights": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "text": "caption"}
    msg = _error({"filters": {"clip_score": clip}})
    assert "filters.clip_score.text" in msg and "alt_text" in msg
    parse_config({"filters": {"clip_score": {**clip, "enabled": False}}})
    parse_config({"filters": {"clip_score": {"text": "caption"}}})  # no weights: off anyway


def test_semantic_dedup_without_weights_fails_at_load() -> None:
    """It used to fail in dedup's prepare, after ingest and filter had run."""
    msg = _error({"dedup": {"semantic": True}})
    assert "dedup.semantic_weights" in msg
    parse_config({"dedup": {"semantic": True, "enabled": False}})
    parse_config({"dedup": {"semantic": True, "semantic_weights": "w.bin"}})


@pytest.mark.parametrize(
    "data",
    [
        {"shards": {"splits": []}},
        {"shards": {"splits": ["noncommercial"]}},  # the commercial policy admits nothing NC
    ],
)
def test_splits_that_publish_nothing_are_refused(data: dict[str, Any]) -> None:
    assert "shards.splits" in _error(data)


def test_splits_that_publish_something_load() -> None:
    parse_config(
        {"shards": {"splits": ["noncommercial"], "noncommercial_includes_commercial": True}}
    )
    parse_config(
        {
            "filters": {"license": {"policy": "noncommercial"}},
            "shards": {"splits": ["noncommercial"]},
        }
    )
    parse_config(
        {"filters": {"license": {"enabled": False}}, "shards": {"splits": ["noncommercial"]}}
    )


class _NoRun:
    """Stands in for Pipeline: any step that starts is recorded."""

    ran: ClassVar[list[list[str]]] = []

    def __init__(self, cfg: Any, executor: Any, retry_reasons: Any = frozenset()) -> None:
        self.report_path = Path(cfg.run.work_dir) / "report.html"

    def run(self, steps: list[str]) -> list[Any]:
        self.ran.append(steps)
        return []


def test_unknown_step_is_refused_before_any_step_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--steps ingest,filtr` used to download everything, then fail on 'filtr'."""
    monkeypatch.setattr("ccurate.pipeline.Pipeline", _NoRun)
    _NoRun.ran.clear()
    res = _invoke("run", str(_config(tmp_path)), "--steps", "ingest,filtr")
    assert res.exit_code == 2, res.output
    assert "unknown step 'filtr'" in _flat(res) and "ingest, filter, dedup" in _flat(res)
    assert _NoRun.ran == []
    res = _invoke("run", str(_config(tmp_path)), "--steps", "ingest, filter")
    assert res.exit_code == 0, res.output
    assert _NoRun.ran == [["ingest", "filter"]]


def test_demo_refuses_zero_workers_instead_of_using_two(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr("ccurate.demo.run.run_demo", lambda out, **kw: calls.append(kw["workers"]))
    res = _invoke("demo", "-w", "0")
    assert res.exit_code == 2 and calls == [], res.output
    res = _invoke("demo", "--help")
    assert "[run].workers" not in res.output  # the demo has no config file to override


def test_readme_config_examples_load() -> None:
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert blocks
    for block in blocks:
        parse_config(tomllib.loads(block), "README.md")


def test_address_without_the_ray_executor_is_refused(tmp_path: Path) -> None:
    """--address only means something to the Ray executor: with another it was ignored."""
    res = _invoke("run", str(_config(tmp_path)), "--address", "10.0.0.1:6379")
    assert res.exit_code == 2 and "needs --executor ray" in _flat(res), res.output


def test_train_with_training_disabled_says_so(tmp_path: Path) -> None:
    """`ccurate train run` on a config whose [train] is off exited 0 having done nothing."""
    res = _invoke("train", "run", str(_config(tmp_path, "[train]\nenabled = false\n")))
    assert res.exit_code == 2 and "enabled = false" in _flat(res), res.output


def test_portable_dump_states_paths_relative_to_the_config_and_reads_old_releases(
    tmp_path: Path,
) -> None:
    import json

    from ccurate.config import portable, portable_dump

    (tmp_path / "blip").mkdir()
    cfg_file = tmp_path / "run.toml"
    cfg_file.write_text(
        '[run]\nwork_dir = "out/work"\n[caption]\nmodel = "./blip"\n'
        '[filters.watermark]\nmodel_weights = "/opt/elsewhere/wm.pt"\n',
        encoding="utf-8",
    )
    cfg = load_config(cfg_file)
    assert cfg.caption.model == str(tmp_path.resolve() / "blip")  # resolved for the run
    dump = portable_dump(cfg)
    assert dump["run"]["work_dir"] == "out/work" and dump["caption"]["model"] == "blip"
    assert dump["filters"]["watermark"]["model_weights"] == "/opt/elsewhere/wm.pt"  # outside
    # a release.json written before portable_dump held the absolute form: read as the same
    old = json.loads(cfg.model_dump_json())
    assert old != dump and portable(old, cfg.base_dir) == dump
    # a config at the root would make every absolute string "relative": left as it is
    assert portable({"a": "/x/y"}, Path("/")) == {"a": "/x/y"}


def test_demo_caption_model_path_is_relative_to_the_caller(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from ccurate.demo.run import demo_config

    monkeypatch.chdir(tmp_path)
    corpus: Any = SimpleNamespace(pages=["/p.html"])
    cfg = demo_config(corpus, "http://127.0.0.1:1", Path("out"), 2, "./models/blip2", 1)
    assert cfg.caption.model == str(tmp_path.resolve() / "models" / "blip2")
    assert cfg.run.work_dir == str(tmp_path.resolve() / "out" / "work")
    hub = demo_config(corpus, "http://127.0.0.1:1", Path("out"), 2, "Salesforce/blip2-x", 1)
    assert hub.caption.model == "Salesforce/blip2-x"  # a hub id stays one
