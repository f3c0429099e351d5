"""Captioning stage on a tiny random-init BLIP-2, loaded through the real code path, offline."""

from __future__ import annotations

import io
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from ccurate.captioning.blip2 import (
    Blip2Captioner,
    caption_model_tag,
    decoding_tag,
    load_image,
    resolve_weights,
)
from ccurate.captioning.cache import CaptionCache
from ccurate.captioning.config import CaptionConfig
from ccurate.captioning.stage import CaptionStage
from ccurate.captioning.tiny import build_tiny_blip2
from ccurate.record import Sample, make_key
from ccurate.stage import StageStats, timed_process
from ccurate.weights import WeightsNotFoundError
from tests.benchload import load_bench as _load_bench


@pytest.fixture(scope="module", autouse=True)
def _offline_single_thread() -> Iterator[None]:
    """No hub traffic; one torch thread (tiny GEMMs on a shared 2-core box thrash with more)."""
    old_env = os.environ.get("HF_HUB_OFFLINE")
    old_threads = torch.get_num_threads()
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old_env


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_blip2(tmp_path_factory.mktemp("weights") / "tiny-blip2")


@pytest.fixture(scope="module")
def captioner(tiny_dir: Path) -> Iterator[Blip2Captioner]:
    cap = Blip2Captioner.load(CaptionConfig(model=str(tiny_dir), batch_size=8))
    yield cap
    cap.close()


def jpeg(seed: int, w: int = 64, h: int = 48) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def samples(n: int, start: int = 0) -> list[Sample]:
    out = []
    for i in range(start, start + n):
        url = f"https://example.org/{i}.jpg"
        out.append(
            Sample(
                key=make_key(url), url=url, alt_text=f"alt {i}", image=jpeg(i), mime="image/jpeg"
            )
        )
    return out


class Counter:
    """Wraps `Blip2Captioner.generate` to count calls and batch sizes (and simulate OOM)."""

    def __init__(self, captioner: Blip2Captioner, oom_above: int | None = None) -> None:
        self.inner = captioner.generate
        self.sizes: list[int] = []
        self.oom_above = oom_above

    def __call__(self, embeds: torch.Tensor) -> list[list[str]]:
        self.sizes.append(int(embeds.shape[0]))
        if self.oom_above is not None and embeds.shape[0] > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(embeds)


def attached(cfg: CaptionConfig, captioner: Blip2Captioner) -> CaptionStage:
    """A set-up stage that uses an already loaded captioner (no second model load)."""
    stage = CaptionStage(cfg)
    stage.attach(captioner)
    stage.setup()
    return stage


def load_bench() -> Any:
    """bench/caption_throughput.py as a module."""
    return _load_bench("caption_throughput")


# ---- loading ----------------------------------------------------------------


def test_loads_local_dir_offline_and_captions(captioner, tiny_dir):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert captioner.model_id == "tiny-blip2"
    assert captioner.revision.startswith("local-")
    assert captioner.precision == "fp32"  # CPU
    tag = f"tiny-blip2@{captioner.revision}|fp32|greedy|max30|min1|prompt=a photo of"
    assert captioner.tag == tag
    caps = captioner.caption([jpeg(1), jpeg(2), b"not an image", None])
    assert all(isinstance(c, list) and len(c) == 1 and c[0] for c in caps[:2])
    assert caps[2] is None and caps[3] is None
    # the revision is stable: the same directory gives the same cache key
    assert resolve_weights(CaptionConfig(model=str(tiny_dir))).revision == captioner.revision


