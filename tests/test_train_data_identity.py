"""What data a run trains on, and that a resume or a precompute rerun finds the same data:
release splits, content identity of a release, latents of another release or VAE, the
per-step keys log across a kill (review findings 1, 2, 3, 7 and 9)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from ccurate.shards.config import ShardsConfig
from ccurate.shards.release import write_release
from ccurate.shards.synth import make_inputs
from ccurate.train.checkpoint import CheckpointError
from ccurate.train.config import TrainConfig
from ccurate.train.loop import train
from ccurate.train.stream import DataError, find_shards, iter_tar
from tests.test_train_loop import (
    FAST,
    _offline_one_thread,  # noqa: F401 - autouse: 1 thread
)

RUN_INFO = {"date": "2025-06-01", "run_id": "test", "filters": {}, "caption": {"model": "tiny"}}
RUN = {**FAST, "ema": False, "log_keys": True}


def _release(tmp: Path, name: str, per_shard: int, seed: int, **shards: object) -> Path:
    inputs = make_inputs(tmp / f"in-{name}", n_shards=2, per_shard=per_shard, seed=seed)
    cfg = ShardsConfig(samples_per_shard=5, **shards)  # type: ignore[arg-type]
    return write_release(*inputs, tmp / "rel", cfg, name=name, run_info=RUN_INFO)


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """v1 and v2: other samples under the same shard names; `both`: the two splits, the
    noncommercial one a superset; `disjoint`: the two splits, no overlap; `commercial`: one."""
    tmp = tmp_path_factory.mktemp("releases")
    return {
        "v1": _release(tmp, "v1", 14, 0),
        "v2": _release(tmp, "v2", 16, 1),
        "both": _release(tmp, "both", 14, 2, noncommercial_includes_commercial=True),
        "disjoint": _release(tmp, "disjoint", 14, 2),
        "commercial": _release(tmp, "commercial", 14, 3, splits=["commercial"]),
    }


def _keys(shards: list[str]) -> list[str]:
    return [r.key for s in shards for r in iter_tar(s)]


def _split_keys(release: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for row in pq.read_table(release / "manifest.parquet", columns=["key", "split"]).to_pylist():
        out.setdefault(row["split"], set()).add(row["key"])
    return out


def _trained(out: Path) -> list[str]:
    lines = (out / "keys-rank0.jsonl").read_text().splitlines()
    return [k for line in lines for k in json.loads(line)["keys"]]


# ---- 1: a resume on other data with the same shard names ----------------------------------


def test_resume_refuses_another_release_with_the_same_shard_names(
    releases: dict[str, Path], tmp_path: Path
) -> None:
    v1, v2 = releases["v1"], releases["v2"]
    names = [str(Path(s).relative_to(v1)) for s in find_shards(v1)]
    assert names == [str(Path(s).relative_to(v2)) for s in find_shards(v2)]  # the trap
    out = tmp_path / "run"
    train(TrainConfig(**RUN, steps=2), v1, out)
    with pytest.raises(CheckpointError, match=r"written on v1, this run reads v2.*'restart'"):
        train(TrainConfig(**RUN, steps=4, resume="latest"), v2, out)
    # the same release copied elsewhere (a node's local disk) is the same data
    copy = tmp_path / "copy" / "v1"
    shutil.copytree(v1, copy)
    assert train(TrainConfig(**RUN, steps=3, resume="latest"), copy, out)["steps"] == 3
    # moving on to the new release is explicit
    s = train(TrainConfig(**RUN, steps=4, resume="latest", resume_data="restart"), v2, out)
    assert s["steps"] == 4
    resumed = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    changes = [e.get("changed") for e in resumed if e.get("event") == "resume"]
    assert changes == [[], ["data_digest"]]


# ---- 2: which splits of a release are read ------------------------------------------------


def test_a_release_gives_the_commercial_split_by_default(releases: dict[str, Path]) -> None:
    both = releases["both"]
    split = _split_keys(both)
    assert split["commercial"] < split["noncommercial"]  # the superset layout
    commercial = _keys(find_shards(both))
    assert set(commercial) == split["commercial"] and len(commercial) == len(set(commercial))
    nc = _keys(find_shards(both, ["noncommercial"]))
    assert set(nc) == split["noncommercial"] and len(nc) == len(set(nc))
    with pytest.raises(DataError, match=r"twice.*splits = \['noncommercial'\]"):
        find_shards(both, ["commercial", "noncommercial"])
    # without the overlap, both splits are read, each sample once
    disjoint = releases["disjoint"]
    union = _keys(find_shards(disjoint, ["commercial", "noncommercial"]))
    assert len(union) == len(set(union)) == sum(map(len, _split_keys(disjoint).values()))
    # a split the release does not publish, or a folder of a split not chosen
    with pytest.raises(DataError, match=r"has no 'noncommercial' split .*'commercial'"):
        find_shards(releases["commercial"], ["noncommercial"])
    with pytest.raises(DataError, match=r"'noncommercial' split .* add 'noncommercial'"):
        find_shards(both / "noncommercial")
    assert set(_keys(find_shards(both / "noncommercial", ["noncommercial"]))) == set(nc)


def test_splits_setting_is_validated() -> None:
    assert TrainConfig().splits == ["commercial"]
    for bad in ([], ["commercial", "commercial"], ["research"]):
        with pytest.raises(ValidationError):
            TrainConfig(splits=bad)


def test_training_on_a_release_reads_the_chosen_splits(
    releases: dict[str, Path], tmp_path: Path
) -> None:
    both = releases["both"]
    split = _split_keys(both)
    out = tmp_path / "c"
    train(TrainConfig(**RUN, steps=12, checkpoint_at_end=False), both, out)
    trained = _trained(out)
    assert len(trained) == 24 and set(trained) <= split["commercial"]
    # one epoch of the commercial split (14 samples, batch 2) has no sample twice
    assert len(set(trained[:14])) == 14


# ---- 3 and 7: latents of a release, by content and by model -------------------------------


def _latent_keys(folder: Path) -> dict[str, list[str]]:
    return {str(Path(s).relative_to(folder)): sorted(_keys([s])) for s in find_shards(folder)}


def _release_keys(release: Path) -> dict[str, list[str]]:
    return {str(Path(s).relative_to(release)): sorted(_keys([s])) for s in find_shards(release)}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release with fewer shards than v1, under the same names."""
    return _release(tmp_path_factory.mktemp("small"), "small", 6, 4)


