"""A deterministic demo corpus: procedural photos on HTML pages with real-world licence markup.

Nothing is downloaded: images are procedural landscapes (sky gradient, sun,
ridged mountains, textured ground, objects, grain), varied in size and
aspect. Pages embed them with alt text and the licence markings users meet on
the web. Problems are planted on purpose and written to `truth.json`, so a
test can check that exactly the planted samples are dropped, for the right
reasons:

- `license`: pages marked BY-NC-ND 3.0, "All rights reserved", or nothing
- `duplicate`: exact byte copies, and resized / recompressed / cropped copies
- `watermark`: stock-photo text overlaid on otherwise clean photos
- `too_small`: thumbnails below the quality filter's minimum side
- `broken`: truncated, garbage and empty files, and HTML served as a JPEG
"""

from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# (style id, licence markup, expected licence id or None). The markup is what
# users meet on the web; the expected id is what the licence filter must find.
LICENSE_STYLES: list[tuple[str, str | None]] = [
    ("by-4.0-figure", "CC-BY-4.0"),
    ("by-sa-2.0-page", "CC-BY-SA-2.0"),
    ("cc0-page", "CC0-1.0"),
    ("pdm-page", "CC-PDM-1.0"),
    ("by-nc-nd-3.0-page", None),
    ("all-rights-reserved", None),
    ("none", None),
]
COMMERCIAL_STYLES = ["by-4.0-figure", "by-sa-2.0-page", "cc0-page", "pdm-page"]
BLOCKED_STYLES = ["by-nc-nd-3.0-page", "all-rights-reserved", "none"]

AUTHORS = ["Ana Ruiz", "Kofi Mensah", "Li Wei", "Maja Novak", "Tom Becker", "Sara Haddad"]
SUBJECTS = [
    "mountain lake",
    "valley at dawn",
    "hills under clouds",
    "coastal cliffs",
    "alpine meadow",
    "desert ridge",
    "forest edge",
    "winter peaks",
]


@dataclass
class PlantedImage:
    """One image URL on the demo site and what the pipeline must do with it."""

    path: str  # URL path on the demo server, e.g. /img/0001.jpg
    page: str  # URL path of the page that embeds it
    expected: str  # keep | license | duplicate | watermark | too_small | broken
    style: str  # licence style of its page
    group: str | None = None  # duplicate group: the original's path
    note: str = ""


@dataclass
class DemoCorpus:
    root: Path
    pages: list[str]
    images: list[PlantedImage]

    def truth(self) -> dict[str, PlantedImage]:
        return {img.path: img for img in self.images}


