"""JPEG decoding on the training device: the loader's CPU cost per sample without the decode.

With `[train] jpeg_decode = "device"` the loader workers leave every JPEG that the
GPU's decoder takes as it is (baseline, 8-bit, grey or YCbCr, no EXIF rotation: what
ccurate's releases store) and not much larger than the training size, and copy only
its bytes into the batch; the rest (PNG, WebP, progressive or CMYK JPEG, rotated phone
photos, large originals that a DCT-scaled decode shrinks cheaply) they decode
themselves as before. The trainer's process then finishes each batch (`DeviceJpegDecoder`):
one batched `torchvision.io.decode_jpeg` call (nvJPEG; on A100/H100/H200 its
hardware JPEG engines), then the same covering resize + centre crop and flip as the
workers' path, on the device, into one channels-last uint8 batch.

Why: decoding is ~85 % of a loader worker's time per 256-px sample
(`bench/shard_read.py`), so a 2-core host tops out near 5,000 samples/s on the CPU; the
GPU decodes a batch of 64 in about a millisecond. On a CPU (CI, tests) the same code
runs with torchvision's libjpeg decoder: slower than the workers' path, never wrong.

Pixels differ slightly from the workers' decode (another IDCT, and `fast_jpeg` applies to
the workers' decode only; antialiased bilinear
instead of OpenCV's area filter when shrinking, bicubic either way when enlarging), as
two JPEG decoders always do. Any image the device decoder refuses is decoded on the
CPU here (the workers' path); an image neither decodes is a bad sample, trained as a
stand-in (a good sample of its batch, pixels and caption) and counted, as in the
workers' path; a batch with no usable sample is skipped and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ccurate.pixels import jpeg_orientation, jpeg_segments

# frame headers the hardware (and the batched CUDA) path decodes: baseline and extended
# sequential Huffman. Progressive (0xC2) works too, but torchvision then parses it on the
# host one image at a time in the trainer's process: the workers decode those instead
_SEQUENTIAL = (0xC0, 0xC1)


def device_jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device decoder takes as it is; None for anything
    else (not a JPEG, progressive/lossless/arithmetic, 12-bit, CMYK or Adobe-RGB, an
    EXIF orientation other than 1, a cut header). One pass over the header segments:
    a few µs, cheap enough for every sample of a loader worker."""
    size: tuple[int, int] | None = None
    if jpeg_orientation(data) != 1:  # type: ignore[arg-type]
        return None
    for marker, start, length in jpeg_segments(data):  # type: ignore[arg-type]
        if marker == 0xEE and length >= 12 and bytes(data[start : start + 5]) == b"Adobe":
            if data[start + 11] == 0:  # transform 0: RGB or CMYK stored as is
                return None
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SEQUENTIAL or length < 6 or start + 6 > len(data):
                return None
            precision, comps = data[start], data[start + 5]
            h = int.from_bytes(data[start + 1 : start + 3], "big")
            w = int.from_bytes(data[start + 3 : start + 5], "big")
            if precision != 8 or comps not in (1, 3) or not h or not w:
                return None
            size = (h, w)
        elif marker == 0xDA:
            return size
    return None  # no scan: a cut or broken header


# a deferred JPEG is at most this many times the training size in pixels: a larger one the
# workers decode at a reduced DCT scale (1/2..1/8) far cheaper than the device decodes it
# whole, and a header declaring a huge image must not size a device allocation
MAX_DEFER_AREA = 16


def defer_to_device(size: tuple[int, int] | None, height: int, width: int) -> bool:
    """Whether a JPEG of `size` (from `device_jpeg_size`) is left to the device for a
    (height, width) batch: the workers' decode could not shrink it in the DCT (it is less
    than twice the size needed on one side) and its area is at most `MAX_DEFER_AREA` times
    the batch's. Release JPEGs stored at the training size always are."""
    if size is None:
        return False
    h0, w0 = size
    return max(width / w0, height / h0) > 0.5 and h0 * w0 <= MAX_DEFER_AREA * height * width


def cover_crop_chw(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """CHW uint8 pixels resized to cover (height, width) keeping the aspect ratio, then
    centre-cropped: the device twin of `ccurate.train.decode._cover_crop`, same rounding."""
    h1, w1 = int(img.shape[-2]), int(img.shape[-1])
    s = max(width / w1, height / h1)
    nw, nh = max(width, round(w1 * s)), max(height, round(h1 * s))
    if (nw, nh) != (w1, h1):
        x = img.unsqueeze(0).float()
        if s < 1:  # shrinking: antialiased, as OpenCV's area filter averages
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True)
        else:
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False)
        img = x.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
    left, top = (nw - width) // 2, (nh - height) // 2
    return img[:, top : top + height, left : left + width]


