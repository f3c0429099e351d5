"""Captioning review fixes (2nd review): each test fails on the code before its fix.

Precision in the cache key, lasting OOM leaves the shard for a rerun, local-folder
revision follows the weights, config refusals, malformed EXIF, empty captions, exact float
keys, stale cache temporaries, incomplete model folders, `model = ""`, max_new_tokens
against the model's positions, generation-config fields and the fast path. Tiny
random-init BLIP-2, CPU, offline.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from ccurate.captioning import cache as cache_mod
from ccurate.captioning.blip2 import (
    Blip2Captioner,
    _is_oom,
    decoding_tag,
    load_image,
    precision_tag,
    resolve_weights,
)
from ccurate.captioning.cache import CACHE_SCHEMA, CaptionCache
from ccurate.captioning.config import CaptionConfig
from ccurate.captioning.fastgen import supports
from ccurate.captioning.stage import CaptionOutOfMemoryError, CaptionStage
from ccurate.captioning.tiny import build_tiny_blip2
from ccurate.executor import ShardTask, run_task
from ccurate.pixels import open_image, upright_rgb
from ccurate.shardio import ShardWriter, is_done
from ccurate.weights import WeightsNotFoundError
from tests.test_captioning import (  # noqa: F401 - the autouse fixture applies here too
    _offline_single_thread,
    attached,
    jpeg,
    samples,
)
from tests.test_captioning_paths import captioner as captioner  # fixtures
from tests.test_captioning_paths import tiny_dir as tiny_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def shard(folder: Path, items: list) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder / "part-000000")
    for s in items:
        writer.write(s)
    writer.commit({})
    return str(folder / "part-000000")


# ---- 1: the precision is part of caption_model and the cache key ------------------------


def test_precision_is_in_caption_model_and_the_cache_key(captioner, tiny_dir, tmp_path):
    """fp32 (CPU) and bf16/fp16 (GPU) captions differ: they must not share cache rows."""
    cfg = captioner.cfg.model_copy(update={"cache_dir": str(tmp_path / "cc")})
    half = Blip2Captioner(
        copy.deepcopy(captioner.model).to(torch.bfloat16),
        captioner.processor,
        cfg,
        captioner.model_id,
        captioner.revision,
    )
    try:
        assert "|fp32|" in captioner.tag and "|bf16|" in half.tag
        first = attached(cfg, captioner)
        first.process(samples(3))
        first.teardown()
        assert first.counts["captioned"] == 3
        other = attached(cfg, half)
        out = other.process(samples(3))
        other.teardown()
        assert other.counts["cache_hits"] == 0 and other.counts["captioned"] == 3
        assert all(s.caption_model == half.tag for s in out)
    finally:
        half.close()


def test_precision_tag_names_gpu_math_settings(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision_tag(torch.float32, cpu) == "fp32"
    assert precision_tag(torch.float16, cpu) == "fp16"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert precision_tag(torch.float32, cuda) == "fp32-convtf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert precision_tag(torch.float32, cuda) == "fp32"
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 matmuls
    try:
        assert precision_tag(torch.float32, cuda) == "fp32-mmhigh"
    finally:
        torch.set_float32_matmul_precision(old)
    matmul = torch.backends.cuda.matmul
    assert precision_tag(torch.bfloat16, cuda) == "bf16"
    old_bf16 = matmul.allow_bf16_reduced_precision_reduction
    matmul.allow_bf16_reduced_precision_reduction = False
    try:
        assert precision_tag(torch.bfloat16, cuda) == "bf16-fullreduce"
    finally:
        matmul.allow_bf16_reduced_precision_reduction = old_bf16


# ---- 2: a lasting OOM leaves the shard unfinished; cuBLAS/cuDNN allocation failures ------


def test_lasting_oom_leaves_the_shard_for_a_rerun(captioner, tmp_path):
    """Images that do not fit even alone: no marker (a rerun redoes the shard), and the
    captions made before are cached, so the rerun captions only the rest."""
    cfg = captioner.cfg.model_copy(update={"cache_dir": str(tmp_path / "cc")})
    src = shard(tmp_path / "in", samples(20))
    task = ShardTask(src, str(tmp_path / "out" / "part-000000"))
    inner = captioner.generate
    calls = {"n": 0}

    def full_gpu(embeds: torch.Tensor) -> list[list[str]]:
        calls["n"] += 1
        if calls["n"] > 1:  # the first batch of 8 fits, then the GPU stays full
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 MiB")
        return inner(embeds)

    old = captioner.batch_size
    captioner.generate = full_gpu
    try:
        stage = attached(cfg, captioner)
        with pytest.raises(CaptionOutOfMemoryError, match="rerun"):
            run_task(stage, task)
        assert not is_done(task.dst)
        assert stage.counts["captioned"] == 8 and stage.counts["out_of_memory"] == 12
        assert calls["n"] < 1 + 4 + 8 + 12  # gave up after a streak, not one try per image
    finally:
        del captioner.generate
        captioner.batch_size = old
    rerun = attached(cfg, captioner)
    run_task(rerun, task)
    assert is_done(task.dst)
    assert rerun.counts["cache_hits"] == 8 and rerun.counts["captioned"] == 12


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    ],
)
def test_cublas_and_cudnn_allocation_failures_halve_the_batch(captioner, message):
    assert _is_oom(RuntimeError(message))
    inner = captioner.generate

    def tight(embeds: torch.Tensor) -> list[list[str]]:
        if embeds.shape[0] > 2:
            raise RuntimeError(message)
        return inner(embeds)

    old = captioner.batch_size
    captioner.generate = tight
    try:
        caps = captioner.caption([jpeg(i) for i in range(8)])  # 8 -> 4 -> 2
        assert all(c and c[0] for c in caps) and captioner.batch_size == 2
        assert captioner.oom_lost == []
    finally:
        del captioner.generate
        captioner.batch_size = old


# ---- 3: a local folder's recorded commit holds only while the files are those bytes -----


def _metadata(d: Path, commit: str) -> None:
    meta = d / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        if f.is_file():
            data = f.read_bytes()
            etag = (
                hashlib.sha256(data).hexdigest()
                if f.suffix == ".safetensors"
                else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            )
            (meta / f"{f.name}.metadata").write_text(f"{commit}\n{etag}\n1700000000.0\n")


def test_local_dir_retrained_in_place_gets_a_new_revision(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir, tmp_path / "blip2-opt-2.7b")
    _metadata(d, COMMIT)  # as `hf download ... --local-dir d` leaves it
    assert resolve_weights(CaptionConfig(model=str(d))).revision == COMMIT
    other = build_tiny_blip2(tmp_path / "finetuned", seed=7)
    shutil.copyfile(other / "model.safetensors", d / "model.safetensors")  # retrained in place
    after = resolve_weights(CaptionConfig(model=str(d))).revision
    assert after != COMMIT
    assert after == resolve_weights(CaptionConfig(model=str(other))).revision  # its content


# ---- 6: what `generate` refuses is refused by the config --------------------------------


def test_beam_sampling_with_fewer_beams_than_captions_is_refused():
    with pytest.raises(ValidationError, match="num_beams >= num_captions"):
        CaptionConfig(do_sample=True, num_beams=2, num_captions=4)
    CaptionConfig(do_sample=True, num_beams=4, num_captions=4)  # beam sampling, enough beams
    CaptionConfig(do_sample=True, num_beams=1, num_captions=4)  # independent samples
    with pytest.raises(ValidationError, match="do_sample = true"):
        CaptionConfig(num_captions=2)


# ---- 8: malformed EXIF on the PIL path (CMYK, alpha) --------------------------------------


def _exif(orientation: int = 6) -> bytes:
    entries = [
        struct.pack("<HHI4s", 0x0100, 2, 3, b"me\0\0"),  # ImageWidth stored as ASCII
        struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0),
    ]
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", len(entries)) + b"".join(entries)
    return b"Exif\0\0" + tiff + b"\0" * 4


@pytest.mark.parametrize("kind", ["jpeg-cmyk", "png-rgba", "webp-rgba"])
def test_malformed_exif_on_the_pil_path_still_captions_upright(kind):
    grad = np.zeros((60, 90, 3), np.uint8)
    grad[:, :45] = (220, 20, 20)
    grad[:30, 45:] = (20, 20, 220)
    rgb = Image.fromarray(grad)
    rgba = np.array(rgb.convert("RGBA"))
    rgba[:, ::2, 3] = 0
    buf = io.BytesIO()
    if kind == "jpeg-cmyk":
        rgb.convert("CMYK").save(buf, "JPEG", exif=_exif())
    elif kind == "png-rgba":
        Image.fromarray(rgba).save(buf, "PNG", exif=_exif())
    else:
        Image.fromarray(rgba).save(buf, "WEBP", lossless=True, exif=_exif())
    data = buf.getvalue()
    got = load_image(data, 32, 32, 3)
    ref = np.asarray(upright_rgb(open_image(data)).resize((32, 32), 3), np.float32)
    assert got is not None
    assert float(np.abs(got.astype(np.float32) - ref).mean()) < 6


# ---- 9: empty captions are no captions ----------------------------------------------------


def test_empty_captions_are_not_captions_nor_cached(captioner, tmp_path):
    cfg = captioner.cfg.model_copy(update={"cache_dir": str(tmp_path / "cc")})
    captioner.generate = lambda embeds: [[""] for _ in range(embeds.shape[0])]
    try:
        stage = attached(cfg, captioner)
        out = stage.process(samples(3))
        stage.teardown()
    finally:
        del captioner.generate
    assert all(s.caption is None and s.caption_model is None for s in out)
    assert stage.counts["empty"] == 3 and stage.counts["captioned"] == 0
    assert CaptionCache(cfg.cache_dir, captioner.tag).load() == 0
    # a row an earlier version cached is not reused either: captioned again
    sha = hashlib.sha256(samples(1)[0].image or b"").hexdigest()
    table = pa.table(
        {
            "image_sha256": [sha],
            "caption_model": [captioner.tag],
            "captions": [[""]],
            "created_at": pa.array([0], pa.timestamp("s", tz="UTC")),
        },
        schema=CACHE_SCHEMA,
    )
    pq.write_table(table, Path(cfg.cache_dir) / "part-1-old.parquet")
    again = attached(cfg, captioner)
    out = again.process(samples(1))
    again.teardown()
    assert again.counts["cache_hits"] == 0 and out[0].caption


# ---- 11: float settings in the key are exact ---------------------------------------------


@pytest.mark.parametrize(
    "field, extra",
    [
        ("repetition_penalty", {}),
        ("temperature", {"do_sample": True}),
        ("top_p", {"do_sample": True, "top_p": 0.9}),
        ("length_penalty", {"num_beams": 2}),
    ],
)
def test_float_settings_are_keyed_exactly(field, extra):
    base = {"top_p": 0.9} if field == "top_p" else {}
    a = CaptionConfig(**{**extra, **base, field: 0.9 if field == "top_p" else 1.2})
    b = CaptionConfig(**{**extra, field: 0.9000001 if field == "top_p" else 1.2000001})
    assert decoding_tag(a) != decoding_tag(b)


# ---- 12: temporaries of killed cache writes are cleaned up ------------------------------


def test_stale_cache_temporaries_are_removed_on_open(tmp_path):
    folder = tmp_path / "cc"
    folder.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a writer on this host that was killed
    here = cache_mod._part_name("1", str(gone.pid))
    dead = folder / f".{here}.tmp-{gone.pid}-deadbeef"
    live = folder / f".{here}.tmp-{os.getppid()}-0badcafe"  # a live process on this host
    elsewhere = folder / ".part-2-3-abcd@othernode.parquet.tmp-3-12345678"
    old = folder / ".part-4-5-abcd@othernode.parquet.tmp-5-87654321"
    legacy = folder / ".part-6-7-abcd.parquet.tmp-7-11111111"  # named before hosts were
    for p in (dead, live, elsewhere, old, legacy):
        p.write_bytes(b"PAR1 half written")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    os.utime(legacy, (two_hours_ago, two_hours_ago))
    CaptionCache(folder, "m").load()
    assert sorted(p.name for p in folder.iterdir()) == sorted([live.name, elsewhere.name])


# ---- 13: an incomplete model folder says what is missing and how to fetch it -------------


def test_incomplete_model_folder_names_what_is_missing(tiny_dir, tmp_path):
    d = shutil.copytree(tiny_dir, tmp_path / "no-tokenizer")
    for f in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        (d / f).unlink()
    with pytest.raises(WeightsNotFoundError) as err:
        resolve_weights(CaptionConfig(model=str(d)))
    msg = str(err.value)
    assert str(d) in msg and "tokenizer" in msg and "processor_config.json" in msg
    assert f"hf download Salesforce/blip2-opt-2.7b --local-dir {d}" in msg
    half = shutil.copytree(tiny_dir, tmp_path / "half-shards")
    (half / "model.safetensors").rename(half / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (half / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsNotFoundError, match=r"model-00002-of-00002\.safetensors"):
        resolve_weights(CaptionConfig(model=str(half)))


# ---- 14: model = "" is off ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_model_means_off(value):
    cfg = CaptionConfig(model=value)
    assert cfg.model is None
    stage = CaptionStage(cfg)
    assert stage.skipped
    batch = samples(2)
    assert stage.process(batch) == batch and all(s.caption is None for s in batch)


# ---- 15: max_new_tokens against the model's positions ------------------------------------


def test_max_new_tokens_beyond_the_models_positions_is_refused(captioner):
    limit = int(captioner.model.config.text_config.max_position_embeddings)
    room = limit - len(captioner.prompt_ids)
    with pytest.raises(ValueError, match=f"max_new_tokens must be <= {room}"):
        Blip2Captioner(
            captioner.model,
            captioner.processor,
            CaptionConfig(max_new_tokens=room + 1),
            "t",
            "r",
        )
    for fast in (True, False):  # exactly at the limit both decode paths run
        cfg = CaptionConfig(
            max_new_tokens=room, min_new_tokens=room, fast_decode=fast, batch_size=2
        )
        cap = Blip2Captioner(captioner.model, captioner.processor, cfg, "t", "r")
        try:
            assert (cap.fast is not None) == fast
            assert cap.caption([jpeg(1)])[0]
        finally:
            cap.close()


# ---- 16: generation fields neither path applies do not cost the fast path ---------------


def test_checkpoint_generation_fields_keep_the_fast_path(captioner):
    """The top-level generation config (generation_config.json) is applied by neither
    decode path (HF's BLIP-2 `generate` ignores it too): its fields keep the fast path."""
    gen = captioner.model.generation_config
    gen.no_repeat_ngram_size = 1
    try:
        assert supports(captioner.model)
        cfg = captioner.cfg.model_copy(update={"fast_decode": False})
        hf = Blip2Captioner(captioner.model, captioner.processor, cfg, "t", "r")
        fast = Blip2Captioner(captioner.model, captioner.processor, captioner.cfg, "t", "r")
        try:
            assert fast.fast is not None and hf.fast is None
            images = [jpeg(i) for i in range(4)]
            assert fast.caption(images) == hf.caption(images)
        finally:
            hf.close()
            fast.close()
    finally:
        gen.no_repeat_ngram_size = None
