"""Decoded pixels as 8-bit RGB: the one conversion rule of ingest, the filters and the report."""

from __future__ import annotations

import numpy as np
from PIL import Image


def to_rgb(img: Image.Image) -> Image.Image:
    """Any decoded image as 8-bit RGB, the one rule for ingest and the filters: alpha and
    transparency keys composited on white; 16-bit and 32-bit grey scaled to 8 bits (Pillow's
    `convert` clips them at 255: nearly white); float images in [0, 1] scaled by 255."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img)
        if mode == "F":
            lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
            if lo >= 0.0 and hi <= 1.0:
                arr = arr * 255.0
            out = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
        else:
            arr = arr.astype(np.int64)
            if mode != "I" or int(arr.max(initial=0)) > 255:
                arr = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535
            out = np.clip(arr, 0, 255).astype(np.uint8)
        return Image.fromarray(out, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