def device_decode_error(device: torch.device | str) -> str | None:
    """Why JPEGs cannot be decoded on `device` (a torchvision built without nvJPEG, say),
    or None when a test image decodes there. Checked once before training, so that a
    device that cannot decode fails or falls back loudly, not image by image."""
    import io

    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 60)).save(buf, "JPEG", quality=95)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    try:
        img = decode_jpeg([data], mode=ImageReadMode.RGB, device=torch.device(device))[0]
    except (RuntimeError, ValueError, TypeError) as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if tuple(img.shape) != (3, 8, 16) or abs(int(img[0, 4, 8]) - 200) > 8:
        return f"a test image decoded wrong on {device}"
    return None


class DeviceJpegDecoder:
    """Finishes the batches of a loader whose workers deferred their JPEGs (`Decoder` with
    `defer_jpeg`): decodes them on `device`, places every row, applies stand-ins for bad
    rows. A batch without deferred JPEGs passes through unchanged."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.decoded = 0  # JPEGs decoded on the device
        self.cpu_fallback = 0  # JPEGs the device decoder refused, decoded on the CPU here

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        d = batch.pop("deferred", None)
        if d is None:
            return batch
        from ccurate.train.decode import BadBatch

        h, w = int(d["hw"][0]), int(d["hw"][1])
        n = len(batch["keys"])
        jpeg: torch.Tensor = batch.pop("jpeg")
        out = torch.empty((n, h, w, 3), dtype=torch.uint8, device=self.device)
        cpu_rows: list[int] = list(d["pixel_rows"])
        bad_rows: list[int] = list(d["bad_rows"])
        if cpu_rows:  # decoded by the workers: NCHW views of NHWC rows
            pixels = batch["pixels"].permute(0, 2, 3, 1)
            worker_bad = set(bad_rows)
            ok_idx = [j for j, r in enumerate(cpu_rows) if r not in worker_bad]
            if ok_idx:
                rows = torch.tensor([cpu_rows[j] for j in ok_idx], device=self.device)
                out[rows] = pixels[ok_idx].to(self.device, non_blocking=True)
        rows_j: Sequence[int] = d["jpeg_rows"]
        datas = [jpeg[s : s + length] for s, length in d["jpeg_spans"]]
        images = self._decode(datas)
        error = d.get("error", "")
        for row, img, data in zip(rows_j, images, datas, strict=True):
            try:
                # None: the device decoder refused it, decoded the workers' way here
                img = self._decode_on_cpu(data, h, w) if img is None else cover_crop_chw(img, h, w)
                out[row] = img.permute(1, 2, 0)
            except Exception as exc:  # neither decodes it: a bad sample, as in the workers
                error = error or f"{batch['keys'][row]}: {exc}"
                bad_rows.append(row)
        flips = list(d["flip_rows"])
        if flips:  # the workers flipped their own rows already
            idx = torch.tensor(flips, device=self.device)
            out[idx] = out[idx].flip(2)
        bad_set = set(bad_rows)
        ok = [i for i in range(n) if i not in bad_set]
        if not ok:
            raise BadBatch(list(batch["keys"]), error or "no decodable image")
        if bad_rows:
            good = ok[0]
            idx = torch.tensor(sorted(bad_set), device=self.device)
            out[idx] = out[good].clone()
            captions = batch["captions"]
            for i in bad_set:
                captions[i] = captions[good]
            ids = batch.get("input_ids")
            if isinstance(ids, torch.Tensor):
                ids[sorted(bad_set)] = ids[good].clone()
            batch["empty"] = captions.count("")
            batch["bad"] = [batch["keys"][i] for i in sorted(bad_set)]  # in row order
        batch["pixels"] = out.permute(0, 3, 1, 2)
        return batch

    def _decode(self, datas: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Device decodes of `datas`; None where the device decoder refuses one."""
        if not datas:
            return []
        from torchvision.io import ImageReadMode, decode_jpeg

        on = "cuda" if self.device.type == "cuda" else "cpu"
        dev = self.device if on == "cuda" else "cpu"
        if on == "cuda":
            # torchvision decodes on a stream of its own into memory allocated on ours, without
            # waiting for ours: memory just freed here (the last batch's resize temporaries)
            # must be done with first (pytorch/vision#9606)
            torch.cuda.current_stream(self.device).synchronize()
        try:
            imgs = decode_jpeg(datas, mode=ImageReadMode.RGB, device=dev)
            self.decoded += len(datas)
            return [im.to(self.device) for im in imgs]
        except RuntimeError:  # one image spoils the batched call: find it
            out: list[torch.Tensor | None] = []
            for data in datas:
                try:
                    im = decode_jpeg(data, mode=ImageReadMode.RGB, device=dev)
                    out.append(im.to(self.device))
                    self.decoded += 1
                except RuntimeError:
                    out.append(None)
            return out

    def _decode_on_cpu(self, data: torch.Tensor, h: int, w: int) -> torch.Tensor:
        from ccurate.train.decode import decode_resize_crop

        self.cpu_fallback += 1
        arr = decode_resize_crop(data.numpy().tobytes(), h, w)
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).to(self.device)
