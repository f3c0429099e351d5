"""Recall and false-positive rate of the OCR watermark detector on photos with/without overlays.

Photos: the real photographs shipped inside installed packages (matplotlib's
sample_data: grace_hopper.jpg; hill-shaded real elevation models topobathy.npz /
jacksboro_fault_dem.npz; scikit-image's data/*.png when installed), cropped and
flipped, plus procedurally generated scenes (sky, sun, ridges, vegetation noise,
buildings with windows, bokeh). Positives get a stock-style overlay: a brand,
a © line, "watermark"/"preview"/"sample", a photographer URL, or a tiled text,
in varied fonts (DejaVu TTFs found on the system + Pillow's default font),
opacity 0.3-0.8, size, angle 0-45 degrees. Negatives are the clean photos and
photos with non-watermark scene text (opaque signs: "OPEN", "BAKERY", ...).

Anchors measured in the same run: (a) the naive rule "any text detected is a
watermark" (what the cues buy over plain detection), (b) rapidocr at its own
defaults (det min side 736, cls on) on a subset (what the speed settings buy).

Prints recall by overlay parameter (tiling, opacity, stroke contrast, text height, angle,
light/dark, font), the OCR pass that flagged each positive, and the missed overlays' texts.
--no-achromatic runs the first OCR pass only; --no-tophat leaves out the third (top-hat).
--no-ratio leaves out the fourth and fifth (log black-hat, dark then light: `ratio_map`).

Usage: python bench/watermark_eval.py [--n-base 40] [--seed 0] [--threads 1] [--no-achromatic]
       [--no-tophat] [--no-ratio]
Ends with: RESULT watermark_eval recall=... fpr=... n_pos=... n_neg=... img_s=... img_cpu_s=...
read_ceiling=...
(img_cpu_s: images per CPU-second of this process, the figure to compare on a shared machine,
where wall-clock img_s moves with the other processes' load. read_ceiling: the recall if the
cue rules flagged every positive in which some OCR pass reads a word; the missed positives
no pass reads anything in are beyond any cue rule: `unread_misses`.)
"""

from __future__ import annotations

import argparse
import glob
import io
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ccurate.filters.images import decode_rgb
from ccurate.filters.watermark import OcrReader, WatermarkConfig, WatermarkFilter
from ccurate.record import Sample

# ---- real photos shipped with installed packages -------------------------------------------


def real_photos() -> list[tuple[str, Image.Image]]:
    out: list[tuple[str, Image.Image]] = []
    try:
        import matplotlib

        data = Path(matplotlib.get_data_path()) / "sample_data"
        gh = data / "grace_hopper.jpg"
        if gh.exists():
            out.append(("grace_hopper", Image.open(gh).convert("RGB")))
        for name, key in (("topobathy.npz", "topo"), ("jacksboro_fault_dem.npz", "elevation")):
            p = data / name
            if p.exists():
                z = np.load(p)
                arr = z[key] if key in z else z[z.files[0]]
                out.append((name.split(".")[0], hillshade(np.asarray(arr, np.float64))))
    except ImportError:
        pass
    try:
        import skimage

        data = Path(skimage.__file__).parent / "data"
        for name in SKIMAGE_PHOTOS:
            f = data / name
            if f.exists():
                out.append((f.stem, Image.open(f).convert("RGB")))
    except ImportError:
        print("scikit-image is not installed: its photos are left out (`make install` adds it)")
    return out


# scikit-image's bundled photographs (its wheel ships them; the `dev` extra installs it):
# people, animals, objects, street, sky, microscopy, and textures that are hard ground for
# faint text (grass, gravel, brick). Left out: test patterns, logos, silhouettes, and the
# two pages of printed text, which would be text-bearing negatives by construction.
SKIMAGE_PHOTOS = (
    "astronaut.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "rocket.jpg",
    "motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "moon.png",
    "clock_motion.png", "grass.png", "gravel.png", "brick.png",
)  # fmt: skip