def test_precompute_rerun_on_another_release_redoes_and_removes_the_old_shards(
    releases: dict[str, Path], small: Path, tmp_path: Path
) -> None:
    from ccurate.train.precompute import precompute

    cfg = TrainConfig(**{**FAST, "num_workers": 0})
    lat = tmp_path / "latents"
    precompute(cfg, releases["v1"], lat)
    assert _latent_keys(lat) == _release_keys(releases["v1"])
    precompute(cfg, small, lat)  # same shard names, other samples, half the shards
    assert _latent_keys(lat) == _release_keys(small)
    from ccurate.train.loop import shard_sources, sources_digest

    manifest = json.loads((lat / "latents.json").read_text())
    assert manifest["releases"] == ["small"] and manifest["splits"] == ["commercial"]
    assert manifest["source_digest"] == sources_digest(shard_sources(find_shards(small))[0])
    # a rerun on the same release keeps every shard as it is
    before = {p: p.stat().st_mtime_ns for p in lat.glob("**/*.tar")}
    precompute(cfg, small, lat)
    assert {p: p.stat().st_mtime_ns for p in lat.glob("**/*.tar")} == before
    # a tar precompute did not write is refused, not deleted, and not read as latents
    foreign = lat / "commercial" / "mine.tar"
    shutil.copy(find_shards(small)[0], foreign)
    with pytest.raises(DataError, match="not a latent shard of precompute"):
        precompute(cfg, small, lat)
    assert foreign.exists() and not (lat / "latents.json").exists()


def test_resume_compares_pixels_or_latents_and_the_models(
    releases: dict[str, Path], tmp_path: Path
) -> None:
    from ccurate.train.precompute import precompute

    v1 = releases["v1"]
    lat = tmp_path / "latents"
    precompute(TrainConfig(**FAST), v1, lat)
    out = tmp_path / "run"
    train(TrainConfig(**RUN, steps=2), v1, out)
    # the same release, as latents: another stream (precompute drops bad samples)
    with pytest.raises(CheckpointError, match=r"mode='pixels' \(now 'latents'\)"):
        train(TrainConfig(**RUN, steps=3, resume="latest"), lat, out)
    # the same pixels through another text layer: another conditioning
    with pytest.raises(CheckpointError, match=r"text_layer='default' \(now 'penultimate'\)"):
        train(TrainConfig(**RUN, steps=3, resume="latest", text_layer="penultimate"), v1, out)
    s = train(TrainConfig(**RUN, steps=3, resume="latest", resume_data="restart"), lat, out)
    assert s["steps"] == 3 and s["latents"]
    # latents of v1 and a pixel run of v1 name the same data
    state = json.loads(sorted((out / "checkpoints").glob("step-*/state.json"))[-1].read_text())
    assert (
        state["data"]["stream"]["data_digest"]
        == json.loads((lat / "latents.json").read_text())["source_digest"]
    )
    assert state["data"]["releases"] == ["v1"]
    # a VAE set in [train] must be the latents' one
    with pytest.raises(DataError, match=r"train.vae = '/elsewhere/vae' but .* 'scratch'"):
        train(TrainConfig(**RUN, steps=1, vae="/elsewhere/vae"), lat, tmp_path / "vae")
    with pytest.raises(DataError, match=r"precomputed from the \['commercial'\] split"):
        train(TrainConfig(**RUN, steps=1, splits=["noncommercial"]), lat, tmp_path / "nc")


# ---- 9: the keys log across a kill --------------------------------------------------------


def test_keys_log_is_on_disk_at_each_checkpoint_and_trimmed_on_resume(
    releases: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ccurate.train.loop as loop

    v1 = releases["v1"]
    keys = tmp_path / "run" / "keys-rank0.jsonl"
    on_disk: list[list[int]] = []
    save = loop.save_checkpoint

    def spy(*args: object, **kwargs: object) -> Path:
        on_disk.append([json.loads(x)["step"] for x in keys.read_text().splitlines()])
        return save(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "save_checkpoint", spy)
    cfg = {**RUN, "checkpoint_every": 2, "checkpoint_at_end": False}
    train(TrainConfig(**cfg, steps=3), v1, tmp_path / "run")  # "killed" after step 2
    assert on_disk == [[0, 1]]  # the checkpoint of step 2 is published with its keys
    keys.write_text(keys.read_text() + '{"step": 3, "mic')  # a line cut by the kill
    train(TrainConfig(**cfg, steps=5, resume="latest"), v1, tmp_path / "run")
    train(TrainConfig(**cfg, steps=5), v1, tmp_path / "once")
    resumed = [json.loads(x) for x in keys.read_text().splitlines()]
    assert [e["step"] for e in resumed] == [0, 1, 2, 3, 4]
    assert resumed == [
        json.loads(x) for x in (tmp_path / "once" / "keys-rank0.jsonl").read_text().splitlines()
    ]
