"""Read throughput of release shards: webdataset loaders vs raw tar reading, and decode+augment.

Builds a release of synthetic photo-like JPEGs (short side 256, about 1.7 bits
per pixel like real 256-px web JPEGs) with the real release writer, or reads
`--release DIR`; warms the page cache, then measures (best of --repeat):

- raw:   Python's `tarfile` walking the same shards, reading every member (the anchor)
- stock: `webdataset.WebDataset(shards)` yielding grouped samples (no decode)
- ours:  the same webdataset pipeline with `ccurate.shards.read.tar_samples` as
         its tar expander (headers parsed from an mmap instead of `tarfile`)
- trainer: the trainer's reader (`ccurate.train.stream.iter_tar`: headers parsed
         from an mmap, member bytes read by offset), every member read
- decode_aug: what a trainer's loader does per sample: JPEG decode, random
  resized crop to 256 (scale 0.08-1, ratio 3/4-4/3), horizontal flip, uint8
  pixels (`--float` adds the /255 float conversion); batches are one NHWC
  copy viewed as NCHW (channels-last), as `ccurate.train.decode.Decoder` does.
  Per core for each decoder found (OpenCV, torchvision.io, PIL, simplejpeg if
  installed, and `trainer`: the trainer's own covering resize + centre crop),
  measured in CPU seconds so that other load on a shared machine does not
  count; then the trainer's own loader (`ShardDataset` + `TrainLoader`: the
  trainer's decode, random flip, batches filled by `--workers` processes in a ring
  of reused shared-memory buffers and copied out in the trainer's process), wall
  clock and CPU time of all its processes. The same loader then reads precomputed
  latent shards (`--latent-samples`, written by `ccurate.train.synthetic`: SD2-base
  shapes at 256 px, 8x32x32 posterior moments and a 77x1024 text embedding, float16),
  the input of training from latents.
  Both loaders run interleaved against a variant whose workers put every batch in a
  new shared-memory segment (the design before the ring). With a GPU (`--device-decode`,
  default: cuda when there is one) the pixel loader runs once more with its JPEGs decoded
  there by the loader's process (`[train] jpeg_decode = "device"`: nvJPEG); `--cores 2`
  pins the bench and its workers to 2 cores of a larger GPU host.

Ends with `RESULT shard_read ours_samples_s=… raw_samples_s=… ratio=… decode_aug_samples_s=…
decode_aug_steady_samples_s=… loader_ring_vs_fresh=… [device_decode_samples_s=… …] cores=…
latent_samples_s=… latent_ring_vs_fresh=…`
(the loaders with their reused batch buffers vs a new shared-memory segment per batch,
interleaved in the same run; `steady`: the rate after the first batches, what a long
training run sees once its workers are up).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import random
import resource
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from ccurate.shards.config import ShardsConfig
from ccurate.shards.read import release_shards, tar_samples
from ccurate.shards.release import write_release
from ccurate.shards.synth import make_inputs
from ccurate.train.decode import Decoder, decode_resize_crop
from ccurate.train.device_decode import DeviceJpegDecoder
from ccurate.train.loader import ShardDataset, TrainLoader
from ccurate.train.stream import MemberReader, StreamSpec, count_samples, iter_tar
from ccurate.train.synthetic import write_latent_release

SIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
FLOAT = False

Aug = Callable[[bytes, random.Random], torch.Tensor]
FINISH_S = [0.0, 0]  # wall seconds the loader's process spent finishing batches, batches


def build_release(root: Path, n: int, per_shard: int) -> Path:
    shards = max(1, n // per_shard)
    kept, dropped = make_inputs(
        root / "in",
        n_shards=shards,
        per_shard=per_shard,
        size=(320, SIZE),
        dropped_per_shard=0,
        noise=6.0,
    )
    cfg = ShardsConfig(samples_per_shard=per_shard)
    return write_release(kept, dropped, root / "out", cfg, name="bench", run_info={"date": "-"})


def best_rate(fn: Callable[[], int], repeat: int, clock: Callable[[], float]) -> tuple[float, int]:
    best = 0.0
    count = 0
    for _ in range(repeat):
        t0 = clock()
        count = fn()
        best = max(best, count / max(clock() - t0, 1e-9))
    return best, count


# ---- plain reading -------------------------------------------------------------
def raw_read(urls: list[str]) -> int:
    """Anchor: every member's bytes via tarfile; samples counted by their json member."""
    n = 0
    for u in urls:
        with tarfile.open(u, "r:") as tf:
            for m in tf:
                fh = tf.extractfile(m)
                if fh is not None:
                    fh.read()
                    if m.name.endswith(".json"):
                        n += 1
    return n


