"""Stock-style text overlays for watermark tests: one way to draw them."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont


def text_overlay(
    im: Image.Image,
    text: str,
    font_file: str,
    size: int,
    opacity: float,
    angle: float,
    fill: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """`text` in `fill` at `opacity`, centred, rotated by `angle` degrees."""
    w, h = im.size
    big = int(math.hypot(w, h)) + 2
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    f = ImageFont.truetype(font_file, size)
    x0, y0, x1, y1 = (int(v) for v in d.textbbox((0, 0), text, font=f))
    d.text(
        (big // 2 - (x1 - x0) // 2 - x0, big // 2 - (y1 - y0) // 2 - y0),
        text,
        font=f,
        fill=(*fill, int(255 * opacity)),
    )
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC)
    left, top = (big - w) // 2, (big - h) // 2
    layer = layer.crop((left, top, left + w, top + h))
    return Image.alpha_composite(im.convert("RGBA"), layer).convert("RGB")