def test_hub_id_resolves_from_hf_cache_offline(tiny_dir, tmp_path, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--blip2-tiny"
    snap = repo / "snapshots" / commit
    shutil.copytree(tiny_dir, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    w = resolve_weights(CaptionConfig(model="acme/blip2-tiny"))
    assert (w.path, w.model_id, w.revision) == (snap, "acme/blip2-tiny", commit)


def test_missing_hub_weights_error_names_location_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(CaptionConfig(model="Salesforce/blip2-opt-2.7b"))
    msg = str(err.value)
    assert str(tmp_path / "hub" / "models--Salesforce--blip2-opt-2.7b") in msg
    assert "hf download Salesforce/blip2-opt-2.7b" in msg


def test_missing_local_weights_error(tmp_path):
    gone = tmp_path / "nowhere" / "blip2"
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(CaptionConfig(model=str(gone)))
    assert str(gone) in str(err.value) and f"--local-dir {gone}" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsNotFoundError, match=r"no BLIP-2 weights in .*hf download"):
        resolve_weights(CaptionConfig(model=str(empty), model_id="Salesforce/blip2-flan-t5-xl"))


def test_stage_loads_in_setup_not_init(tmp_path):
    stage = CaptionStage(CaptionConfig(model=str(tmp_path / "missing")))  # no error yet
    assert len(pickle.dumps(stage)) < 10_000
    with pytest.raises(WeightsNotFoundError):
        stage.setup()


# ---- the stage --------------------------------------------------------------


def test_stage_captions_a_batch_and_keeps_every_sample(captioner, tiny_dir):
    stage = attached(CaptionConfig(model=str(tiny_dir)), captioner)
    batch = samples(6)
    batch[1].drop("too_small", "quality")
    batch[2].image = None
    batch[2].mime = None
    batch[3].image = b"\xff\xd8 broken jpeg"
    stats = StageStats("caption")
    out = timed_process(stage, batch, stats)  # enforces: every key comes out once
    assert [s.key for s in out] == [s.key for s in batch]
    for i in (0, 4, 5):
        assert isinstance(out[i].caption, str) and out[i].caption
        assert out[i].caption_model == captioner.tag
        assert out[i].alt_text == f"alt {i}"
    for i in (1, 2, 3):
        assert out[i].caption is None and out[i].caption_model is None
    assert stage.counts["captioned"] == 3 and stage.counts["failed"] == 1
    assert stage.describe()["caption_model"] == captioner.tag
    stage.teardown()


def test_caption_model_string():
    cfg = CaptionConfig(model="x")
    assert decoding_tag(cfg) == "greedy|max30|min1|prompt=a photo of"
    assert (
        caption_model_tag("Salesforce/blip2-opt-2.7b", "abc123", cfg, "bf16")
        == "Salesforce/blip2-opt-2.7b@abc123|bf16|greedy|max30|min1|prompt=a photo of"
    )
    beam = CaptionConfig(num_beams=5, num_captions=3, repetition_penalty=1.5, min_new_tokens=0)
    assert decoding_tag(beam) == "beam5|max30|rep1.5|n3|prompt=a photo of"
    sample = CaptionConfig(do_sample=True, top_p=0.8, num_captions=2, prompt="")
    assert decoding_tag(sample).startswith("sample(top_p=0.8,temp=1.0,seed=0)|")
    with pytest.raises(ValueError):
        CaptionConfig(num_captions=2)  # greedy gives one caption per image
    with pytest.raises(ValueError):
        CaptionConfig(min_new_tokens=40)


def test_several_captions_per_image(captioner, tiny_dir):
    cfg = CaptionConfig(model=str(tiny_dir), num_beams=3, num_captions=3, max_new_tokens=8)
    cap = Blip2Captioner(captioner.model, captioner.processor, cfg, "tiny", "r")
    try:
        assert cap.fast is None  # beam search goes through HF generate
        stage = attached(cfg, cap)
        out = stage.process(samples(2))
        for s in out:
            assert len(s.extra["captions"]) == 3 and s.extra["captions"][0] == s.caption
        assert "|beam3|max8|min1|n3|" in (out[0].caption_model or "")
    finally:
        cap.close()


def test_fast_greedy_matches_hf_generate(captioner, tiny_dir):
    cfg = CaptionConfig(
        model=str(tiny_dir), repetition_penalty=1.3, min_new_tokens=3, max_new_tokens=12
    )
    fast = Blip2Captioner(captioner.model, captioner.processor, cfg, "tiny", "r")
    slow = Blip2Captioner(
        captioner.model,
        captioner.processor,
        cfg.model_copy(update={"fast_decode": False}),
        "tiny",
        "r",
    )
    try:
        assert fast.fast is not None and slow.fast is None
        imgs = [jpeg(i) for i in range(12)]
        a, b = fast.caption(imgs), slow.caption(imgs)
        assert a == b
        assert len({c[0] for c in a if c}) > 1  # images give different captions
    finally:
        fast.close()
        slow.close()


def test_pixels_match_the_blip_image_processor(captioner):
    h, w = captioner.height, captioner.width
    yy, xx = np.mgrid[0:90, 0:120]
    smooth = np.stack([xx * 2, yy * 2, (xx + yy)], -1).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, "PNG")
    arr = load_image(buf.getvalue(), h, w, captioner.resample)
    assert arr is not None and arr.shape == (h, w, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float()
    ours = x * captioner._scale - captioner._shift
    ref = captioner.processor.image_processor(Image.fromarray(smooth), return_tensors="pt")
    assert torch.allclose(ours, ref["pixel_values"].float(), atol=0.06)


# ---- cache ------------------------------------------------------------------


def test_cache_hit_means_no_second_generate_call(captioner, tiny_dir, tmp_path):
    cfg = CaptionConfig(model=str(tiny_dir), cache_dir=str(tmp_path / "caption_cache"))
    counter = Counter(captioner)
    captioner.generate = counter
    try:
        first = attached(cfg, captioner)
        out1 = first.process(samples(5))
        assert counter.sizes == [5]
        first.teardown()  # flushes the part file
        parts = list((tmp_path / "caption_cache").glob("*.parquet"))
        assert len(parts) == 1

        again = samples(5)  # same images, new Sample objects: a rerun
        second = attached(cfg, captioner)
        out2 = second.process(again)
        assert counter.sizes == [5]  # no second inference
        assert [s.caption for s in out2] == [s.caption for s in out1]
        assert all(s.caption_model == captioner.tag for s in out2)
        assert second.counts["cache_hits"] == 5
        out3 = second.process(samples(2, start=100))  # new images are captioned
        assert counter.sizes == [5, 2]
        second.teardown()
    finally:
        del captioner.generate

    import duckdb

    rel = duckdb.sql(f"SELECT count(*) FROM read_parquet('{tmp_path / 'caption_cache'}/*.parquet')")
    assert rel is not None
    rows = rel.fetchall()
    assert rows == [(7,)]
    # other decoding settings are another cache key
    other = CaptionCache(tmp_path / "caption_cache", captioner.tag + "x")
    assert other.load() == 0
    assert out3[0].caption is not None


def test_finished_shard_captions_reach_the_cache_before_its_marker(captioner, tiny_dir, tmp_path):
    """A worker killed after a shard's marker (teardown never runs) must not lose that
    shard's captions: the rerun skips the shard, so they would never be made again."""
    from ccurate.executor import ShardTask, run_task
    from ccurate.shardio import ShardWriter, is_done

    cache_dir = tmp_path / "caption_cache"
    cfg = CaptionConfig(model=str(tiny_dir), cache_dir=str(cache_dir))
    src, dst = tmp_path / "in" / "part-000000", tmp_path / "out" / "part-000000"
    src.parent.mkdir()
    dst.parent.mkdir()
    writer = ShardWriter(src)
    for s in samples(3):
        writer.write(s)
    writer.commit({})
    stage = attached(cfg, captioner)
    run_task(stage, ShardTask(str(src), str(dst)))
    assert is_done(dst)
    assert stage.counts["captioned"] == 3, stage.counts
    # no teardown: the process "dies" here
    assert CaptionCache(cache_dir, captioner.tag).load() == 3


def test_cache_parts_are_merged_keeping_the_newest_row(tmp_path):
    from ccurate.captioning.cache import compact

    folder = tmp_path / "cache"
    for i in range(5):  # five flushes, as five finished shards leave them
        cache = CaptionCache(folder, "m1", flush_rows=10_000)
        cache.load()
        cache.put(f"sha{i}", [f"caption {i}"])
        cache.put("shared", [f"newest is {i}"])
        cache.flush()
    other = CaptionCache(folder, "m2")
    other.load()
    other.put("sha0", ["another model"])
    other.flush()
    (folder / "part-0-broken.parquet").write_bytes(b"not parquet")
    assert compact(folder, min_parts=100) == 0  # below the threshold: left alone
    assert compact(folder, min_parts=3) == 6
    left = sorted(p.name for p in folder.glob("*.parquet"))
    assert len(left) == 2 and "part-0-broken.parquet" in left  # unreadable: kept, not merged
    got = CaptionCache(folder, "m1")
    assert got.load() == 6
    assert got.get("shared") == ["newest is 4"] and got.get("sha3") == ["caption 3"]
    two = CaptionCache(folder, "m2")
    assert two.load() == 1 and two.get("sha0") == ["another model"]
    newer = CaptionCache(folder, "m1")  # a part written after the merge still wins
    newer.load()
    newer.put("shared", ["after the merge"])
    newer.flush()
    again = CaptionCache(folder, "m1")
    again.load()
    assert again.get("shared") == ["after the merge"]


def test_caption_stage_prepare_merges_the_cache_before_workers_load_it(tiny_dir, tmp_path):
    folder = tmp_path / "cache"
    for i in range(64):
        cache = CaptionCache(folder, "m")
        cache.put(f"sha{i}", ["c"])
        cache.flush()
    CaptionStage(CaptionConfig(cache_dir=str(folder))).prepare([], str(tmp_path))  # no model
    assert len(list(folder.glob("*.parquet"))) == 64
    stage = CaptionStage(CaptionConfig(model=str(tiny_dir), cache_dir=str(folder)))
    stage.prepare([], str(tmp_path))  # on the driver: no model is loaded for it
    assert len(list(folder.glob("*.parquet"))) == 1 and stage._captioner is None


# ---- robustness -------------------------------------------------------------


def test_oom_halves_the_batch_and_succeeds(captioner):
    counter = Counter(captioner, oom_above=2)
    captioner.generate = counter
    old = captioner.batch_size
    try:
        caps = captioner.caption([jpeg(i) for i in range(8)])
        assert all(c and c[0] for c in caps)
        assert captioner.batch_size == 2  # sticky
        assert counter.sizes[:3] == [8, 4, 2]
        assert max(s for s in counter.sizes[3:]) <= 2
        counter.oom_above = 0  # even one image does not fit: no caption, no crash
        caps = captioner.caption([jpeg(1), jpeg(2)])
        assert caps == [None, None]
    finally:
        del captioner.generate
        captioner.batch_size = old


def test_no_model_skips_loudly_once_and_passes_through(caplog):
    caplog.set_level(logging.INFO, logger="ccurate.captioning")
    stage = CaptionStage(CaptionConfig())
    assert stage.resources.gpus == 0
    stage.setup()
    batch = samples(3)
    before = [s.to_row() for s in batch]
    for _ in range(3):
        out = timed_process(stage, batch, StageStats("caption"))
    stage.teardown()
    assert [s.to_row() for s in out] == before
    skipped = [r for r in caplog.records if "captioning skipped" in r.getMessage()]
    assert len(skipped) == 1
    assert "model" in skipped[0].getMessage()
    assert stage.describe()["skipped"] is True


def test_fastgen_eos_padding_and_batch_views_match_hf(captioner):
    """EOS rows turn to pad, min_new_tokens holds EOS back, smaller batches reuse the KV arena."""
    from ccurate.captioning.fastgen import GreedyOPT

    lm = captioner.model.language_model
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), np.uint8))
    with torch.inference_mode():
        emb = captioner.encode(x)
        probe = GreedyOPT(lm, [], captioner.pad_id).generate(emb, captioner.prompt_ids, 10)
        eos = int(torch.mode(probe.flatten()).values)  # a token the model emits often
        by_position = GreedyOPT(lm, [eos], captioner.pad_id, per_position=True)
        masked = GreedyOPT(lm, [eos], captioner.pad_id, per_position=False)
        for n, fast in ((8, by_position), (4, by_position), (8, masked), (4, masked)):
            ours = fast.generate(emb[:n], captioner.prompt_ids, 10, 2, 1.1)
            ref = lm.generate(
                inputs_embeds=emb[:n],
                input_ids=captioner.prompt_ids.unsqueeze(0).expand(n, -1),
                attention_mask=torch.ones(emb[:n].shape[:2], dtype=torch.long),
                max_new_tokens=10,
                min_new_tokens=2,
                repetition_penalty=1.1,
                eos_token_id=eos,
                pad_token_id=captioner.pad_id,
                do_sample=False,
            )[:, emb.shape[1] :]
            ref = torch.nn.functional.pad(ref, (0, 10 - ref.shape[1]), value=captioner.pad_id)
            assert torch.equal(ours, ref)
    hit = (ours == eos).nonzero()
    assert len(hit) > 0  # the EOS path was exercised
    row, col = hit[0].tolist()
    assert col >= 2 and (ours[row, col + 1 :] == captioner.pad_id).all()


