"""Dedup benchmark: precision/recall of exact and perceptual hashing, and near-search scale.

Part 1 (quality). Distinct photographic-looking images (procedural landscapes,
still lifes, textures and city scenes, plus the real photo and real raster
data that installed packages ship: matplotlib's grace_hopper.jpg, a DEM, a
bathymetry grid, an MRI slice) get transformed copies: resize, JPEG
recompression (q 30-90), crop (<=10 %), colour jitter, rotation (<=5 deg),
overlaid text, resize+JPEG, plus byte-identical and pixel-identical copies.
For each method we count, over all pairs of the set, the pairs it calls
duplicates: precision = share of those from the same original; recall = share
of (original, copy) pairs found, overall and per transform. The `stage` rows
run the real grouping of `ccurate.filters.dedup` (leader clustering in keep
order) and score its drops. `+dh` methods verify each pHash match with the
dHash (pHash + dHash distance <= verify_sum, `DedupConfig.verify = "dhash"`);
`_tables` is the approximate `search = "tables"`; `stage_default` is `DedupConfig()`.

Part 2 (scale). N random 64-bit hashes with 10 % planted near copies
(1..radius bit flips) go through the plain near search (`near_pairs` +
`leader_groups`) in a fresh subprocess, measuring wall time and peak RSS; the
anchor is faiss `IndexBinaryMultiHash.range_search` (same multi-index idea)
on the same data, or on its first 1M hashes at 10M. Then N random (pHash, dHash)
pairs with 10 % planted p12+dh24 copies go through the default `search = "tables"`,
and N index rows through the whole `DedupStage.prepare`, plain and default.

Usage: python bench/dedup_eval.py [--scale 1M|10M|none] [--distinct 600] [--radius R (plain, 4)]
Ends with: RESULT dedup_eval precision=... recall=... method=default(...) (the default
DedupConfig's stage row) p12dh24_exact_precision=... p12dh24_exact_recall=... plain_radius=...
plain_precision=... plain_recall=... t_1m_s=... rss_1m_mb=... t_tables_1m_s=...
t_plan_tables_1m_s=...
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- images


def _fractal_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 5) -> np.ndarray:
    """Sum of upsampled random grids: cheap 1/f-ish noise in [0, 1]."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        gh, gw = max(2, 2 + (h >> (octaves - o))), max(2, 2 + (w >> (octaves - o)))
        grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
        layer = np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0
        out += amp * layer
        total += amp
        amp *= 0.55
    out /= total
    return (out - out.min()) / max(1e-6, float(out.max() - out.min()))


