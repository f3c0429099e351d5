"""JPEGs decoded on the training device (`[train] jpeg_decode = "device"`), on the CPU here:
the same batches as the workers' decode, the same bad-sample and skip accounting."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from PIL import Image

import ccurate.train.decode as decode_mod
from ccurate.train.config import TrainConfig
from ccurate.train.decode import Decoder
from ccurate.train.device_decode import (
    DeviceJpegDecoder,
    cover_crop_chw,
    defer_to_device,
    device_jpeg_size,
)
from ccurate.train.loader import ShardDataset, TrainLoader
from ccurate.train.loop import train
from ccurate.train.models import ByteTokenizer
from ccurate.train.stream import MemberReader, StreamSpec, count_samples, find_shards, iter_tar
from ccurate.train.synthetic import write_image_release

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo(w: int = 40, h: int = 30, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * 1000 + h)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def _jpeg(img: Image.Image, **params: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **params)
    return buf.getvalue()


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_device_jpeg_size_takes_sequential_jpegs_and_refuses_the_rest():
    assert device_jpeg_size(_jpeg(_photo())) == (30, 40)
    assert device_jpeg_size(memoryview(_jpeg(_photo()))) == (30, 40)  # loader members
    assert device_jpeg_size(_jpeg(_photo(mode="L"))) == (30, 40)
    assert device_jpeg_size(_jpeg(_photo(), exif=_exif(1))) == (30, 40)
    assert device_jpeg_size(_jpeg(_photo(), exif=_exif(6))) is None  # rotated: workers apply it
    assert device_jpeg_size(_jpeg(_photo(), progressive=True)) is None
    assert device_jpeg_size(_jpeg(_photo(mode="CMYK"))) is None
    png = io.BytesIO()
    _photo().save(png, "PNG")
    assert device_jpeg_size(png.getvalue()) is None
    data = _jpeg(_photo())
    sos = data.index(b"\xff\xda")
    assert device_jpeg_size(data[:sos]) is None  # header cut before the scan
    assert device_jpeg_size(b"not an image") is None


def test_cover_crop_on_the_device_keeps_the_workers_geometry():
    img = torch.arange(3 * 30 * 40, dtype=torch.int64).remainder(251).to(torch.uint8)
    img = img.view(3, 30, 40)
    out = cover_crop_chw(img, 30, 30)  # crop only: exact pixels of the centre
    assert torch.equal(out, img[:, :, 5:35])
    assert cover_crop_chw(img, 15, 15).shape == (3, 15, 15)  # shrink, then crop
    assert cover_crop_chw(img, 60, 45).shape == (3, 60, 45)  # enlarge, then crop


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 99.0 if mse == 0 else 10 * np.log10(255**2 / mse)


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    root = tmp_path_factory.mktemp("rel")
    write_image_release(root, [18], resolution=32, bad_keys=["00000004"])
    return list(iter_tar(find_shards(root)[0]))


@pytest.mark.parametrize("size", [32, 24, 48])
def test_deferred_batches_match_the_workers_decode(raws, size):
    """Same keys, captions, token ids, flips and bad rows; pixels equal where nothing is
    resized (both are libjpeg-turbo on a CPU), within 40 dB where they are."""
    reader = MemberReader()
    tok = ByteTokenizer(16)
    a = Decoder("image", size, size, seed=3, tokenizer=tok, random_flip=True)
    b_dec = Decoder("image", size, size, seed=3, tokenizer=tok, random_flip=True, defer_jpeg=True)
    a = a.decode(raws[:9], 0, reader)
    deferred = b_dec.decode(raws[:9], 0, reader)
    d = deferred["deferred"]
    # JPEG rows are left to the device, PNG rows and the broken image to the workers
    assert d["jpeg_rows"] == [0, 2, 6, 8] and d["bad_rows"] == [4]
    assert deferred["pixels"].shape == (5, 3, size, size)
    dev = DeviceJpegDecoder("cpu")
    b = dev(deferred)
    reader.close()
    assert "deferred" not in b and "jpeg" not in b
    assert b["keys"] == a["keys"] and b["bad"] == a["bad"] == ["00000004"]
    assert b["captions"] == a["captions"] and b["empty"] == a["empty"]
    assert torch.equal(b["input_ids"], a["input_ids"])
    assert b["pixels"].shape == a["pixels"].shape == (9, 3, size, size)
    assert dev.decoded == 4 and dev.cpu_fallback == 0
    for i in range(9):
        src = 0 if i == 4 else i  # the stand-in row holds row 0's pixels
        if size == 32 or src not in d["jpeg_rows"]:
            assert torch.equal(b["pixels"][i], a["pixels"][i]), i
        else:
            assert _psnr(b["pixels"][i], a["pixels"][i]) > 40, i
    # the broken row trains as a stand-in: the first good row, pixels and caption
    assert torch.equal(b["pixels"][4], b["pixels"][0])
    assert b["captions"][4] == b["captions"][0]


def test_a_jpeg_the_device_refuses_is_decoded_like_the_workers_do(raws, monkeypatch):
    reader = MemberReader()
    refused = bytes(reader.read(raws[2].members["jpg"]))
    real = torchvision.io.decode_jpeg

    def picky(data, *args, **kwargs):
        items = data if isinstance(data, list) else [data]
        if any(bytes(t.numpy().tobytes()) == refused for t in items):
            raise RuntimeError("Error while decoding JPEG images: unsupported")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", picky)
    a = Decoder("image", 32, 32).decode(raws[:4], 0, reader)
    dev = DeviceJpegDecoder("cpu")
    b = dev(Decoder("image", 32, 32, defer_jpeg=True).decode(raws[:4], 0, reader))
    reader.close()
    assert dev.cpu_fallback == 1 and dev.decoded == 1
    assert torch.equal(a["pixels"], b["pixels"]) and b["bad"] == []


def _undecodable(monkeypatch, broken: set[bytes]) -> None:
    """JPEGs in `broken` fail on the device and on the CPU fallback alike."""
    real_dev, real_cpu = torchvision.io.decode_jpeg, decode_mod.decode_resize_crop

    def dev(data, *args, **kwargs):
        items = data if isinstance(data, list) else [data]
        if any(t.numpy().tobytes() in broken for t in items):
            raise RuntimeError("Error while decoding JPEG images")
        return real_dev(data, *args, **kwargs)

    def cpu(data, *args, **kwargs):
        if bytes(data) in broken:
            raise ValueError("corrupt JPEG data")
        return real_cpu(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", dev)
    monkeypatch.setattr(decode_mod, "decode_resize_crop", cpu)


def test_a_jpeg_no_decoder_takes_is_a_counted_stand_in(raws, monkeypatch):
    reader = MemberReader()
    _undecodable(monkeypatch, {reader.read(raws[2].members["jpg"])})
    dec = Decoder("image", 32, 32, tokenizer=ByteTokenizer(16), defer_jpeg=True)
    b = DeviceJpegDecoder("cpu")(dec.decode(raws[:4], 0, reader))
    reader.close()
    assert b["bad"] == [raws[2].key]
    assert torch.equal(b["pixels"][2], b["pixels"][0])
    assert b["captions"][2] == b["captions"][0]
    assert torch.equal(b["input_ids"][2], b["input_ids"][0])


def _loader(shards, workers, finish=None, batch=2):
    spec = StreamSpec(tuple(shards), seed=5, shuffle_shards=True, shuffle_buffer=8)
    dec = Decoder("image", 32, 32, "synthetic", 0.5, 5, ByteTokenizer(16), random_flip=True)
    dec.defer_jpeg = finish is not None
    ds = ShardDataset(spec, dec, batch, 0, 1, workers, None, 1)
    total = sum(count_samples(s) for s in shards)
    return TrainLoader(ds, max(1, total // batch), copy_out=False, finish=finish)


def _epoch(loader) -> list[dict]:
    out = []
    for b in loader.epoch():
        out.append(
            {
                "keys": b["keys"],
                "captions": b["captions"],
                "pixels": b["pixels"].clone(),
                "bad": b["bad"],
                "skipped": b["skipped"],
            }
        )
    loader.close()
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_hands_out_the_same_batches_either_way(tmp_path, workers):
    root = tmp_path / "rel"
    write_image_release(root, [7, 6], resolution=32, bad_keys=["00000004", "00100003"])
    shards = find_shards(root)
    plain = _epoch(_loader(shards, workers))
    on_device = _epoch(_loader(shards, workers, DeviceJpegDecoder("cpu")))
    assert [b["keys"] for b in plain] == [b["keys"] for b in on_device]
    for a, b in zip(plain, on_device, strict=True):
        assert a["captions"] == b["captions"] and a["bad"] == b["bad"]
        assert a["skipped"] == b["skipped"]
        assert torch.equal(a["pixels"], b["pixels"])
    assert sum(len(b["bad"]) for b in plain) + sum(len(b["skipped"]) for b in plain) >= 1


def test_a_batch_without_one_decodable_image_is_skipped_and_counted(tmp_path, monkeypatch):
    root = tmp_path / "rel"
    write_image_release(root, [6], resolution=32)
    shards = find_shards(root)
    raws = list(iter_tar(shards[0]))
    reader = MemberReader()
    jpegs = {reader.read(r.members["jpg"]) for r in raws if "jpg" in r.members}
    reader.close()
    _undecodable(monkeypatch, jpegs)
    loader = _loader(shards, 0, DeviceJpegDecoder("cpu"), batch=1)
    got = []
    for _ in range(6):  # two data epochs' PNG rows: every JPEG-only batch is skipped
        b = next(loader)
        loader.mark(b)
        got.append(b)
    loader.close()
    png = {r.key for r in raws if "png" in r.members}
    assert all(k in png and not b["bad"] for b in got for k in b["keys"])
    skipped = [k for b in got for k in b["skipped"]]
    assert set(skipped) == {r.key for r in raws if "jpg" in r.members}  # epoch 1's at least
    assert loader.stats["skipped_batches"] == loader.stats["skipped_samples"] == len(skipped)


def test_training_with_device_decode_repeats_the_workers_run(tmp_path):
    """Pixels decoded on the (CPU) device equal the workers' at the release's size, so the
    loss curve and the data are the same."""
    root = tmp_path / "rel"
    write_image_release(root, [5, 4], resolution=16)
    base = dict(
        resolution=16, num_workers=2, shuffle_buffer=8, log_every=1, sample_prompts=[],
        batch_size=2, log_keys=True, random_flip=True, ema=False, device="cpu",
        fast_jpeg=False,
    )  # fmt: skip
    sa = train(TrainConfig(**base, steps=3), root, tmp_path / "a")
    sb = train(TrainConfig(**base, steps=3, jpeg_decode="device"), root, tmp_path / "b")
    assert sa["steps"] == sb["steps"] == 3
    assert (sa["jpeg_decode"], sb["jpeg_decode"]) == ("workers", "device")

    def log(out: Path, name: str) -> list[dict]:
        return [json.loads(x) for x in (out / name).read_text().splitlines()]

    assert log(tmp_path / "a", "keys-rank0.jsonl") == log(tmp_path / "b", "keys-rank0.jsonl")
    la = [e["loss"] for e in log(tmp_path / "a", "train_log.jsonl") if "loss" in e]
    lb = [e["loss"] for e in log(tmp_path / "b", "train_log.jsonl") if "loss" in e]
    assert len(la) == 3 and lb == pytest.approx(la, rel=1e-6)


def test_jpeg_decode_is_a_validated_setting():
    assert TrainConfig().jpeg_decode == "auto"  # the device on CUDA, else the workers
    with pytest.raises(ValueError, match="jpeg_decode"):
        TrainConfig(jpeg_decode="gpu")  # type: ignore[arg-type]


def test_a_device_that_cannot_decode_says_why_before_training(tmp_path, monkeypatch):
    from ccurate.train.device_decode import device_decode_error

    assert device_decode_error("cpu") is None  # the test image decodes here

    def unsupported(*args, **kwargs):
        raise RuntimeError("decode_jpegs_cuda: torchvision not compiled with nvJPEG support")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", unsupported)
    assert "nvJPEG" in (device_decode_error("cpu") or "")


def test_only_jpegs_near_the_training_size_are_left_to_the_device():
    assert defer_to_device((256, 320), 256, 256)  # a release JPEG: crop only
    assert defer_to_device((200, 300), 256, 256)  # enlarged: no DCT scaling helps either
    assert not defer_to_device((768, 1024), 256, 256)  # the workers decode it at 1/2 scale
    assert not defer_to_device((256, 100_000), 256, 256)  # a huge strip: its area
    assert not defer_to_device(None, 256, 256)
    raws = _raws_of([("big", _jpeg(_photo(160, 120))), ("fit", _jpeg(_photo(40, 30)))])
    reader = MemberReader()
    batch = Decoder("image", 30, 30, defer_jpeg=True).decode(raws, 0, reader)
    reader.close()
    assert batch["deferred"]["jpeg_rows"] == [1] and batch["deferred"]["pixel_rows"] == [0]


def _raws_of(items: list[tuple[str, bytes]]) -> list:
    import tempfile

    from ccurate.tario import TarWriter

    path = Path(tempfile.mkdtemp()) / "s.tar"
    with TarWriter(path) as tf:
        for key, data in items:
            tf.add(f"{key}.jpg", data)
            tf.add(f"{key}.json", json.dumps({"key": key, "caption": key}).encode())
    return list(iter_tar(str(path)))


def _cut_scan_release(root: Path) -> None:
    """24 JPEG samples in two shards; samples 4 and 5 (one batch of 2) have their scan cut,
    which passes the header check and decodes nowhere."""
    from ccurate.tario import TarWriter

    root.mkdir(parents=True)
    for s in range(2):
        with TarWriter(root / f"s-{s:05d}.tar") as tf:
            for i in range(12 * s, 12 * s + 12):
                data = _jpeg(_photo(16 + i % 3, 16))
                if i in (4, 5):
                    sos = data.index(b"\xff\xda")
                    data = data[: sos + 8]
                tf.add(f"{i:04d}.jpg", data)
                tf.add(f"{i:04d}.json", json.dumps({"key": f"{i:04d}", "caption": "c"}).encode())


def test_a_batch_skipped_after_its_device_decode_resumes_exactly(tmp_path):
    """A batch `finish` skips took its worker's round-robin turn: the checkpoint records it
    with the next batch, so a resumed run hands out the uninterrupted run's batches."""
    root = tmp_path / "rel"
    _cut_scan_release(root)
    base = dict(
        resolution=16, num_workers=2, shuffle_shards=False, shuffle_buffer=0, log_every=1,
        sample_prompts=[], batch_size=2, log_keys=True, ema=False, device="cpu",
        jpeg_decode="device",
    )  # fmt: skip
    full = train(TrainConfig(**base, steps=8), root, tmp_path / "a")
    assert full["skipped_samples"] == 2 and full["skipped_batches"] == 1
    for cut in (4, 5, 6):
        out = tmp_path / f"b{cut}"
        train(TrainConfig(**base, steps=cut), root, out)
        train(TrainConfig(**base, steps=8, resume="latest"), root, out)

        def keys(d: Path) -> list[list[str]]:
            lines = (d / "keys-rank0.jsonl").read_text().splitlines()
            return [json.loads(x)["keys"] for x in lines]

        assert keys(out) == keys(tmp_path / "a"), cut
    assert not {"0004", "0005"} & {k for b in keys(tmp_path / "a") for k in b}


def test_exact_resume_refuses_another_jpeg_decode(tmp_path):
    from ccurate.train.checkpoint import CheckpointError

    root = tmp_path / "rel"
    write_image_release(root, [6], resolution=16)
    base = dict(
        resolution=16, num_workers=0, shuffle_buffer=4, sample_prompts=[], batch_size=2,
        ema=False, device="cpu",
    )  # fmt: skip
    train(TrainConfig(**base, steps=2, jpeg_decode="workers"), root, tmp_path / "run")
    with pytest.raises(CheckpointError, match="jpeg_decode='workers' \\(now 'device'\\)"):
        train(
            TrainConfig(**base, steps=4, jpeg_decode="device", resume="latest"),
            root,
            tmp_path / "run",
        )
    s = train(
        TrainConfig(**base, steps=4, jpeg_decode="device", resume="latest", resume_data="restart"),
        root,
        tmp_path / "run",
    )
    assert s["steps"] == 4 and s["jpeg_decode"] == "device" and s["jpeg_device_decoded"] > 0
