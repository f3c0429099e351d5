"""Second trainer review: precompute never deletes its source, loose shards are identified by
content, streamed shards are not read before training, a wholly bad shard is skipped, and the
split rule holds whatever form `--data` takes."""

from __future__ import annotations

import functools
import http.server
import io
import shutil
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ccurate.train.config import TrainConfig
from ccurate.train.loader import ShardDataset, TrainLoader
from ccurate.train.loop import shard_sources, sources_digest
from ccurate.train.precompute import precompute
from ccurate.train.stream import DataError, StreamSpec, find_shards, iter_tar
from ccurate.train.synthetic import write_image_release
from tests.test_train_data_identity import _release
from tests.test_train_epochs import _decoder, _loader, _take
from tests.test_train_loop import (
    FAST,
    _offline_one_thread,  # noqa: F401 - autouse: 1 thread
)


@pytest.fixture(scope="module")
def superset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A release with both splits, the noncommercial one holding every commercial sample."""
    return _release(
        tmp_path_factory.mktemp("rel"), "both", 14, 2, noncommercial_includes_commercial=True
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---- 1: precompute's output never overlaps its source ---------------------------------


def test_precompute_refuses_an_output_that_overlaps_the_source(
    tmp_path: Path, superset: Path
) -> None:
    loose = tmp_path / "d"
    write_image_release(loose, [3, 3], resolution=16)
    split = superset / "commercial"
    before = {loose: _files(loose), split: _files(split)}
    cfg = TrainConfig(**FAST)
    for data, out in [
        (loose, loose),  # in place
        (loose, loose / "lat"),  # inside the source folder
        (loose, tmp_path),  # around it
        (split, split),  # a release's split in place
        (superset, superset / "latents"),  # inside a release
    ]:
        with pytest.raises(DataError, match="overlaps"):
            precompute(cfg, data, out)
    assert {loose: _files(loose), split: _files(split)} == before
    assert not (loose / "lat").exists() and not (superset / "latents").exists()


# ---- 2: loose shards are identified by content, not by size -----------------------------


def _rekeyed(src: Path, dst: Path) -> None:
    """`src`'s shards with every key's first digit made 9: the same sizes, other samples."""
    dst.mkdir()
    for tar in sorted(src.glob("*.tar")):
        with (
            tarfile.open(tar) as tin,
            tarfile.open(dst / tar.name, "w", format=tarfile.USTAR_FORMAT) as tout,
        ):
            for m in tin.getmembers():
                fh = tin.extractfile(m)
                assert fh is not None
                data = fh.read()
                m.name = "9" + m.name[1:]
                tout.addfile(m, io.BytesIO(data))


def test_loose_shards_of_the_same_size_with_other_samples_differ(tmp_path: Path) -> None:
    write_image_release(tmp_path / "a", [6, 6], resolution=16, seed=0)
    write_image_release(tmp_path / "src", [6, 6], resolution=16, seed=3)
    _rekeyed(tmp_path / "src", tmp_path / "b")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    a, b, copy = (find_shards(tmp_path / n) for n in ("a", "b", "copy"))
    sizes = [Path(s).stat().st_size for s in a]
    assert sizes == [Path(s).stat().st_size for s in b]  # tar padding: a collision by size
    assert iter_tar(a[0]).__next__().key != iter_tar(b[0]).__next__().key
    digest = {n: sources_digest(shard_sources(s)[0]) for n, s in [("a", a), ("b", b), ("c", copy)]}
    assert digest["a"] != digest["b"]
    assert digest["a"] == digest["c"]  # a byte-identical copy elsewhere still resumes


# ---- 3: streamed shards are not read before training -------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[list[str], Counter[str]]]:
    write_image_release(tmp_path, [5, 3, 4, 2], resolution=16)
    hits: Counter[str] = Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            hits[self.path] += 1
            super().do_GET()

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path))
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{srv.server_port}"
    try:
        yield [f"{base}/shard-{i:05d}.tar" for i in range(4)], hits
    finally:
        srv.shutdown()
        srv.server_close()


def test_url_shards_are_not_downloaded_to_count_them(
    served: tuple[list[str], Counter[str]],
) -> None:
    urls, hits = served
    spec = StreamSpec(tuple(urls), seed=7, shuffle_buffer=1)
    # the epoch length given, as the trainer does with epoch_samples
    loader = TrainLoader(ShardDataset(spec, _decoder(), 2), 7)
    assert sum(hits.values()) == 0  # nothing read at construction
    try:
        keys = [k for b in _take(loader, 7) for k in b["keys"]]
    finally:
        loader.close()
    # one slot, whole shards: the 14 samples once each, each shard fetched once
    assert sorted(keys) == sorted(set(keys)) and len(keys) == 14
    assert sorted(hits.values()) == [1, 1, 1, 1]


# ---- 4: a wholly bad shard is skipped; only a whole bad data epoch is fatal ---------------


def test_a_wholly_bad_shard_is_skipped_and_counted(tmp_path: Path) -> None:
    bad = [f"001{j:05d}" for j in range(200)]
    write_image_release(tmp_path, [20, 200, 20], resolution=16, bad_keys=bad)
    loader = _loader(find_shards(tmp_path), batch=2, buffer=4)
    try:
        batches = _take(loader, 30)  # more than a data epoch's 20 good batches
    finally:
        loader.close()
    seen = {k for b in batches for k in b["keys"]}
    good = {f"{s:03d}{j:05d}" for s, n in [(0, 20), (2, 20)] for j in range(n)}
    assert good <= seen  # training went on past the bad shard, through the whole epoch
    assert loader.stats["skipped_samples"] >= 190


def test_data_with_no_usable_sample_still_stops(tmp_path: Path) -> None:
    keys = write_image_release(tmp_path, [6, 4], resolution=16, bad_keys=[])
    shutil.rmtree(tmp_path)
    write_image_release(tmp_path, [6, 4], resolution=16, bad_keys=keys)
    loader = _loader(find_shards(tmp_path), batch=2, buffer=4)
    try:
        with pytest.raises(DataError, match="whole data epoch"):
            _take(loader, 1)
    finally:
        loader.close()


# ---- 5: the split rule for every form of --data ---------------------------------------------


def test_split_rule_holds_for_brace_patterns_and_lists(superset: Path) -> None:
    nc = sorted((superset / "noncommercial").glob("*.tar"))
    pattern = str(superset / "noncommercial" / f"noncommercial-{{000000..{len(nc) - 1:06d}}}.tar")
    with pytest.raises(DataError, match="'noncommercial' split"):
        find_shards(pattern)  # default splits: commercial only
    with pytest.raises(DataError, match="'noncommercial' split"):
        find_shards([str(p) for p in nc])
    both = [str(superset / "commercial"), str(superset / "noncommercial")]
    with pytest.raises(DataError, match="twice"):
        find_shards(both, ["commercial", "noncommercial"])
    assert len(find_shards(pattern, ["noncommercial"])) == len(nc)
    assert find_shards(both[:1]) == find_shards(superset)