def test_load_image_formats_match_pil():
    """OpenCV decode (GIL-free, DCT-reduced for large JPEGs) gives PIL's pixels; GIF via PIL."""
    from ccurate.pixels import jpeg_size

    yy, xx = np.mgrid[0:300, 0:500]
    base = np.stack([(xx / 2) % 255, (yy / 2) % 255, ((xx + yy) / 3) % 255], -1).astype(np.uint8)
    for fmt, mode in [("JPEG", "RGB"), ("JPEG", "L"), ("PNG", "RGBA"), ("GIF", "P")]:
        buf = io.BytesIO()
        Image.fromarray(base).convert(mode).save(buf, fmt)
        data = buf.getvalue()
        ours = load_image(data, 32, 32, 3)
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))
            ref = np.asarray(im.convert("RGB").resize((32, 32), 3))
        assert ours is not None and ours.shape == (32, 32, 3)
        assert np.abs(ours.astype(int) - ref).max() <= 1, fmt
        assert (jpeg_size(data) == (500, 300)) == (fmt == "JPEG")
    assert load_image(b"garbage", 32, 32, 3) is None


@pytest.mark.slow
def test_benchmark_runs_tiny_on_cpu(tmp_path):
    """The GPU benchmark's code path, CI-sized: tiny model, one shard, both decode variants."""
    res = load_bench().main(
        [
            "--tiny",
            "--unique",
            "8",
            "--per-shard",
            "24",
            "--shards",
            "1",
            "--naive-batch",
            "8",
            "--naive-images",
            "16",
            "--variants",
            "8:mask,8:pos",
            "--max-new-tokens",
            "5",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert res["ours_img_s"] > 0 and res["naive_img_s"] > 0
    assert res["ratio"] == pytest.approx(res["ours_img_s"] / res["naive_img_s"])
