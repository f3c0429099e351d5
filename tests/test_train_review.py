"""Review of the trainer's data path and resume: broken shards, resume checks of the data
stream, checkpoint replacement and pruning."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ccurate.train import checkpoint as ckmod
from ccurate.train.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from ccurate.train.config import TrainConfig
from ccurate.train.decode import Decoder
from ccurate.train.loader import ShardDataset, TrainLoader
from ccurate.train.loop import train
from ccurate.train.models import ByteTokenizer
from ccurate.train.stream import StreamSpec, find_shards, iter_tar
from ccurate.train.synthetic import write_image_release
from tests.test_train_checkpoint import _save
from tests.test_train_data import _take
from tests.test_train_loop import _offline_one_thread  # noqa: F401 - autouse: 1 thread
from tests.test_train_resume import FAST, _log


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("release")
    write_image_release(root, [4, 7, 3], resolution=16)
    return root


def _truncated_release(root: Path) -> tuple[list[str], list[str]]:
    """Three shards, the middle one cut inside its 5th sample: (shards, readable keys)."""
    keys = write_image_release(root, [4, 7, 3], resolution=16)
    shards = find_shards(root)
    spans = [m for r in iter_tar(shards[1]) for m in r.members.values()]
    cut = spans[4 * 3 + 1]  # inside sample 5's second member
    with open(shards[1], "r+b") as fh:
        fh.truncate(cut.offset + cut.size // 2)
    lost = {k for k in keys if k.startswith("001") and int(k[3:]) >= 4}
    return shards, [k for k in keys if k not in lost]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_is_reported_and_skipped_not_fatal(tmp_path: Path, workers: int) -> None:
    shards, readable = _truncated_release(tmp_path)
    spec = StreamSpec(tuple(shards), seed=7, shuffle_shards=True, shuffle_buffer=4)
    dec = Decoder("image", 16, 16, "synthetic", 0.5, 7, ByteTokenizer(24))

    def loader(state: dict | None = None) -> TrainLoader:
        return TrainLoader(ShardDataset(spec, dec, 2, num_workers=workers), 5, state=state)

    first = loader()
    got = _take(first, 10)  # 20 samples: past one data epoch (11 readable per epoch)
    state = json.loads(json.dumps(first.state()))
    first.close()
    keys = [k for b in got for k in b["keys"]]
    assert set(keys) == set(readable)  # every readable sample, nothing past the break
    errors = [e for b in got for e in b.get("bad_shards", [])]
    assert errors and all("truncated tar" in e and "shard-00001" in e for e in errors)
    # resumed: the same stream on (the broken shard is skipped at the same place)
    whole = loader()
    full = [b["keys"] for b in _take(whole, 14)]
    whole.close()
    rest = loader(state)
    assert [b["keys"] for b in _take(rest, 4)] == full[10:]
    rest.close()


def test_the_trainer_counts_a_truncated_shard_in_its_log(tmp_path: Path) -> None:
    shards, _ = _truncated_release(tmp_path / "rel")
    out = tmp_path / "run"
    summary = train(TrainConfig(**FAST, steps=6, epoch_samples=11), shards, out)
    assert summary["steps"] == 6 and summary["bad_shards"] >= 1
    events = [e for e in _log(out) if e.get("event") == "bad_shard"]
    assert len(events) == summary["bad_shards"] and "truncated tar" in events[0]["error"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seed": 5}, r"seed=0 \(now 5\)"),
        ({"shuffle_buffer": 3}, r"shuffle_buffer=8 \(now 3\)"),
        ({"shuffle_shards": False}, r"shuffle_shards=True \(now False\)"),
        ({"aspect_buckets": True}, r"buckets=None \(now \[\["),
        ({"data": "fewer"}, r"shards=3 \(now 2\)"),
    ],
)
def test_resume_refuses_another_data_stream(
    release: Path, tmp_path: Path, change: dict, message: str
) -> None:
    """Positions are counts into the stream that seed, shuffling, buckets and the shard list
    fix: resumed under another stream they would repeat and skip samples silently."""
    out = tmp_path / "run"
    train(TrainConfig(**FAST, steps=1), release, out)
    data: Path | list[str] = release
    if change.pop("data", None):
        data = find_shards(release)[:2]
    cfg = TrainConfig(**{**FAST, "steps": 2, "resume": "latest", **change})
    with pytest.raises(CheckpointError, match="data stream was recorded with " + message):
        train(cfg, data, out)
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000001"]


def test_resume_data_restart_continues_training_on_a_new_release(
    release: Path, tmp_path: Path
) -> None:
    """A scheduled pipeline trains on, release after release: `resume_data = 'restart'`
    keeps the model and step and reads the new shards from their start."""
    out = tmp_path / "run"
    train(TrainConfig(**FAST, steps=1), release, out)
    fewer = find_shards(release)[:2]
    cfg = TrainConfig(**{**FAST, "steps": 2, "resume": "latest", "resume_data": "restart"})
    assert train(cfg, fewer, out)["steps"] == 2
    events = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e.get("event") == "resume"]
    assert resumed and resumed[-1]["step"] == 1 and resumed[-1]["data"] == "restart"


def test_resume_accepts_the_same_shards_under_another_directory(
    release: Path, tmp_path: Path
) -> None:
    """Shard names are compared relative to their directory: a moved release resumes."""
    out = tmp_path / "run"
    train(TrainConfig(**FAST, steps=1), release, out)
    moved = tmp_path / "moved"
    shutil.copytree(release, moved)
    assert train(TrainConfig(**FAST, steps=2, resume="latest"), moved, out)["steps"] == 2


def test_a_kill_while_replacing_a_checkpoint_leaves_a_usable_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Saving a step that exists (a run resumed from an earlier checkpoint) and killed while
    the old directory is being deleted: `latest` still names a complete checkpoint."""
    _save(tmp_path, 1, value=1.0, keep=1)
    real = shutil.rmtree

    def killed(path: str | Path, *a: object, **kw: object) -> None:
        if ".tmp-" in Path(path).name:
            return real(path)
        (Path(path) / "unet" / ckmod.WEIGHTS).unlink()  # part deleted, then the kill
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 1, value=2.0, keep=1)
    monkeypatch.setattr(ckmod.shutil, "rmtree", real)
    latest = tmp_path / json.loads((tmp_path / "latest.json").read_text())["path"]
    assert float(load_checkpoint(latest).unet["w"][0, 0]) in (1.0, 2.0)


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    """A run resumed from an older checkpoint than the newest kept ones saves an older step:
    it must survive the pruning and be what `latest` resumes."""
    root = tmp_path / "checkpoints"
    _save(root, 8, keep=2)
    _save(root, 9, keep=2)
    path = _save(root, 3, value=3.0, keep=2)
    assert path.is_dir()
    assert find_checkpoint(tmp_path, "latest") == path
    assert float(load_checkpoint(path).unet["w"][0, 0]) == 3.0
    assert len(list(root.glob("step-*"))) == 2