def stock_read(urls: list[str]) -> int:
    return sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def ours_pipeline(urls: list[str], *stages: Any) -> wds.DataPipeline:
    return wds.DataPipeline(wds.SimpleShardList(urls), wds.split_by_worker, tar_samples, *stages)


def ours_read(urls: list[str]) -> int:
    return sum(1 for _ in ours_pipeline(urls))


def trainer_read(urls: list[str]) -> int:
    """The trainer's own reader (`ccurate.train.stream.iter_tar` + `MemberReader`), every member."""
    reader = MemberReader()
    n = 0
    for url in urls:
        for raw in iter_tar(url):
            for m in raw.members.values():
                reader.read(m)
            n += 1
    reader.close()
    return n


# ---- decode + augment ------------------------------------------------------------
def crop_params(h: int, w: int, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, without a tensor (same distribution)."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        ar = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        cw = round(math.sqrt(target * ar))
        ch = round(math.sqrt(target / ar))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    s = min(h, w)
    return (h - s) // 2, (w - s) // 2, s, s


def _finish_hwc(arr: np.ndarray, rng: random.Random) -> torch.Tensor:
    """Crop+resize (OpenCV), flip: HWC uint8 tensor (batches are stacked NHWC, viewed NCHW)."""
    i, j, h, w = crop_params(arr.shape[0], arr.shape[1], rng)
    interp = cv2.INTER_AREA if h > SIZE and w > SIZE else cv2.INTER_LINEAR
    out = cv2.resize(arr[i : i + h, j : j + w], (SIZE, SIZE), interpolation=interp)
    if rng.random() < 0.5:
        out = cv2.flip(out, 1)
    t = torch.from_numpy(out)
    return t.float().div_(255) if FLOAT else t


def aug_trainer(data: bytes, rng: random.Random) -> torch.Tensor:
    """The trainer's own transform (`ccurate.train.decode.decode_resize_crop`: covering resize +
    centre crop, the SD2 recipe; libjpeg-turbo's fast IDCT as `[train] fast_jpeg`), HWC uint8."""
    t = torch.from_numpy(decode_resize_crop(data, SIZE, SIZE, fast=True))
    return t.float().div_(255) if FLOAT else t


def aug_opencv(data: bytes, rng: random.Random) -> torch.Tensor:
    """cv2.imdecode (OpenCV's bundled libjpeg-turbo), crop + resize + flip in OpenCV."""
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if arr is None:
        raise ValueError("not a decodable image")
    return _finish_hwc(arr, rng)


def aug_torchvision(data: bytes, rng: random.Random) -> torch.Tensor:
    img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    i, j, h, w = crop_params(img.shape[1], img.shape[2], rng)
    out = F.resized_crop(img, i, j, h, w, [SIZE, SIZE], antialias=True)
    if rng.random() < 0.5:
        out = out.flip(-1)
    out = out.permute(1, 2, 0)
    return out.float().div_(255) if FLOAT else out


def aug_pil(data: bytes, rng: random.Random) -> torch.Tensor:
    """PIL, with draft mode (libjpeg scales by 1/2..1/8 when the crop is that much larger)."""
    im = Image.open(io.BytesIO(data))
    w0, h0 = im.size
    i, j, h, w = crop_params(h0, w0, rng)
    factor = min(h, w) // SIZE
    if factor >= 2:
        im.draft("RGB", (w0 // factor, h0 // factor))
        fx, fy = im.size[0] / w0, im.size[1] / h0
        i, j, h, w = int(i * fy), int(j * fx), max(1, int(h * fy)), max(1, int(w * fx))
    box = (j, i, j + w, i + h)
    out = im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR, box=box)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.frombuffer(bytearray(out.tobytes()), dtype=torch.uint8).view(SIZE, SIZE, 3)
    return t.float().div_(255) if FLOAT else t


AUGS: dict[str, Aug] = {
    "opencv": aug_opencv,
    "torchvision": aug_torchvision,
    "pil": aug_pil,
    "trainer": aug_trainer,
}
try:  # optional: not a project dependency (fast IDCT + fast upsampling)
    import simplejpeg

    def aug_simplejpeg(data: bytes, rng: random.Random) -> torch.Tensor:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=True, fastupsample=True)
        return _finish_hwc(arr, rng)

    AUGS["simplejpeg"] = aug_simplejpeg
except ImportError:
    pass


def decode_one_core(urls: list[str], aug: Aug) -> int:
    rng = random.Random(0)
    n = 0
    for s in ours_pipeline(urls):
        aug(s["jpg"], rng)
        n += 1
    return n


def _decode_run(urls: list[str], aug: Aug) -> Callable[[], int]:
    return lambda: decode_one_core(urls, aug)


WARM_BATCHES = 8  # batches left out of the steady-state rate: worker start-up and first fills


def decode_loader(
    urls: list[str],
    workers: int,
    batch: int,
    epochs: int,
    fresh: bool = False,
    mode: str = "image",
    device: str | None = None,
) -> tuple[int, float, float, float]:
    """`epochs` passes of the trainer's own loader (`ShardDataset` + `TrainLoader`; random
    flip on for images): samples, wall seconds, the CPU seconds of all its processes, and
    the steady-state samples/s (wall clock after the first `WARM_BATCHES` batches: what a
    long training run sees once its workers are up; a 3-epoch run here lasts ~2 s, of which
    starting the workers takes a few tenths).
    `fresh`: the workers put every batch in a new shared-memory segment instead of their
    `BatchRing` (the design before it). `device`: JPEGs decoded there by the loader's
    process (`[train] jpeg_decode = "device"`), the workers only read and copy bytes."""
    spec = StreamSpec(tuple(urls), seed=0, shuffle_shards=True, shuffle_buffer=256)
    finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    if device:
        dev = DeviceJpegDecoder(device)

        def finish(batch: dict[str, Any]) -> dict[str, Any]:
            t = time.perf_counter()
            out = dev(batch)
            FINISH_S[0] += time.perf_counter() - t
            FINISH_S[1] += 1
            return out

    if mode == "image":
        decoder = Decoder(
            "image",
            SIZE,
            SIZE,
            "alt_text",
            random_flip=True,
            fast_jpeg=True,
            defer_jpeg=bool(device),
        )
    else:
        decoder = Decoder("latent", SIZE, SIZE, "synthetic")
    n_total = sum(count_samples(u) for u in urls)
    steps = epochs * n_total // batch
    ds = ShardDataset(spec, decoder, batch, num_workers=workers)
    # as the trainer makes it: batches handed out in their ring buffers (copy_out=False)
    loader = TrainLoader(
        ds, steps, prefetch_factor=4, reuse_buffers=not fresh, copy_out=False, finish=finish
    )
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = time.process_time()
    t0 = time.perf_counter()
    key = "pixels" if mode == "image" else "latents"
    n = n_warm = 0
    t_warm = t0
    for i, b in enumerate(loader.epoch()):
        n += b[key].shape[0]
        if i + 1 == WARM_BATCHES:
            n_warm, t_warm = n, time.perf_counter()
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    loader.close()
    del loader
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    steady = (n - n_warm) / max(wall - (t_warm - t0), 1e-9) if n > n_warm else 0.0
    return n, wall, cpu + time.process_time() - me, steady


def loader_ab(
    urls: list[str], args: argparse.Namespace, mode: str, label: str
) -> dict[bool, tuple[float, float, float]]:
    """Ring vs fresh segments, interleaved so that drift of a shared host's speed hits both
    alike: {fresh: (samples/s wall, samples/s on the workers' cores by CPU time, steady-state
    samples/s)}, each of the run with the best wall time."""
    rates: dict[bool, list[tuple[int, float, float, float]]] = {False: [], True: []}
    for _ in range(max(1, args.repeat - 1)):
        for fresh in (False, True):
            rates[fresh].append(
                decode_loader(urls, args.workers, 64, args.loader_epochs, fresh, mode)
            )
    out: dict[bool, tuple[float, float, float]] = {}
    for fresh, runs in rates.items():
        m, wall_s, cpu, steady = min(runs, key=lambda r: r[1])
        out[fresh] = (m / wall_s, m / cpu * args.workers if cpu else 0.0, steady)
        what = "a new shared segment per batch" if fresh else "reused batch buffers"
        print(
            f"{label:21s}: {out[fresh][0]:9.0f} samples/s wall, {out[fresh][1]:.0f} samples/s "
            f"on {args.workers} free cores (CPU time of all processes), {steady:.0f} samples/s "
            f"steady state (after {WARM_BATCHES} batches) [trainer's TrainLoader, "
            f"{args.workers} workers, batch 64, {args.loader_epochs} epochs; {what}]"
        )
    return out


def loader_on_device(
    urls: list[str], args: argparse.Namespace, device: str
) -> tuple[float, float, float]:
    """The trainer's loader with JPEGs decoded on `device` by its process: (samples/s wall,
    samples/s on the workers' cores by CPU time, steady-state samples/s), the best run."""
    decode_loader(urls[:1], args.workers, 64, 1, device=device)  # device decoder start-up
    FINISH_S[:] = [0.0, 0]
    runs = [
        decode_loader(urls, args.workers, 64, args.loader_epochs, device=device)
        for _ in range(max(1, args.repeat - 1))
    ]
    print(
        f"device decode        : {FINISH_S[0] / max(FINISH_S[1], 1) * 1e3:.2f} ms per batch of 64 "
        "in the loader's process (batched decode to its end, crop, flip, stand-ins)"
    )
    m, wall_s, cpu, steady = min(runs, key=lambda r: r[1])
    out = (m / wall_s, m / cpu * args.workers if cpu else 0.0, steady)
    print(
        f"{'decode on ' + device:21s}: {out[0]:9.0f} samples/s wall, {out[1]:.0f} samples/s "
        f"on {args.workers} free cores (CPU time of all processes), {steady:.0f} samples/s "
        f"steady state [trainer's TrainLoader, {args.workers} workers, batch 64, JPEGs decoded "
        f"on {device} by the loader's process (jpeg_decode = 'device')]"
    )
    return out


def main(argv: list[str] | None = None) -> None:
    global FLOAT
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--per-shard", type=int, default=500)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--loader-epochs", type=int, default=3, help="passes per loader run")
    ap.add_argument(
        "--latent-samples", type=int, default=4000, help="precomputed-latent samples (0: skip)"
    )
    ap.add_argument("--float", action="store_true", help="convert to float tensors in [0, 1]")
    ap.add_argument("--release", type=Path, help="read this release instead of building one")
    ap.add_argument(
        "--device-decode",
        default="auto",
        help="also run the loader with JPEGs decoded on this device (jpeg_decode = 'device'): "
        "cuda, cpu, off; auto = cuda when there is one",
    )
    ap.add_argument(
        "--cores",
        type=int,
        default=0,
        help="pin the bench and its workers to this many CPU cores (0: as started); a GPU "
        "host has many, the goal is for 2",
    )
    args = ap.parse_args(argv)
    if args.cores:
        allowed = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, allowed[: args.cores])
        print(f"pinned to CPU cores {allowed[: args.cores]}")
    device = args.device_decode
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "off"
    FLOAT = args.float
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    tmp = tempfile.mkdtemp(prefix="shard_read-")  # scratch: the built release, latent shards
    if args.release:
        release = args.release
    else:
        t0 = time.perf_counter()
        release = build_release(Path(tmp), args.samples, args.per_shard)
        print(f"built release {release} in {time.perf_counter() - t0:.1f} s")
    try:
        urls = [str(p) for p in release_shards(release)]
        total = sum(os.path.getsize(u) for u in urls)
        raw_read(urls)  # warm the page cache: every reader then reads from memory
        wall = time.perf_counter
        raw, n = best_rate(lambda: raw_read(urls), args.repeat, wall)
        stock, n2 = best_rate(lambda: stock_read(urls), args.repeat, wall)
        ours, n3 = best_rate(lambda: ours_read(urls), args.repeat, wall)
        trainer, n4 = best_rate(lambda: trainer_read(urls), args.repeat, wall)
        assert n == n2 == n3 == n4, (n, n2, n3, n4)
        print(f"{n} samples in {len(urls)} shards, {total / n / 1024:.1f} KiB/sample on disk")
        print(f"raw tarfile read     : {raw:9.0f} samples/s")
        print(f"webdataset (stock)   : {stock:9.0f} samples/s  ratio {stock / raw:.2f}")
        print(f"webdataset + ours    : {ours:9.0f} samples/s  ratio {ours / raw:.2f}")
        print(f"trainer reader       : {trainer:9.0f} samples/s  ratio {trainer / raw:.2f}")

        per_core: dict[str, float] = {}
        for name, fn in AUGS.items():
            rate, _ = best_rate(_decode_run(urls, fn), max(1, args.repeat - 1), time.process_time)
            per_core[name] = rate
            print(f"decode+aug, 1 core   : {rate:9.0f} samples/s per CPU-second  [{name}]")
        best = max(per_core, key=lambda k: per_core[k])
        loader = loader_ab(urls, args, "image", "decode+aug, loader")
        loader_wall, loader_cpu, loader_steady = loader[False]
        dev: tuple[float, float, float] | None = None
        if device != "off":
            dev = loader_on_device(urls, args, device)
        lat: dict[bool, tuple[float, float, float]] = {}
        if args.latent_samples:
            lat_urls = write_latent_release(  # SD2-base shapes at 256 px
                Path(tmp) / "latents",
                args.latent_samples,
                max(1, args.latent_samples // args.per_shard),
                (32, 32),
                77,
                1024,
                "sd2-base",
                SIZE,
            )
            raw_read(lat_urls)  # into the page cache
            lat = loader_ab(lat_urls, args, "latent", "latent loader")
        print(f"load average         : {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
        print(
            f"RESULT shard_read ours_samples_s={ours:.0f} raw_samples_s={raw:.0f} "
            f"ratio={ours / raw:.3f} stock_wds_samples_s={stock:.0f} "
            f"stock_ratio={stock / raw:.3f} trainer_samples_s={trainer:.0f} "
            f"trainer_ratio={trainer / raw:.3f} decode_aug_samples_s={loader_wall:.0f} "
            f"decode_aug_cpu_samples_s={loader_cpu:.0f} "
            f"decode_aug_steady_samples_s={loader_steady:.0f} "
            f"decode_aug_1core_samples_s={per_core[best]:.0f} best_1core_decoder={best} "
            f"workers={args.workers} loader_fresh_segments_samples_s={loader[True][0]:.0f} "
            f"loader_ring_vs_fresh={loader_wall / max(loader[True][0], 1e-9):.3f}"
            + (
                f" device_decode_samples_s={dev[0]:.0f} device_decode_cpu_samples_s={dev[1]:.0f} "
                f"device_decode_steady_samples_s={dev[2]:.0f} decode_device={device}"
                if dev
                else ""
            )
            + (f" cores={len(os.sched_getaffinity(0))}")
            + (
                f" latent_samples_s={lat[False][0]:.0f} latent_fresh_segments_samples_s="
                f"{lat[True][0]:.0f} latent_ring_vs_fresh={lat[False][0] / lat[True][0]:.3f}"
                if lat
                else ""
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