def hillshade(z: np.ndarray) -> Image.Image:
    """Shaded relief of a real elevation model, coloured by height (an aerial-looking photo)."""
    import matplotlib

    gy, gx = np.gradient(z)
    slope = np.pi / 2 - np.arctan(np.hypot(gx, gy))
    aspect = np.arctan2(-gx, gy)
    az, alt = np.radians(315), np.radians(45)
    shade = np.sin(alt) * np.sin(slope) + np.cos(alt) * np.cos(slope) * np.cos(az - aspect)
    norm = (z - z.min()) / max(1e-9, np.ptp(z))
    rgb = matplotlib.colormaps["terrain"](norm)[:, :, :3] * (0.35 + 0.65 * shade[..., None])
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


# ---- procedural photographic scenes ----------------------------------------------------------


def fractal_noise(rng: np.random.Generator, h: int, w: int, octaves: int = 5) -> np.ndarray:
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        gh, gw = max(2, h >> (octaves - o)), max(2, w >> (octaves - o))
        g = rng.random((gh, gw)).astype(np.float32)
        up = np.asarray(Image.fromarray(g).resize((w, h), Image.Resampling.BICUBIC))
        out += amp * up
        total += amp
        amp *= 0.55
    return out / total


def landscape(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    y = np.linspace(0, 1, h)[:, None, None]
    top = rng.uniform([40, 90, 170], [110, 160, 235])
    bottom = rng.uniform([170, 190, 210], [240, 230, 240])
    sky = top * (1 - y) + bottom * y
    img = np.broadcast_to(sky, (h, w, 3)).copy()
    clouds = fractal_noise(rng, h, w)
    img += (np.clip(clouds - 0.55, 0, 1) * 400)[..., None] * (1 - y)
    xs = np.arange(w)
    for layer in range(rng.integers(2, 4)):
        base = h * rng.uniform(0.35, 0.7) + layer * h * 0.08
        ridge = base + h * 0.12 * (fractal_noise(rng, 1, w, 4)[0] - 0.5) * 2
        col = rng.uniform([30, 50, 30], [120, 130, 110]) * (1 - 0.2 * layer)
        mask = np.arange(h)[:, None] > ridge[None, xs]
        tex = fractal_noise(rng, h, w, 6)[..., None] * 60 - 30
        img = np.where(mask[..., None], col + tex, img)
    grass = fractal_noise(rng, h, w, 6)
    gmask = np.arange(h)[:, None] > h * rng.uniform(0.75, 0.9)
    gcol = rng.uniform([40, 90, 20], [100, 160, 60])
    img = np.where(gmask[..., None], gcol + (grass[..., None] - 0.5) * 90, img)
    if rng.random() < 0.5:
        cx, cy, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.05, 0.3) * h, rng.uniform(8, 25)
        yy, xx = np.mgrid[:h, :w]
        glow = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        img += glow[..., None] * np.array([255, 220, 150]) * 0.8
    img += rng.normal(0, 4, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def city(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    im = landscape(rng, w, h)
    d = ImageDraw.Draw(im)
    x = 0
    while x < w:
        bw = int(rng.integers(w // 12, w // 5))
        bh = int(rng.integers(h // 4, int(h * 0.8)))
        shade = int(rng.integers(50, 170))
        col = (shade, shade + int(rng.integers(-10, 10)), shade + int(rng.integers(0, 25)))
        d.rectangle([x, h - bh, x + bw, h], fill=col)
        for wy in range(h - bh + 6, h - 6, 12):
            for wx in range(x + 4, x + bw - 6, 10):
                if rng.random() < 0.6:
                    lit = int(rng.integers(150, 255))
                    d.rectangle([wx, wy, wx + 4, wy + 6], fill=(lit, lit, int(lit * 0.7)))
        x += bw + int(rng.integers(0, 8))
    return im.filter(ImageFilter.GaussianBlur(0.6))


def bokeh(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    base = landscape(rng, w, h).filter(ImageFilter.GaussianBlur(6))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(15, 40))):
        r = int(rng.integers(6, 30))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        col = tuple(int(c) for c in rng.integers(120, 255, 3))
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(*col, int(rng.integers(60, 160))))
    out = Image.alpha_composite(base.convert("RGBA"), layer).convert("RGB")
    # a sharp subject in front of the bokeh
    d2 = ImageDraw.Draw(out)
    cx, cy = w // 2 + int(rng.integers(-w // 6, w // 6)), int(h * 0.6)
    d2.ellipse([cx - w // 8, cy - h // 6, cx + w // 8, cy + h // 6],
               fill=tuple(int(c) for c in rng.integers(40, 200, 3)))  # fmt: skip
    return out


def base_images(n: int, rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
    photos = real_photos()
    out: list[tuple[str, Image.Image]] = []
    k = 0
    while len(out) < n:
        side = int(rng.choice([256, 320, 384, 512, 640]))
        aspect = float(rng.uniform(0.7, 1.5))
        w, h = (side, int(side / aspect)) if aspect >= 1 else (int(side * aspect), side)
        if photos and k % 2 == 0:
            name, src = photos[(k // 2) % len(photos)]
            sw, sh = src.size
            cw, ch = int(sw * rng.uniform(0.6, 1.0)), int(sh * rng.uniform(0.6, 1.0))
            x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
            im = src.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            scale = min(side / max(im.size), 2.0)  # small sources: no blocky upscales
            im = im.resize((max(1, int(im.width * scale)), max(1, int(im.height * scale))),
                           Image.Resampling.BICUBIC)  # fmt: skip
            out.append((f"real:{name}", im))
        else:
            kind = ["landscape", "city", "bokeh"][k % 3]
            fn = {"landscape": landscape, "city": city, "bokeh": bokeh}[kind]
            out.append((f"procedural:{kind}", fn(rng, w, h)))
        k += 1
    return out


# ---- overlays ---------------------------------------------------------------------------------


def font_files() -> list[str]:
    found = sorted(glob.glob("/usr/share/fonts/**/*.ttf", recursive=True))
    return [f for f in found if "Math" not in f]


def get_font(rng: random.Random, fonts: list[str], size: int) -> ImageFont.FreeTypeFont:
    if fonts and rng.random() < 0.8:
        return ImageFont.truetype(rng.choice(fonts), size)
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


def font_name(font: ImageFont.FreeTypeFont) -> str:
    """'DejaVuSans-Bold' for a TTF, 'default' for Pillow's built-in font."""
    path = getattr(font, "path", None)
    return Path(path).stem if isinstance(path, str) else "default"


BRANDS = ["shutterstock", "Getty Images", "iStock", "alamy", "dreamstime", "123RF",
          "depositphotos", "Adobe Stock", "gettyimages", "iStock by Getty Images"]  # fmt: skip
NAMES = ["John Smith", "Maria Rossi", "A. Novak", "Lee Kim", "Jane Doe Photo", "P. Dubois"]
WORDS = ["WATERMARK", "PREVIEW", "SAMPLE", "Watermark", "preview", "PROOF"]


def overlay_text(rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["brand", "brand", "copyright", "word", "url"])
    if kind == "brand":
        return kind, rng.choice(BRANDS)
    if kind == "copyright":
        year = rng.randint(2005, 2024)
        return kind, rng.choice([f"© {rng.choice(NAMES)}", f"© {year} {rng.choice(NAMES)}",
                                 f"Copyright {rng.choice(NAMES)}"])  # fmt: skip
    if kind == "word":
        return kind, rng.choice(WORDS)
    slug = rng.choice(NAMES).lower().replace(" ", "").replace(".", "")
    return kind, rng.choice([f"www.{slug}.com", f"{slug}photo.net", f"www.{slug}-photography.de"])


def draw_overlay(
    img: Image.Image, rng: random.Random, fonts: list[str]
) -> tuple[Image.Image, str, dict[str, object]]:
    """The image with a stock-style overlay, its kind, and the overlay's parameters."""
    kind, text = overlay_text(rng)
    tiled = rng.random() < 0.3
    w, h = img.size
    size = int(min(w, h) * (rng.uniform(0.06, 0.11) if tiled else rng.uniform(0.07, 0.16)))
    font = get_font(rng, fonts, max(10, size))
    opacity = rng.uniform(0.3, 0.8)
    angle = rng.uniform(0, 45) if rng.random() < 0.6 else 0.0
    light = rng.random() < 0.75
    fill = (255, 255, 255) if light else (20, 20, 20)
    big = int(math.hypot(w, h)) + 2
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = (int(v) for v in d.textbbox((0, 0), text, font=font))
    if not tiled:  # a watermark is placed to be seen whole: shrink it to fit the frame
        rad = math.radians(angle)
        span = (x1 - x0) * math.cos(rad) + (y1 - y0) * math.sin(rad)
        limit = 0.9 * min(w, h / max(0.2, math.sin(rad))) if angle > 1 else 0.9 * w
        if span > limit:
            font = get_font(rng, fonts, max(10, int(size * limit / span)))
            x0, y0, x1, y1 = (int(v) for v in d.textbbox((0, 0), text, font=font))
    tw, th = x1 - x0, y1 - y0
    alpha = int(255 * opacity)
    if tiled:
        gap_x, gap_y = int(tw * rng.uniform(0.4, 1.0)) + 10, int(th * rng.uniform(2.0, 4.0))
        for row, ty in enumerate(range(0, big, th + gap_y)):
            off = (row % 2) * (tw + gap_x) // 2
            for tx in range(-off, big, tw + gap_x):
                d.text((tx, ty), text, font=font, fill=(*fill, alpha))
        kind = f"tiled-{kind}"
    else:
        pos = "center" if angle > 1 else rng.choice(["center", "bottom-right", "bottom", "random"])
        cx, cy = big // 2, big // 2
        if pos == "bottom-right":
            cx, cy = big // 2 + w // 2 - tw // 2 - 8, big // 2 + h // 2 - th - 8
        elif pos == "bottom":
            cy = big // 2 + h // 2 - th - 10
        elif pos == "random":
            cx += rng.randint(-max(0, (w - tw) // 2 - 8), max(0, (w - tw) // 2 - 8))
            cy += rng.randint(-max(0, (h - th) // 2 - 8), max(0, (h - th) // 2 - 8))
        d.text((cx - tw // 2 - x0, cy - th // 2 - y0), text, font=font, fill=(*fill, alpha))
        if rng.random() < 0.3:  # stock sites often add a faint outline/shadow
            layer = layer.filter(ImageFilter.GaussianBlur(0.5))
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, center=(big / 2, big / 2))
    left, top = (big - w) // 2, (big - h) // 2
    layer = layer.crop((left, top, left + w, top + h))
    out = Image.alpha_composite(img.convert("RGBA"), layer).convert("RGB")
    meta: dict[str, object] = {
        "text": text, "font": font_name(font), "opacity": opacity, "angle": angle,
        "size": th / max(1, min(w, h)), "tiled": tiled, "light": light,
        "contrast": stroke_contrast(img, out, layer),
    }  # fmt: skip
    return out, kind, meta


def stroke_contrast(img: Image.Image, out: Image.Image, layer: Image.Image) -> float:
    """Mean luminance change (0-255) the overlay made on its strokes (pixels at >= half the
    layer's peak alpha): 0 for dark text on a black sky, which nobody (and no OCR) can see."""
    alpha = np.asarray(layer.getchannel("A"), np.float32)
    strokes = alpha >= 0.5 * max(1.0, float(alpha.max()))
    if not strokes.any():
        return 0.0
    before = np.asarray(img.convert("L"), np.float32)
    after = np.asarray(out.convert("L"), np.float32)
    return float(np.abs(after - before)[strokes].mean())


SIGNS = ["OPEN", "CAFE", "BAKERY", "HOTEL", "EXIT", "STOP", "MAIN ST", "PARKING", "PHARMACY",
         "BOOKS", "PIZZA", "TAXI", "BUS STOP", "NO ENTRY", "MARKET", "GARAGE", "FLOWERS", "SALE",
         "ONE WAY", "Restaurant", "Welcome", "Museum", "Coffee & Tea", "Station", "42", "Oak Ave",
         "GYM", "Library", "Fresh Fish", "Hair Salon"]  # fmt: skip


def draw_sign(img: Image.Image, rng: random.Random, fonts: list[str]) -> tuple[Image.Image, str]:
    """An opaque sign board with a word, slightly rotated: scene text, not a watermark."""
    w, h = img.size
    text = rng.choice(SIGNS)
    font = get_font(rng, fonts, max(10, int(min(w, h) * rng.uniform(0.06, 0.14))))
    probe = ImageDraw.Draw(img)
    x0, y0, x1, y1 = (int(v) for v in probe.textbbox((0, 0), text, font=font))
    tw, th = x1 - x0, y1 - y0
    pad = max(4, th // 3)
    board = Image.new("RGBA", (tw + 2 * pad, th + 2 * pad), (0, 0, 0, 0))
    bd = ImageDraw.Draw(board)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    fg = (255, 255, 255) if sum(bg) < 380 else (10, 10, 10)
    bd.rounded_rectangle([0, 0, board.width - 1, board.height - 1], radius=pad, fill=(*bg, 255))
    bd.text((pad - x0, pad - y0), text, font=font, fill=(*fg, 255))
    board = board.rotate(rng.uniform(-10, 10), expand=True, resample=Image.Resampling.BICUBIC)
    px = rng.randint(0, max(0, w - board.width))
    py = rng.randint(0, max(0, h - board.height))
    out = img.convert("RGBA")
    out.alpha_composite(board, (px, py))
    return out.convert("RGB"), "sign"


def _bin(meta: dict[str, object], key: str) -> str:
    v = meta[key]
    if key == "opacity":
        return "0.3-0.45" if float(v) < 0.45 else "0.45-0.6" if float(v) < 0.6 else "0.6-0.8"  # type: ignore[arg-type]
    if key == "angle":
        return "0" if float(v) <= 1 else "1-20" if float(v) < 20 else "20-45"  # type: ignore[arg-type]
    if key == "size":  # text height over the short side
        return "<0.06" if float(v) < 0.06 else "0.06-0.09" if float(v) < 0.09 else ">=0.09"  # type: ignore[arg-type]
    if key == "contrast":  # mean luminance change on the strokes (`stroke_contrast`), 0-255
        c = float(v)  # type: ignore[arg-type]
        return "0-20" if c < 20 else "20-40" if c < 40 else "40-80" if c < 80 else "80+"
    if key == "tiled":
        return "tiled" if v else "single"
    if key == "light":
        return "light" if v else "dark"
    return str(v)


def print_breakdown(metas: dict[int, dict[str, object]], flag: np.ndarray) -> None:
    """Recall of the positives by each overlay parameter (font, opacity, size, angle, tiling)."""
    print("recall by overlay parameter (at the default threshold):")
    for key in ("tiled", "opacity", "contrast", "size", "angle", "light", "font"):
        groups: dict[str, list[bool]] = {}
        for i, meta in metas.items():
            groups.setdefault(_bin(meta, key), []).append(bool(flag[i]))
        cells = "  ".join(f"{g}={np.mean(v):.2f}(n={len(v)})" for g, v in sorted(groups.items()))
        print(f"  {key:8s} {cells}")


def unread_misses(filt: WatermarkFilter, samples: list[Sample], missed: np.ndarray) -> list[int]:
    """The missed positives in which no OCR pass (every pass that applies, none skipped for an early flag) reads a word
    of 2+ Latin letters at the recognition threshold: no cue rule can reach them, so they bound
    what cue work can gain; only the text detector (or a model) could."""
    reader = filt._ocr
    assert reader is not None
    out = []
    for i in missed:
        img = decode_rgb(samples[int(i)].image)
        reads = [b.text for _, bgr, _, _ in reader.pass_maps(img) for b in reader.read_bgr(bgr)[0]]
        if not any(re.search(r"[A-Za-z]{2}", t) for t in reads):
            out.append(int(i))
    return out


def to_sample(i: int, im: Image.Image) -> Sample:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return Sample(key=f"{i:06d}", url=f"https://example.org/{i}.jpg", image=buf.getvalue())


# ---- evaluation -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-base", type=int, default=80, help="base photos (2 negatives + 1 positive)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ocr-side", type=int, default=WatermarkConfig().ocr_side)
    ap.add_argument("--anchor-n", type=int, default=12, help="images timed at rapidocr defaults")
    ap.add_argument("--save", default=None, help="folder to write the generated images to")
    ap.add_argument("--no-achromatic", action="store_true", help="first OCR pass only")
    ap.add_argument("--no-tophat", action="store_true", help="no third (top-hat) OCR pass")
    ap.add_argument("--no-ratio", action="store_true", help="no 4th/5th (log black-hat) OCR pass")
    args = ap.parse_args(argv)

    nprng = np.random.default_rng(args.seed)
    rng = random.Random(args.seed)
    fonts = font_files()
    bases = base_images(args.n_base, nprng)
    real = [n for n, _ in bases if n.startswith("real:")]
    print(f"bases: {len(bases)} ({len(real)} from real photos: {sorted(set(real))}); "
          f"fonts: {len(fonts)} TTF")  # fmt: skip

    items: list[tuple[Image.Image, int, str]] = []  # (image, label, kind)
    sources: list[str] = []
    metas: dict[int, dict[str, object]] = {}  # item index -> overlay parameters
    for src, im in bases:
        items.append((im, 0, "clean"))
        signed, kind = draw_sign(im, rng, fonts)
        items.append((signed, 0, kind))
        marked, kind, meta = draw_overlay(im, rng, fonts)
        metas[len(items)] = meta
        items.append((marked, 1, kind))
        sources += [src] * 3
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for i, (im, lab, kind) in enumerate(items):
            im.save(Path(args.save) / f"{i:04d}_{'pos' if lab else 'neg'}_{kind}.jpg", quality=90)

    ratio = [] if args.no_ratio else WatermarkConfig().ocr_ratio_passes
    cfg = WatermarkConfig(threads=args.threads, ocr_side=args.ocr_side,
                          ocr_achromatic_pass=not args.no_achromatic,
                          ocr_tophat_pass=not args.no_tophat, ocr_ratio_passes=ratio)  # fmt: skip
    t0 = time.perf_counter()
    filt = WatermarkFilter(cfg)
    filt.setup()
    load_s = time.perf_counter() - t0

    samples = [to_sample(i, im) for i, (im, _, _) in enumerate(items)]
    t0, c0 = time.perf_counter(), time.process_time()
    decisions = [filt.decide(s) for s in samples]
    run_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    p = np.array([d.scores.get("pwatermark_ocr", 0.0) for d in decisions])
    boxes = np.array([d.scores.get("ocr_boxes", 0.0) for d in decisions])
    y = np.array([lab for _, lab, _ in items])
    kinds = [k for _, _, k in items]
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())

    def rates(pred: np.ndarray) -> tuple[float, float]:
        return float(pred[y == 1].mean()), float(pred[y == 0].mean())

    mean_side = np.mean([max(i.size) for i, _, _ in items])
    print(f"\nOCR watermark detector (ocr_side={cfg.ocr_side}, threads={args.threads}): "
          f"load {load_s:.2f} s, {1000 * run_s / len(items):.0f} ms/img "
          f"({1000 * cpu_s / len(items):.0f} CPU ms/img) "
          f"over {len(items)} images (mean long side {mean_side:.0f})")  # fmt: skip
    print("threshold  recall  fpr")
    for th in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        r, f = rates(p >= th)
        mark = "  <- default" if abs(th - cfg.ocr_threshold) < 1e-9 else ""
        print(f"   {th:.1f}    {r:.3f}  {f:.3f}{mark}")
    recall, fpr = rates(p >= cfg.ocr_threshold)

    print("\nby kind (rate flagged at the default threshold):")
    for kind in sorted(set(kinds)):
        m = np.array([k == kind for k in kinds])
        rate = float((p[m] >= cfg.ocr_threshold).mean())
        print(f"  {kind:18s} n={int(m.sum()):3d}  flagged={rate:.2f}")
    print("by source (recall / fpr at the default threshold):")
    flag = p >= cfg.ocr_threshold
    for src in sorted(set(sources)):
        m = np.array([x == src for x in sources])
        pos, neg = m & (y == 1), m & (y == 0)
        print(f"  {src:32s} n_pos={int(pos.sum()):3d} recall={float(flag[pos].mean()):.2f}  "
              f"n_neg={int(neg.sum()):3d} fpr={float(flag[neg].mean()):.2f}")  # fmt: skip
    print_breakdown(metas, flag)
    passes = np.array([d.scores.get("ocr_pass", 0.0) for d in decisions])
    hit = flag & (y == 1)
    by_pass = "  ".join(f"{k}={int((hit & (passes == k)).sum())}" for k in (1, 2, 3, 4, 5))
    print(f"flagged positives by the OCR pass that flagged them: {by_pass}")
    ar, af = rates(boxes > 0)
    print(f"\nanchor 'any text detected = watermark': recall={ar:.3f} fpr={af:.3f}")
    flagged = p >= cfg.ocr_threshold
    missed = [
        (kinds[i], str(metas[int(i)]["text"]), round(float(p[i]), 2))
        for i in np.where((y == 1) & ~flagged)[0]
    ]
    false = [(kinds[i], round(float(p[i]), 2)) for i in np.where((y == 0) & flagged)[0]]
    print(f"missed positives: {missed}")
    print(f"false positives: {false}")
    unread = unread_misses(filt, samples, np.where((y == 1) & ~flagged)[0])
    ceiling = (int(flagged[y == 1].sum()) + len(missed) - len(unread)) / max(1, n_pos)
    print(
        f"missed positives in which no OCR pass reads a word (2+ letters): {len(unread)} of "
        f"{len(missed)}; recall if the cues flagged every positive with a word read: "
        f"{ceiling:.3f} (the detector's ceiling on this set)"
    )

    # speed anchor: rapidocr at its defaults (det min side 736, angle classifier on)
    sub = items[: args.anchor_n]
    from rapidocr import RapidOCR

    default_engine = RapidOCR(params={
        "Global.log_level": "error",
        "EngineConfig.onnxruntime.intra_op_num_threads": args.threads or -1,
    })  # fmt: skip
    t0 = time.perf_counter()
    for im, _, _ in sub:
        default_engine(np.ascontiguousarray(np.asarray(im)[:, :, ::-1]))
    anchor_ms = 1000 * (time.perf_counter() - t0) / max(1, len(sub))
    reader = OcrReader(cfg)
    t0 = time.perf_counter()
    for im, _, _ in sub:
        reader.scores(im)
    ours_ms = 1000 * (time.perf_counter() - t0) / max(1, len(sub))
    print(
        f"speed anchor on {len(sub)} images: rapidocr defaults {anchor_ms:.0f} ms/img, "
        f"ours {ours_ms:.0f} ms/img, ratio {anchor_ms / max(1e-9, ours_ms):.2f}x"
    )

    img_s = len(items) / run_s
    ok = recall >= 0.9 and fpr <= 0.05
    print(f"goal recall>=0.9 at fpr<=0.05: {'met' if ok else 'NOT met'}")
    print(f"RESULT watermark_eval recall={recall:.3f} fpr={fpr:.3f} n_pos={n_pos} n_neg={n_neg} "
          f"img_s={img_s:.2f} img_cpu_s={len(items) / cpu_s:.2f} "
          f"read_ceiling={ceiling:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