def _ridge(rng: np.random.Generator, w: int, base: float, rough: float) -> np.ndarray:
    """A 1-D mountain skyline by midpoint displacement."""
    n = 1 << math.ceil(math.log2(w))
    y = np.zeros(n + 1)
    y[0], y[n] = rng.normal(0, rough), rng.normal(0, rough)
    step, scale = n, rough
    while step > 1:
        half = step // 2
        mids = (y[0:n:step] + y[step : n + 1 : step]) / 2 + rng.normal(0, scale, n // step)
        y[half:n:step] = mids
        step, scale = half, scale * 0.55
    return base + y[:w]


def _palette(rng: np.random.Generator) -> np.ndarray:
    hue = rng.random()
    cols = []
    for k in range(5):
        h = (hue + k * rng.uniform(0.05, 0.3)) % 1.0
        s, v = rng.uniform(0.2, 0.9), rng.uniform(0.25, 0.95)
        cols.append(_hsv(h, s, v))
    return np.array(cols, np.float32)


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _landscape(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    pal = _palette(rng)
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    top, horizon = pal[0] * 0.6 + 0.3, pal[1] * 0.4 + 0.55
    img = top * (1 - yy) + horizon * yy + np.zeros((h, w, 3), np.float32)
    clouds = _fractal_noise(rng, h, w, 4)[..., None]
    img = img * (1 - 0.35 * clouds**2) + 0.35 * clouds**2
    if rng.random() < 0.6:  # sun with glow
        cx, cy, r = (
            rng.uniform(0.1, 0.9) * w,
            rng.uniform(0.05, 0.4) * h,
            rng.uniform(0.02, 0.07) * w,
        )
        xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[:, None]
        d = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)[..., None]
        img = img + np.clip(1.3 - d / r, 0, 1) * 0.8 + np.exp(-d / (4 * r)) * 0.25
    layers = rng.integers(2, 5)
    for li in range(layers):
        far = 1 - li / layers
        base = h * (0.35 + 0.5 * li / layers) + rng.normal(0, h * 0.04)
        sky = _ridge(rng, w, base, h * rng.uniform(0.05, 0.25) * far)
        col = pal[2 + li % 3] * (0.35 + 0.4 * (1 - far)) + horizon * 0.5 * far
        tex = _fractal_noise(rng, h, w, 5)[..., None]
        mask = (np.arange(h)[:, None] >= sky[None, :])[..., None]
        img = np.where(mask, col * (0.75 + 0.5 * tex), img)
    return img


def _still_life(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    pal = _palette(rng)
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :]
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    lx, ly = rng.uniform(0, 1), rng.uniform(0, 0.5)
    wall = pal[0] * (0.6 + 0.4 * (1 - np.hypot(xx - lx, yy - ly)))[..., None]
    table_y = rng.uniform(0.55, 0.8)
    table = pal[1] * (0.5 + 0.5 * _fractal_noise(rng, h, w, 6))[..., None]
    img = np.where((yy > table_y)[..., None], table, wall)
    for _ in range(rng.integers(2, 7)):
        cx, r = rng.uniform(0.1, 0.9), rng.uniform(0.04, 0.16)
        cy = table_y - r * rng.uniform(0.5, 1.0)
        col = pal[rng.integers(2, 5)]
        # work in the object's bounding box only
        x0, x1 = max(0, int((cx - r * h / w) * w) - 2), min(w, int((cx + r * h / w) * w) + 3)
        y0, y1 = max(0, int((cy - r) * h) - 2), min(h, int((cy + r) * h) + 3)
        bx, by = xx[:, x0:x1], yy[y0:y1]
        inside = np.hypot((bx - cx) * w / h, by - cy) < r
        shade = np.clip(
            1 - np.hypot((bx - cx + r * 0.4) * w / h, by - cy + r * 0.4) / (1.6 * r), 0.15, 1
        )
        sub = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = np.where(inside[..., None], col * (0.3 + 0.9 * shade)[..., None], sub)
        sy = min(h - 3, int((cy + r) * h))
        sx0, sx1 = (
            max(0, int((cx - r * h / w + 0.03) * w)),
            min(w, int((cx + r * h / w + 0.03) * w)),
        )
        img[sy : sy + 3, sx0:sx1] *= 0.6
    return img


def _texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    pal = _palette(rng)
    n1, n2 = _fractal_noise(rng, h, w, 7), _fractal_noise(rng, h, w, 3)
    t = np.clip(n1 * 0.7 + n2 * 0.5, 0, 1)
    idx = t * (len(pal) - 1)
    lo = np.floor(idx).astype(int)
    hi = np.minimum(lo + 1, len(pal) - 1)
    f = (idx - lo)[..., None]
    return pal[lo] * (1 - f) + pal[hi] * f


def _city(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    pal = _palette(rng)
    base = _landscape(rng, w, h) if rng.random() < 0.5 else _texture(rng, w, h) * 0.6
    im = Image.fromarray((np.clip(base, 0, 1) * 255).astype(np.uint8))
    d = ImageDraw.Draw(im)
    x = int(rng.integers(-20, 10))
    ground = int(h * rng.uniform(0.75, 0.95))
    while x < w:
        bw, bh = int(rng.integers(w // 20, w // 6)), int(rng.integers(h // 6, int(h * 0.7)))
        col = tuple(int(c * 255) for c in pal[rng.integers(0, 5)] * rng.uniform(0.4, 1.0))
        d.rectangle([x, ground - bh, x + bw, ground], fill=col)
        win = tuple(min(255, int(c * 1.6) + 30) for c in col)
        for wy in range(ground - bh + 6, ground - 8, int(rng.integers(8, 16))):
            for wx in range(x + 4, x + bw - 6, int(rng.integers(8, 14))):
                if rng.random() < 0.6:
                    d.rectangle([wx, wy, wx + 4, wy + 5], fill=win)
        x += bw + int(rng.integers(0, 12))
    return im


def _finish(rng: np.random.Generator, img: np.ndarray | Image.Image) -> Image.Image:
    """Camera look: vignetting, a little blur and sensor noise."""
    arr = np.asarray(img, np.float32) / 255.0 if isinstance(img, Image.Image) else img
    h, w = arr.shape[:2]
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    arr = arr * (1 - rng.uniform(0.1, 0.35) * (xx**2 + yy**2)[..., None] / 2)
    arr = arr + rng.standard_normal(arr.shape, np.float32) * rng.uniform(0.005, 0.03)
    im = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))


def synthetic_photo(seed: int) -> Image.Image:
    """One photographic-looking scene; the seed picks kind, palette, layout and size."""
    rng = np.random.default_rng(seed)
    w = int(rng.choice([384, 448, 512, 576]))
    h = int(w * rng.choice([0.66, 0.75, 1.0, 1.33]))
    kind = seed % 4
    if kind == 0:
        return _finish(rng, _landscape(rng, w, h))
    if kind == 1:
        return _finish(rng, _still_life(rng, w, h))
    if kind == 2:
        return _finish(rng, _texture(rng, w, h))
    return _finish(rng, _city(rng, w, h))


def real_images() -> list[tuple[str, Image.Image]]:
    """Real photos and real raster data shipped by installed packages (no downloads)."""
    out: list[tuple[str, Image.Image]] = []
    try:
        import matplotlib

        data = Path(matplotlib.get_data_path()) / "sample_data"
    except ImportError:  # pragma: no cover
        return out
    photo = data / "grace_hopper.jpg"
    if photo.exists():
        im = Image.open(photo).convert("RGB")
        out.append(("grace_hopper", im))
        w, h = im.size
        for i, (x0, y0) in enumerate([(0, 0), (w // 2, 0), (0, h // 2), (w // 2, h // 2)]):
            out.append(
                (f"grace_hopper_q{i}", im.crop((x0, y0, x0 + w // 2, y0 + h // 2)).resize((w, h)))
            )
    rasters: list[tuple[str, np.ndarray]] = []
    if (data / "jacksboro_fault_dem.npz").exists():
        rasters.append(("dem", np.load(data / "jacksboro_fault_dem.npz")["elevation"]))
    if (data / "topobathy.npz").exists():
        rasters.append(("topobathy", np.load(data / "topobathy.npz")["topo"]))
    if (data / "s1045.ima.gz").exists():
        import gzip

        with gzip.open(data / "s1045.ima.gz") as fh:
            raw = np.frombuffer(fh.read(), np.uint16)
        rasters.append(("mri", raw.reshape(256, 256).astype(np.float32)))
    for name, z in rasters:
        z = (z - z.min()) / max(1e-6, float(z.max() - z.min()))
        # one colour map per raster: recoloured copies of one raster are near duplicates
        for cmap in ("gist_earth",):
            rgb = (matplotlib.colormaps[cmap](z)[..., :3] * 255).astype(np.uint8)
            out.append(
                (
                    f"{name}_{cmap}",
                    Image.fromarray(rgb).resize((512, 512 * z.shape[0] // z.shape[1])),
                )
            )
    return out


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
        return ImageFont.truetype(str(path), size)
    except (ImportError, OSError):  # pragma: no cover
        return ImageFont.load_default()


def _jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def _t_resize(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    f = float(rng.choice([0.35, 0.5, 0.75, 1.5]))
    return im.resize(
        (max(8, int(im.width * f)), max(8, int(im.height * f))), Image.Resampling.BICUBIC
    )


def _t_jpeg(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    return _jpeg(im, int(rng.integers(30, 91)))


def _t_crop(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    w, h = im.size
    cw, ch = rng.uniform(0.9, 1.0) * w, rng.uniform(0.9, 1.0) * h
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    return im.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch)))


def _t_jitter(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    from PIL import ImageEnhance

    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.85, 1.15))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.85, 1.15))
    return ImageEnhance.Color(im).enhance(rng.uniform(0.8, 1.2))


def _t_rotate(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    a = float(rng.uniform(1.0, 5.0) * rng.choice([-1, 1]))
    r = im.rotate(a, Image.Resampling.BICUBIC, expand=False)
    # crop the black corners away, as a re-poster would
    w, h = im.size
    m = math.sin(math.radians(abs(a)))
    dx, dy = int(h * m / 2) + 1, int(w * m / 2) + 1
    return r.crop((dx, dy, w - dx, h - dy))


def _t_text(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    im = im.copy()
    d = ImageDraw.Draw(im)
    size = max(12, int(im.height * rng.uniform(0.05, 0.1)))
    text = str(rng.choice(["© photo 2024", "www.example.com", "SALE -50%", "my holiday", "stock"]))
    x, y = rng.uniform(0.02, 0.5) * im.width, rng.uniform(0.05, 0.85) * im.height
    d.text(
        (x, y), text, fill=(255, 255, 255), font=_font(size), stroke_width=1, stroke_fill=(0, 0, 0)
    )
    return im


def _t_resize_jpeg(rng: np.random.Generator, im: Image.Image) -> Image.Image:
    return _t_jpeg(rng, _t_resize(rng, im))


TRANSFORMS: dict[str, Callable[[np.random.Generator, Image.Image], Image.Image]] = {
    "resize": _t_resize,
    "jpeg": _t_jpeg,
    "crop": _t_crop,
    "jitter": _t_jitter,
    "rotate": _t_rotate,
    "text": _t_text,
    "resize_jpeg": _t_resize_jpeg,
}


@dataclass
class Item:
    origin: int  # index of the distinct original
    transform: str  # "original", a TRANSFORMS name, "same_bytes" or "same_pixels"
    data: bytes  # encoded file
    image: Image.Image  # decoded RGB


def _encode(im: Image.Image, fmt: str, q: int = 92) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        im.save(buf, "JPEG", quality=q)
    else:
        im.save(buf, fmt)
    return buf.getvalue()


def build_set(n_distinct: int, n_with_copies: int, seed: int = 0) -> list[Item]:
    """Distinct originals (real ones first), copies of the first `n_with_copies` of them."""
    originals: list[Image.Image] = [im for _, im in real_images()]
    s = 1000 + seed * 100_000
    while len(originals) < n_distinct:
        originals.append(synthetic_photo(s))
        s += 1
    originals = originals[:n_distinct]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_distinct)  # which originals get copies: mixed real/synthetic
    items: list[Item] = []
    for i, im in enumerate(originals):
        data = _encode(im, "PNG")  # PNG originals: the file SHA changes under re-encode
        items.append(Item(i, "original", data, Image.open(io.BytesIO(data)).convert("RGB")))
    for i in order[:n_with_copies]:
        base = items[i]
        items.append(Item(int(i), "same_bytes", base.data, base.image))
        tiff = _encode(base.image, "TIFF")  # lossless re-encode: new bytes, same pixels
        items.append(Item(int(i), "same_pixels", tiff, Image.open(io.BytesIO(tiff)).convert("RGB")))
        for name, fn in TRANSFORMS.items():
            out = fn(rng, base.image).convert("RGB")
            data = _encode(out, "JPEG", 90)
            items.append(Item(int(i), name, data, Image.open(io.BytesIO(data)).convert("RGB")))
    return items


# --------------------------------------------------------------------------- quality

PHOTOMETRIC = ("resize", "jpeg", "jitter", "resize_jpeg")
GEOMETRIC = ("crop", "rotate", "text")
LICENSES = ["cc0-1.0", "cc-by-4.0", "cc-by-sa-4.0", "cc-by-nc-4.0", "cc-by-nd-4.0"]


def _pair_metrics(items: list[Item], same: np.ndarray) -> dict[str, float]:
    """Precision over all predicted pairs; recall of (original, copy) pairs, per transform."""
    origin = np.array([it.origin for it in items])
    truth = origin[:, None] == origin[None, :]
    iu = np.triu_indices(len(items), 1)
    pred, tru = same[iu], truth[iu]
    out = {"pairs": float(pred.sum()), "precision": float((pred & tru).sum() / max(1, pred.sum()))}
    orig_of = {it.origin: k for k, it in enumerate(items) if it.transform == "original"}
    per: dict[str, list[bool]] = defaultdict(list)
    for k, it in enumerate(items):
        if it.transform != "original":
            per[it.transform].append(bool(same[k, orig_of[it.origin]]))
    for t, v in per.items():
        out[f"recall_{t}"] = float(np.mean(v))
    near = [x for t in (*PHOTOMETRIC, *GEOMETRIC) for x in per[t]]
    out["recall"] = float(np.mean(near))
    out["recall_photometric"] = float(np.mean([x for t in PHOTOMETRIC for x in per[t]]))
    out["recall_geometric"] = float(np.mean([x for t in GEOMETRIC for x in per[t]]))
    return out


def _codes(hexes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hexes], dtype=np.uint64)


def _stage_metrics(items: list[Item], workdir: Path, cfg: Any) -> dict[str, float]:
    """Run the real DedupStage plan over the set written as shards; score its drops."""
    import pyarrow.parquet as pq

    from ccurate.filters.dedup import DedupStage
    from ccurate.filters.hashing import image_hashes
    from ccurate.record import Sample, make_key
    from ccurate.shardio import ShardWriter

    rng = np.random.default_rng(7)
    prefixes, key_item = [], {}
    per_shard = 500
    for s0 in range(0, len(items), per_shard):
        prefix = workdir / f"shard-{s0 // per_shard:05d}"
        w = ShardWriter(prefix)
        for k in range(s0, min(len(items), s0 + per_shard)):
            it = items[k]
            url = f"http://img.test/{k}.jpg"
            pix, ph, dh = image_hashes(it.image)
            s = Sample(
                key=make_key(url),
                url=url,
                image=it.data,
                mime="image/png",
                width=it.image.width,
                height=it.image.height,
                sha256=hashlib.sha256(it.data).hexdigest(),
                pixel_sha256=pix,
                phash=ph,
                dhash=dh,
                license=str(rng.choice(LICENSES)),
            )
            key_item[s.key] = k
            w.write(s)
        w.commit({})
        prefixes.append(str(prefix))
    stage = DedupStage(cfg)
    stage.prepare(prefixes, str(workdir / "scratch"))
    assert stage.decisions_path is not None
    t = pq.read_table(stage.decisions_path).to_pylist()
    keeper = np.arange(len(items))
    for row in t:
        if row["action"] == "drop":
            keeper[key_item[row["key"]]] = key_item[row["duplicate_of"]]
    origin = np.array([it.origin for it in items])
    dropped = keeper != np.arange(len(items))
    correct = dropped & (origin[keeper] == origin)
    n_origins = len(set(origin.tolist()))
    out = {
        "drops": float(dropped.sum()),
        "precision": float(correct.sum() / max(1, dropped.sum())),
        "recall": float(correct.sum() / max(1, len(items) - n_origins)),
    }
    orig_of = {it.origin: k for k, it in enumerate(items) if it.transform == "original"}
    per: dict[str, list[bool]] = defaultdict(list)
    for k, it in enumerate(items):
        if it.transform != "original":
            per[it.transform].append(bool(keeper[k] == keeper[orig_of[it.origin]]))
    for name, v in per.items():
        out[f"recall_{name}"] = float(np.mean(v))
    out["recall_photometric"] = float(np.mean([x for n in PHOTOMETRIC for x in per[n]]))
    out["recall_geometric"] = float(np.mean([x for n in GEOMETRIC for x in per[n]]))
    return out


def quality(
    n_distinct: int, n_copies: int, radius: int, workdir: Path
) -> dict[str, dict[str, float]]:
    from ccurate.filters.hashing import compute_hashes, dhash

    t0 = time.perf_counter()
    items = build_set(n_distinct, n_copies)
    print(
        f"set: {n_distinct} distinct, {len(items) - n_distinct} copies of {n_copies} "
        f"({len(real_images())} real), built in {time.perf_counter() - t0:.0f}s"
    )
    t0 = time.perf_counter()
    pix, ph = zip(*(compute_hashes(it.image) for it in items), strict=True)
    t_hash = (time.perf_counter() - t0) / len(items)
    dh = [dhash(it.image) for it in items]
    small = [it.image.resize((256, 256 * it.image.height // it.image.width)) for it in items[:200]]
    t0 = time.perf_counter()
    for im in small:
        dhash(im)
    t_dh = (time.perf_counter() - t0) / len(small)
    sha = [hashlib.sha256(it.data).hexdigest() for it in items]
    eq = lambda v: np.array(v)[:, None] == np.array(v)[None, :]  # noqa: E731
    pc, dc = _codes(list(ph)), _codes(dh)
    pd = np.bitwise_count(pc[:, None] ^ pc[None, :])
    dd = np.bitwise_count(dc[:, None] ^ dc[None, :])
    results: dict[str, dict[str, float]] = {
        "sha256": _pair_metrics(items, eq(sha)),
        "pixel_sha256": _pair_metrics(items, eq(pix)),
    }
    for r in (0, 2, 4, 6, 8, 10, 12):
        results[f"phash_r{r}"] = _pair_metrics(items, pd <= r)
    for r in (2, 4, 6, 8, 10):
        results[f"dhash_r{r}"] = _pair_metrics(items, dd <= r)
    for r, v in ((8, 20), (10, 22), (12, 24), (14, 24)):
        results[f"phash_r{r}+dh{v}"] = _pair_metrics(items, (pd <= r) & (pd + dd <= v))
    from ccurate.filters.dedup import DedupConfig

    plain = {"verify": "none", "search": "exact"}
    configs: dict[str, Any] = {
        f"stage_phash_r{r}": DedupConfig(radius=r, **plain)  # type: ignore[arg-type]
        for r in sorted({radius, 8})
    }
    configs["stage_dhash_r6"] = DedupConfig(hash="dhash", radius=6)
    for r, v in ((8, 20), (12, 24)):
        configs[f"stage_p{r}+dh{v}"] = DedupConfig(
            radius=r, verify="dhash", verify_sum=v, search="exact"
        )
    configs["stage_p12+dh24_tables"] = DedupConfig(
        radius=12, verify="dhash", verify_sum=24, search="tables"
    )
    configs["stage_default"] = DedupConfig()
    for name, cfg in configs.items():
        results[name] = _stage_metrics(items, workdir / name.replace("+", "_"), cfg)
    results["_hash_ms"] = {
        "compute_hashes_ms_per_image": 1000 * t_hash,
        "dhash_ms_256px": 1000 * t_dh,
    }
    return results


def _print_table(results: dict[str, dict[str, float]]) -> None:
    cols = [
        "precision",
        "recall",
        "recall_photometric",
        "recall_geometric",
        *(f"recall_{t}" for t in ("same_bytes", "same_pixels", *PHOTOMETRIC, *GEOMETRIC)),
    ]
    head = " ".join(f"{c.replace('recall_', 'r_')[:11]:>11s}" for c in cols)
    print(f"{'method':18s} {'pairs':>7s} {head}")
    for name, m in results.items():
        if name.startswith("_"):
            continue
        pairs = f"{m['pairs']:7.0f}" if "pairs" in m else f"{m['drops']:6.0f}d"
        vals = " ".join(f"{m[c]:11.3f}" if c in m else f"{'-':>11s}" for c in cols)
        print(f"{name:18s} {pairs} {vals}")


# --------------------------------------------------------------------------- scale


def synthetic_codes(n: int, radius: int, seed: int = 0) -> np.ndarray:
    """n random 64-bit codes, 10 % of them planted copies 1..radius bits away from another."""
    rng = np.random.default_rng(seed)
    m = n // 10
    x = rng.integers(0, 2**64 - 1, n - m, dtype=np.uint64, endpoint=True)
    src = rng.integers(0, n - m, m)
    y = x[src].copy()
    _flip_bits(rng, y, rng.integers(1, max(1, radius) + 1, m), max(1, radius))
    return np.concatenate([x, y])


def _flip_bits(rng: np.random.Generator, y: np.ndarray, flips: np.ndarray, most: int) -> None:
    """Flip `flips[i]` random bits of code `y[i]` in place (a bit drawn twice flips back)."""
    for k in range(most):
        sel = flips > k
        bit = rng.integers(0, 64, len(y)).astype(np.uint64)
        y[sel] ^= np.uint64(1) << bit[sel]


def synthetic_code_pairs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n random (pHash, dHash) pairs, 10 % planted copies: pHash 1..12 bits from another
    row's, dHash then up to 24 bits minus that (what `p12+dh24` accepts)."""
    rng = np.random.default_rng(seed)
    m = n // 10
    p = rng.integers(0, 2**64 - 1, n - m, dtype=np.uint64, endpoint=True)
    d = rng.integers(0, 2**64 - 1, n - m, dtype=np.uint64, endpoint=True)
    src = rng.integers(0, n - m, m)
    pf = rng.integers(1, 13, m)
    df = rng.integers(0, 25 - pf)
    py, dy = p[src].copy(), d[src].copy()
    for y, flips in ((py, pf), (dy, df)):
        _flip_bits(rng, y, flips, 24)
    return np.concatenate([p, py]), np.concatenate([d, dy])


def _peak_rss_mb() -> float:
    """Peak RSS of this process image: VmHWM, which, unlike ru_maxrss, restarts at exec
    (ru_maxrss would report the forking parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)


def _hex_strings(raw: np.ndarray) -> Any:
    """(n, k) random bytes -> Arrow string array of 2k-char hex, vectorised."""
    import pyarrow as pa

    n, k = raw.shape
    chars = np.empty((n, 2 * k), np.uint8)
    chars[:, 0::2], chars[:, 1::2] = _HEX[raw >> 4], _HEX[raw & 15]
    offsets = pa.py_buffer((np.arange(n + 1, dtype=np.int32) * 2 * k).tobytes())
    return pa.Array.from_buffers(pa.string(), n, [None, offsets, pa.py_buffer(chars.tobytes())])


def write_index_shards(
    n: int, radius: int, out: Path, per_shard: int = 500_000, dhashes: bool = False
) -> list[str]:
    """N index rows (no images) as parquet shards: 10 % near copies, 2 % exact copies.
    `dhashes`: a dhash column too, the near copies p12+dh24 ones (`synthetic_code_pairs`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    if dhashes:
        codes, dcodes = synthetic_code_pairs(n)
    else:
        codes, dcodes = synthetic_codes(n, radius), None
    sha = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    pix = rng.integers(0, 256, (n, 32), dtype=np.uint8)
    exact = rng.choice(n, n // 50, replace=False)
    src = rng.integers(0, n, len(exact))
    sha[exact], pix[exact], codes[exact] = sha[src], pix[src], codes[src]
    if dcodes is not None:
        dcodes[exact] = dcodes[src]
    keys = rng.integers(0, 256, (n, 8), dtype=np.uint8)
    lic = np.array(LICENSES)[rng.integers(0, len(LICENSES), n)]
    w = rng.integers(256, 2048, n).astype(np.int32)
    out.mkdir(parents=True, exist_ok=True)
    prefixes = []
    for s0 in range(0, n, per_shard):
        sl = slice(s0, min(n, s0 + per_shard))
        cols = {
            "key": _hex_strings(keys[sl]),
            "sha256": _hex_strings(sha[sl]),
            "pixel_sha256": _hex_strings(pix[sl]),
            "phash": _hex_strings(codes[sl].astype(">u8").view(np.uint8).reshape(-1, 8)),
            "width": pa.array(w[sl]),
            "height": pa.array((w[sl] * 3) // 4),
            "license": pa.array(lic[sl]),
        }
        if dcodes is not None:
            cols["dhash"] = _hex_strings(dcodes[sl].astype(">u8").view(np.uint8).reshape(-1, 8))
        t = pa.table(cols)
        prefix = out / f"shard-{s0 // per_shard:05d}"
        pq.write_table(t, f"{prefix}.parquet")
        prefixes.append(str(prefix))
    return prefixes


def _scale_worker(n: int, radius: int, which: str, workdir: str = "") -> None:
    """Run in a fresh process so peak RSS belongs to this measurement alone."""
    from ccurate.filters.dedup import DedupConfig, DedupStage
    from ccurate.filters.hamming import leader_groups, near_pairs

    if which in ("gen", "gen_tables"):
        write_index_shards(n, radius, Path(workdir), dhashes=which == "gen_tables")
        return
    if which in ("plan", "plan_tables"):
        import pyarrow.parquet as pq

        prefixes = sorted(str(p)[: -len(".parquet")] for p in Path(workdir).glob("*.parquet"))
        base = _peak_rss_mb()
        t0 = time.perf_counter()
        cfg = DedupConfig(radius=radius, verify="none", search="exact")
        if which == "plan_tables":
            cfg = DedupConfig(radius=radius, verify="dhash", search="tables")
        stage = DedupStage(cfg)
        stage.prepare(prefixes, str(Path(workdir) / "_prepare"))
        t = time.perf_counter() - t0
        rss = _peak_rss_mb()
        assert stage.decisions_path is not None
        summary = json.loads((Path(workdir) / "_prepare" / "dedup_summary.json").read_text())
        t1 = time.perf_counter()
        stage.setup()
        t_setup = time.perf_counter() - t1
        print(
            json.dumps(
                {
                    "n": n,
                    "seconds": t,
                    "rss_mb": rss,
                    "base_rss_mb": base,
                    "drops": summary["drops"],
                    "setup_seconds": t_setup,
                    "setup_rss_mb": _peak_rss_mb(),
                    "decision_rows": pq.read_metadata(stage.decisions_path).num_rows,
                }
            )
        )
        return
    from ccurate.filters.dedup_reference import near_matches

    if which == "tables":  # (pHash, dHash) pairs through the p12+dh24 tables search
        codes, dcodes = synthetic_code_pairs(n)
    else:
        codes, dcodes = synthetic_codes(n, radius), None
    base = _peak_rss_mb()
    t0 = time.perf_counter()
    if which == "faiss":
        import faiss

        idx = faiss.IndexBinaryMultiHash(64, 3, 21)
        idx.nflip = radius // 3
        x8 = codes.view(np.uint8).reshape(-1, 8)
        idx.add(x8)
        pairs = 0
        for s in range(0, len(x8), 100_000):
            _, _, ids = idx.range_search(x8[s : s + 100_000], radius + 1)
            pairs += len(ids)
        pairs = (pairs - len(codes)) // 2
        dropped = -1
    else:
        if dcodes is not None:
            cfg = DedupConfig(radius=12, verify="dhash", verify_sum=24, search="tables")
            i, j, d = near_matches(codes, dcodes, np.ones(len(dcodes), bool), cfg)
        else:
            i, j, d = near_pairs(codes, radius, threads=DedupConfig().threads)
        lead, _ = leader_groups(len(codes), i, j, d, np.arange(len(codes)))
        pairs, dropped = len(i), int((lead != np.arange(len(codes))).sum())
    t = time.perf_counter() - t0
    rss = _peak_rss_mb()
    print(
        json.dumps(
            {
                "n": len(codes),
                "seconds": t,
                "rss_mb": rss,
                "codes_rss_mb": base,
                "pairs": pairs,
                "dropped": dropped,
                "planted": n // 10,
            }
        )
    )


def scale(n: int, radius: int, which: str = "ours", workdir: str = "") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_worker", str(n), str(radius), which, workdir]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    if which.startswith("gen"):
        return {}
    res: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return res


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", default="1M", choices=["none", "1M", "10M"])
    ap.add_argument("--distinct", type=int, default=600)
    ap.add_argument("--copies", type=int, default=200, help="originals that get copies")
    ap.add_argument(
        "--radius", type=int, default=4, help="radius of the plain pHash search (stage row, scale)"
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        _scale_worker(int(args._worker[0]), int(args._worker[1]), *args._worker[2:])
        return
    from ccurate.filters.dedup import DedupConfig

    radius = args.radius
    import tempfile

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        res = quality(args.distinct, args.copies, radius, Path(tmp))
    _print_table(res)
    print(
        f"compute_hashes: {res['_hash_ms']['compute_hashes_ms_per_image']:.1f} ms/image; "
        f"dhash on 256 px: {res['_hash_ms']['dhash_ms_256px']:.3f} ms/image"
    )
    cfg = DedupConfig()
    stage = res["stage_default"]
    wide = res["stage_p12+dh24"]
    base = res[f"stage_phash_r{radius}"]
    line = (
        f"RESULT dedup_eval precision={stage['precision']:.4f} recall={stage['recall']:.4f} "
        f"recall_photometric={stage['recall_photometric']:.4f} "
        f"recall_geometric={stage['recall_geometric']:.4f} "
        f"method=default(radius={cfg.radius},verify={cfg.verify},sum={cfg.verify_sum},"
        f"search={cfg.search}) p12dh24_exact_precision={wide['precision']:.4f} "
        f"p12dh24_exact_recall={wide['recall']:.4f} plain_radius={radius} "
        f"plain_precision={base['precision']:.4f} plain_recall={base['recall']:.4f}"
    )
    if args.scale != "none":
        ours = scale(1_000_000, radius)
        anchor = scale(1_000_000, radius, "faiss")
        speedup = anchor["seconds"] / ours["seconds"]
        print(
            f"near search 1M: ours {ours['seconds']:.1f}s rss {ours['rss_mb']:.0f}MB, "
            f"pairs {ours['pairs']} (planted {ours['planted']}); anchor faiss "
            f"IndexBinaryMultiHash {anchor['seconds']:.1f}s rss {anchor['rss_mb']:.0f}MB "
            f"pairs {anchor['pairs']}; speed-up x{speedup:.1f}"
        )
        line += (
            f" t_1m_s={ours['seconds']:.1f} rss_1m_mb={ours['rss_mb']:.0f}"
            f" faiss_1m_s={anchor['seconds']:.1f} speedup_vs_faiss={speedup:.1f}"
        )
        sizes = [("1m", 1_000_000)] + ([("10m", 10_000_000)] if args.scale == "10M" else [])
        for label, n in sizes:
            if n > 1_000_000:
                big = scale(n, radius)
                print(
                    f"near search {label.upper()}: ours {big['seconds']:.1f}s "
                    f"rss {big['rss_mb']:.0f}MB, pairs {big['pairs']} (planted {big['planted']})"
                )
                line += f" t_{label}_s={big['seconds']:.1f} rss_{label}_mb={big['rss_mb']:.0f}"
            tb = scale(n, 12, "tables")
            print(
                f"search = 'tables' (p12+dh24 from pHash and dHash radius-4 tables) "
                f"{label.upper()}: {tb['seconds']:.1f}s rss {tb['rss_mb']:.0f}MB, "
                f"dropped {tb['dropped']} of {tb['planted']} planted copies"
            )
            line += f" t_tables_{label}_s={tb['seconds']:.1f} tables_found_{label}=" + (
                f"{tb['dropped'] / max(1, tb['planted']):.3f}"
            )
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                scale(n, radius, "gen", tmp)
                p = scale(n, radius, "plan", tmp)
            print(
                f"full DedupStage.prepare on {label.upper()} index rows (parquet -> decisions): "
                f"{p['seconds']:.1f}s rss {p['rss_mb']:.0f}MB drops {p['drops']}; "
                f"setup (load {p['decision_rows']} decisions) {p['setup_seconds']:.1f}s"
            )
            line += f" t_plan_{label}_s={p['seconds']:.1f} rss_plan_{label}_mb={p['rss_mb']:.0f}"
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                scale(n, 12, "gen_tables", tmp)
                pt = scale(n, 12, "plan_tables", tmp)
            print(
                f"full plan, radius 12 + dHash check, search = 'tables', {label.upper()} rows: "
                f"{pt['seconds']:.1f}s rss {pt['rss_mb']:.0f}MB drops {pt['drops']}"
            )
            line += (
                f" t_plan_tables_{label}_s={pt['seconds']:.1f}"
                f" rss_plan_tables_{label}_mb={pt['rss_mb']:.0f}"
            )
    print(line)


if __name__ == "__main__":
    main()