# ---------------------------------------------------------------- images --
def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    small = rng.random((max(2, h // cell), max(2, w // cell))).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def landscape(seed: int, width: int, height: int) -> Image.Image:
    """A photographic-looking procedural scene; every seed gives a distinct composition."""
    rng = np.random.default_rng(seed)
    h, w = height, width
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None]
    top = rng.uniform([20, 60, 140], [120, 170, 255])
    bottom = rng.uniform([150, 120, 90], [255, 230, 210])
    sky = top[None, None, :] * (1 - y[..., None]) + bottom[None, None, :] * y[..., None]
    sky = np.broadcast_to(sky, (h, w, 3)).copy()
    # sun / moon glow
    cx, cy, r = rng.uniform(0.1, 0.9) * w, rng.uniform(0.05, 0.45) * h, rng.uniform(0.04, 0.12) * w
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    glow = np.clip(1.5 - d / r, 0, 1)[..., None] * rng.uniform([200, 180, 120], [255, 255, 230])
    img = np.clip(sky + glow * 0.8, 0, 255)
    # ridged mountain layers, far to near
    horizon = rng.uniform(0.35, 0.75)
    xs = np.arange(w, dtype=np.float32)
    for layer in range(int(rng.integers(1, 4))):
        base = (horizon + 0.08 * layer) * h
        ridge = np.zeros(w, dtype=np.float32)
        for octave in range(5):
            freq = (octave + 1) * rng.uniform(0.5, 2.0) * 2 * math.pi / w
            ridge += (
                rng.uniform(0.02, 0.12)
                * h
                / (octave + 1)
                * np.sin(freq * xs + rng.uniform(0, 6.28))
            )
        top_edge = base - np.abs(ridge) * (1.5 - 0.3 * layer)
        mask = yy >= top_edge[None, :]
        colour = rng.uniform([30, 40, 30], [120, 130, 140]) * (1 - 0.25 * layer)
        shade = 0.75 + 0.25 * _smooth_noise(rng, h, w, 24)
        img = np.where(mask[..., None], colour[None, None, :] * shade[..., None], img)
    # textured ground
    ground_y = min(h - 1, int((horizon + 0.2) * h))
    tex = (
        _smooth_noise(rng, h, w, 2) * 0.35
        + _smooth_noise(rng, h, w, 6) * 0.35
        + _smooth_noise(rng, h, w, 40) * 0.3
    )
    ground = rng.uniform([40, 70, 20], [140, 150, 90])
    gmask = yy >= ground_y + 10 * np.sin(xx / w * rng.uniform(2, 8))
    img = np.where(gmask[..., None], ground[None, None, :] * (0.6 + 0.6 * tex[..., None]), img)
    # clouds: bright soft blobs in the sky
    clouds = np.clip(
        _smooth_noise(rng, h, w, int(rng.integers(20, 80))) * 2 - rng.uniform(0.6, 1.3), 0, 1
    )
    img = (
        img * (1 - clouds[..., None] * (yy < horizon * h)[..., None] * 0.7)
        + 230 * clouds[..., None] * (yy < horizon * h)[..., None] * 0.7
    )
    # light falloff from a random direction (vignette / side light)
    lx, ly = rng.uniform(-1, 1, 2)
    light = 0.75 + 0.35 * ((xx / w - 0.5) * lx + (yy / h - 0.5) * ly)
    img = img * light[..., None]
    # grain
    img = img + rng.normal(0, 7, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):  # trees, rocks, huts
        ox, oy = rng.uniform(0, w), rng.uniform(horizon * h, h)
        s = rng.uniform(0.02, 0.08) * w
        fill = tuple(int(c) for c in rng.integers(10, 90, 3))
        if rng.random() < 0.5:
            draw.polygon([(ox, oy - 3 * s), (ox - s, oy), (ox + s, oy)], fill=fill)
        else:
            draw.ellipse([ox - s, oy - s * 0.6, ox + s, oy + s * 0.6], fill=fill)
    if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return pil.filter(ImageFilter.GaussianBlur(0.4))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def watermark(img: Image.Image, seed: int) -> Image.Image:
    """Overlay stock-photo style watermark text: brand, tiled or diagonal, semi-transparent."""
    rng = random.Random(seed)
    brand = rng.choice(
        [
            "shutterstock",
            "Getty Images",
            "iStock",
            "alamy",
            "dreamstime",
            "123RF",
            "depositphotos",
            "Adobe Stock",
        ]
    )
    base = img.convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    w, h = base.size
    size = max(18, int(min(w, h) * rng.uniform(0.13, 0.18)))
    font = ImageFont.load_default(size=size)
    alpha = int(255 * rng.uniform(0.55, 0.8))
    box = draw.textbbox((0, 0), brand, font=font)
    tw, th = box[2] - box[0], box[3] - box[1]
    if rng.random() < 0.5:
        draw.text(((w - tw) / 2, (h - th) / 2), brand, font=font, fill=(255, 255, 255, alpha))
    else:
        for row in range(3):
            yy = (row + 0.5) * h / 3 - th / 2
            xx = (w - tw) / 2 + (row - 1) * tw * 0.25
            draw.text((xx, yy), brand, font=font, fill=(255, 255, 255, alpha))
    small = ImageFont.load_default(size=max(12, size // 3))
    draw.text(
        (8, h - size // 2 - 8), f"© {brand} / stock photo", font=small, fill=(255, 255, 255, alpha)
    )
    return Image.alpha_composite(base, layer).convert("RGB")


# ----------------------------------------------------------------- pages --
def _license_markup(style: str, author: str) -> tuple[str, str]:
    """(markup inside each figure, markup in the page footer/head) for a licence style."""
    if style == "by-4.0-figure":
        fig = (
            f'<figcaption>Photo by <span class="author">{author}</span>, '
            '<a rel="license" href="https://creativecommons.org/licenses/by/4.0/">CC BY 4.0</a>'
            "</figcaption>"
        )
        return fig, ""
    if style == "by-sa-2.0-page":
        return (
            f"<figcaption>{author}</figcaption>",
            '<footer>Content on this site is licensed under <a rel="license" '
            'href="http://creativecommons.org/licenses/by-sa/2.0/">CC BY-SA 2.0</a>.</footer>',
        )
    if style == "cc0-page":
        return (
            "",
            '<link rel="license" href="https://creativecommons.org/publicdomain/zero/1.0/">'
            "<footer>No rights reserved: CC0.</footer>",
        )
    if style == "pdm-page":
        return (
            "",
            "<footer>These scans are in the public domain: <a "
            'href="https://creativecommons.org/publicdomain/mark/1.0/">Public Domain Mark</a>'
            "</footer>",
        )
    if style == "by-nc-nd-3.0-page":
        return (
            "",
            '<footer><a rel="license" href="https://creativecommons.org/licenses/'
            'by-nc-nd/3.0/deed.en">CC BY-NC-ND 3.0</a></footer>',
        )
    if style == "all-rights-reserved":
        return (
            f"<figcaption>© 2021 {author}. All rights reserved.</figcaption>",
            "<footer>© 2021 Example Photo Agency. All rights reserved.</footer>",
        )
    return ("", "<footer>Thanks for visiting.</footer>")


def _page_html(title: str, style: str, author: str, imgs: list[tuple[str, str]]) -> str:
    fig_markup, page_markup = _license_markup(style, author)
    head_link = page_markup if page_markup.startswith("<link") else ""
    footer = page_markup.split(">", 1)[1] if head_link else page_markup
    figures = "\n".join(
        f'<figure><img src="{src}" alt="{alt}" loading="lazy">{fig_markup}</figure>'
        for src, alt in imgs
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"{head_link}</head><body><h1>{title}</h1>\n{figures}\n{footer}</body></html>"
    )


def generate(root: str | Path, n_images: int = 180, per_page: int = 8, seed: int = 0) -> DemoCorpus:
    """Write the corpus under `root` (img/, pages/, truth.json); same seed, same bytes."""
    root = Path(root)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "pages").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    planted: list[PlantedImage] = []
    blobs: dict[str, bytes] = {}
    content_types: dict[str, str] = {}
    counter = iter(range(10**6))

    def add(
        data: bytes,
        expected: str,
        style: str,
        ext: str = "jpg",
        group: str | None = None,
        note: str = "",
    ) -> PlantedImage:
        path = f"/img/{next(counter):04d}.{ext}"
        blobs[path] = data
        item = PlantedImage(path, "", expected, style, group, note)
        planted.append(item)
        return item

    def size() -> tuple[int, int]:
        aspect = rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0, 3 / 4, 2 / 3])
        long_side = rng.randint(360, 720)
        return (
            (long_side, int(long_side / aspect))
            if aspect >= 1
            else (int(long_side * aspect), long_side)
        )

    originals: list[tuple[PlantedImage, Image.Image]] = []
    n_blocked = n_images // 4
    for i in range(n_images):
        img = landscape(seed * 100_000 + i, *size())
        if i < n_blocked:
            style = BLOCKED_STYLES[i % len(BLOCKED_STYLES)]
            add(jpeg_bytes(img), "license", style)
        else:
            style = COMMERCIAL_STYLES[i % len(COMMERCIAL_STYLES)]
            originals.append((add(jpeg_bytes(img), "keep", style), img))
    # planted near and exact duplicates of kept originals (same licence style)
    for j, (orig, img) in enumerate(originals[: max(4, len(originals) // 3)]):
        kind = ["exact", "resized", "recompressed", "cropped"][j % 4]
        if kind == "exact":
            data = blobs[orig.path]
        elif kind == "resized":
            data = jpeg_bytes(
                img.resize((img.width * 2 // 3, img.height * 2 // 3), Image.Resampling.LANCZOS)
            )
        elif kind == "recompressed":
            data = jpeg_bytes(img, quality=45)
        else:
            dx, dy = img.width // 80, img.height // 80
            data = jpeg_bytes(img.crop((dx, dy, img.width - dx, img.height - dy)))
        add(data, "duplicate", orig.style, group=orig.path, note=kind)
    # watermarked stock-style photos (fresh scenes, licence otherwise fine)
    for k in range(max(4, n_images // 9)):
        img = landscape(seed * 100_000 + 50_000 + k, *size())
        add(jpeg_bytes(watermark(img, seed + k)), "watermark", COMMERCIAL_STYLES[k % 4])
    # thumbnails too small to train on
    for k in range(max(3, n_images // 18)):
        img = landscape(seed * 100_000 + 60_000 + k, rng.randint(24, 48), rng.randint(24, 48))
        add(jpeg_bytes(img), "too_small", COMMERCIAL_STYLES[k % 4])
    # broken files
    good = jpeg_bytes(landscape(seed * 100_000 + 70_000, 320, 240))
    add(good[: len(good) // 3], "broken", "cc0-page", note="truncated jpeg")
    add(bytes(rng.getrandbits(8) for _ in range(4096)), "broken", "cc0-page", note="random bytes")
    add(b"", "broken", "by-4.0-figure", note="empty file")
    html_as_img = add(
        b"<html><body>Not found</body></html>",
        "broken",
        "by-4.0-figure",
        note="html served as image",
    )
    content_types[html_as_img.path] = "text/html"

    # pages: originals first, then copies, so "earliest seen" keeps the original
    by_style: dict[str, list[PlantedImage]] = {}
    for item in planted:
        by_style.setdefault(item.style, []).append(item)
    pages: list[str] = []
    for style, items in sorted(by_style.items(), key=lambda kv: kv[0]):
        items.sort(key=lambda it: (it.expected == "duplicate", it.path))
        for p in range(0, len(items), per_page):
            chunk = items[p : p + per_page]
            page_path = f"/pages/{style}-{p // per_page:02d}.html"
            author = rng.choice(AUTHORS)
            alts = []
            for it in chunk:
                it.page = page_path
                alts.append((it.path, f"{rng.choice(SUBJECTS)} photographed by {author}"))
            (root / page_path.lstrip("/")).write_text(
                _page_html(f"{style} gallery {p // per_page}", style, author, alts),
                encoding="utf-8",
            )
            pages.append(page_path)
    # originals must precede their copies in page order, whatever the style names
    pages.sort(
        key=lambda pth: (any(it.page == pth and it.expected == "duplicate" for it in planted), pth)
    )
    for path, data in blobs.items():
        (root / path.lstrip("/")).write_bytes(data)
    (root / "content_types.json").write_text(json.dumps(content_types, indent=1))
    (root / "robots.txt").write_text("User-agent: *\nAllow: /\n")
    corpus = DemoCorpus(root, pages, planted)
    (root / "truth.json").write_text(
        json.dumps({"pages": pages, "images": [asdict(i) for i in planted]}, indent=1)
    )
    return corpus


def load(root: str | Path) -> DemoCorpus:
    root = Path(root)
    data = json.loads((root / "truth.json").read_text())
    return DemoCorpus(root, data["pages"], [PlantedImage(**d) for d in data["images"]])