def test_precompute_keeps_same_named_shards_of_several_directories_apart(tmp_path: Path) -> None:
    """A list of shards from two directories, both `shard-00000.tar`: two latent shards, not
    one overwritten (or skipped as done) by the other."""
    from ccurate.train.precompute import precompute

    a = write_image_release(tmp_path / "a", [2], resolution=16)
    b = write_image_release(tmp_path / "b", [3], resolution=16, seed=1)
    shards = find_shards(tmp_path / "a") + find_shards(tmp_path / "b")
    cfg = TrainConfig(**FAST, precompute_batch=4)
    written = precompute(cfg, shards, tmp_path / "lat")
    assert len(set(written)) == 2
    assert [len(list(iter_tar(w))) for w in written] == [len(a), len(b)]


def test_a_kill_between_the_renames_of_a_replacement_is_recovered(tmp_path: Path) -> None:
    """Killed after the old step-N was moved aside and before the new one took its name
    (keep=1: no other step): `latest` finds step-N again; a leftover of a kill during the
    final delete is removed."""
    root = tmp_path / "checkpoints"
    path = _save(root, 1, value=1.0, keep=1)
    path.rename(root / ".step-00000001.old-1-deadbeef")
    found = ckmod.find_checkpoint(tmp_path, "latest")
    assert found == path and ckmod.load_checkpoint(found).state["loss"] == 1.0
    stale = root / ".step-00000001.old-2-cafe"
    stale.mkdir()
    assert ckmod.find_checkpoint(tmp_path, "latest") == path
    assert not stale.exists()
