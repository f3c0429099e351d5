"""NSFW filtering with NudeNet, and optional face blurring of the stored image.

NudeNet's detector (YOLO-style ONNX, `320n.onnx`, ships in the nudenet wheel)
is run through our own onnxruntime session so we control threads and batch
several images per call. Preprocessing reproduces `NudeDetector.detect` (pad
to a square at the bottom/right, resize to 320, /255) including its channel
order: nudenet 3.4.2 swaps a 3-channel BGR image with COLOR_RGBA2BGR and then
again in blobFromImage, so the network sees BGR; we feed BGR too, so our scores
equal NudeDetector's (and thresholds calibrated on it carry over). Each anchor is
assigned its best class (as NudeNet does); `nsfw` is the highest score of an
anchor whose class is one of `classes` (the exposed classes by default), 0 when
none, and `person` the highest face score.

A sample drops `nsfw` when `nsfw >= threshold_alone`, or when `nsfw >=
threshold` and a person is seen (`person >= person_min`). The second rule exists
because the small 320 px detector fires on round bright blobs: on the demo's
procedural landscapes (no people) the sun scores up to 0.79 as
FEMALE_BREAST_EXPOSED, with face scores <= 0.34, and a plain 0.5 threshold drops
~10% of them. Set `threshold_alone = threshold` for the plain rule.

Face blurring (off by default) uses the same detections' FACE_FEMALE/FACE_MALE
boxes — a learned detector that ships in the wheel, stronger than OpenCV's Haar
cascade, which is the alternative (`face_detector = "haar"`). Faces are
Gaussian-blurred in place; the hashes keep describing what ingest saw, unblurred:
`sha256` the downloaded file (provenance), `pixel_sha256`/`phash`/`dhash` its ingested
pixels (dedup, takedown matching). Scores: `faces` (found) and `faces_blurred`.

What ships is what was judged. The detector sees one frame's upright pixels, but a
file kept as downloaded (`[ingest] keep_original`) can carry more: an EXIF thumbnail
of the uncropped photo, maker-note previews, GPS, XMP and APP13 blocks, further
frames (animated WebP/PNG/GIF, MPO). So with `blur_faces` every kept image is
re-encoded (`safe_reencode`), faces or not, unless it is ccurate's own encode of the
resized pixels (no metadata) with no face; without it every multi-frame one is:
the judged first frame only, upright, with descriptive EXIF (creator, copyright,
camera) and an RGB colour profile, nothing else. Scores `reencoded` (1 when the
stored bytes were replaced) and `frames` (when the file had more than one). A re-encode
costs one full-size copy at most (the filters' decode is reused, boxes are blurred in
place, a palette frame keeps its palette); an image above `max_pixels` is not re-encoded
but dropped (`decompression_bomb`), so the memory `resources` declares holds.

A BY-ND work whose faces would be blurred is dropped (`nd_needs_blur`): the blurred
image is an adaptation, which ND does not allow to share.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple

import cv2
import numpy as np
from PIL import Image
from pydantic import Field, field_validator, model_validator

from ccurate.configbase import Section
from ccurate.filters.images import DecodeError, decode_rgb
from ccurate.filters.licenses import normalize
from ccurate.pixels import (
    MAX_PIXELS,
    ORIENTATION_TAG,
    bare,
    has_alpha,
    open_image,
    save_jpeg,
    to_rgb,
    to_rgba,
    upright,
)
from ccurate.record import Decision, Sample
from ccurate.stage import Filter, Resources

log = logging.getLogger("ccurate.filters")

REASONS: dict[str, str] = {
    "decode_error": "the image bytes could not be decoded",
    "nsfw": "NudeNet's highest exposed-class score >= safety.threshold_alone, or >= "
    "safety.threshold with a face >= safety.person_min",
    "nd_needs_blur": "a no-derivatives (ND) licensed image with faces to blur (safety.blur_faces): "
    "the blurred image would be an adaptation, which ND does not allow to share",
    "decompression_bomb": "an image the filter must re-encode (faces to blur, or a file kept as "
    "downloaded with more than what was judged) has more than safety.max_pixels pixels",
}

LABELS: list[str] = [
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED",
    "BELLY_COVERED", "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE",
    "BELLY_EXPOSED", "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
]  # fmt: skip
"""NudeNet 3.4's class order (the ONNX output rows 4..21)."""

EXPOSED: list[str] = [
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
]  # fmt: skip
"""Default NSFW classes; exposed belly/feet/armpits/male chest are beach photos, not NSFW."""

FACES = ("FACE_FEMALE", "FACE_MALE")


class SafetyConfig(Section):
    """[filters.safety]: NudeNet NSFW threshold and optional face blurring."""

    enabled: bool = True
    threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # `nsfw` that drops with a person
    threshold_alone: Annotated[float, Field(ge=0.0, le=1.0)] = 0.85  # `nsfw` that drops alone
    person_min: Annotated[float, Field(ge=0.0, le=1.0)] = 0.4  # face score that is a person
    classes: list[str] = Field(default_factory=lambda: list(EXPOSED))
    model_path: str | None = None  # default: the 320n.onnx inside the nudenet wheel
    # the model's input side; a multiple of 32 (the detector's stride)
    resolution: Annotated[int, Field(ge=32, le=2048)] = 320
    threads: Annotated[int, Field(ge=0)] = 1  # onnxruntime intra-op threads; 0 = all cores
    batch_size: Annotated[int, Field(ge=1)] = 8
    blur_faces: bool = False
    face_detector: Literal["nudenet", "haar"] = "nudenet"
    face_min_score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.35
    jpeg_quality: Annotated[int, Field(ge=50, le=100)] = 95  # re-encoding after blurring
    # an image to re-encode above this drops `decompression_bomb` (sizes `resources`)
    max_pixels: Annotated[int, Field(gt=0)] = MAX_PIXELS

    @field_validator("classes")
    @classmethod
    def _known_classes(cls, v: list[str]) -> list[str]:
        # no classes would score every image `nsfw = 0`: the filter keeps everything while
        # the recorded settings say it is on
        if not v:
            raise ValueError(
                "[filters.safety] classes = []: no class could ever make an image NSFW, so "
                "nothing would be dropped while the filter reads as enabled; list at least one "
                f"class (default {EXPOSED}), or set enabled = false to turn NSFW filtering off"
            )
        unknown = sorted(set(v) - set(LABELS))
        if unknown:
            raise ValueError(f"unknown NudeNet classes {unknown}; known: {LABELS}")
        return v

    @field_validator("resolution")
    @classmethod
    def _resolution_fits_the_model(cls, v: int) -> int:
        # the YOLO detector downsamples by 32 and concatenates feature maps: another side
        # validates here but fails in onnxruntime on the first batch, mid-run
        if v % 32:
            raise ValueError(
                f"[filters.safety] resolution = {v}: NudeNet's detector needs a multiple of 32 "
                f"(default 320; e.g. {max(32, v // 32 * 32)} or {v // 32 * 32 + 32})"
            )
        return v

    @model_validator(mode="after")
    def _alone_is_the_stricter_rule(self) -> SafetyConfig:
        # `threshold_alone` drops without a person, so it must ask for at least as much as
        # `threshold` does with one; below it, `threshold` and `person_min` could never matter
        if self.threshold_alone < self.threshold:
            raise ValueError(
                f"[filters.safety] threshold_alone = {self.threshold_alone} is below threshold "
                f"= {self.threshold}: then threshold and person_min never matter (any score >= "
                "threshold_alone drops, person or not). Set threshold_alone >= threshold; "
                "threshold_alone = threshold gives the plain single-threshold rule"
            )
        return self

    @model_validator(mode="after")
    def _blur_needs_the_filter(self) -> SafetyConfig:
        # faces are found by this filter's detector: turned off, it would blur nothing
        # while the recorded settings said `blur_faces = true`
        if self.blur_faces and not self.enabled:
            raise ValueError(
                "[filters.safety] blur_faces = true needs enabled = true (faces are found "
                "by the safety filter's detector; disabled, it would blur nothing): set "
                "enabled = true, or blur_faces = false"
            )
        return self


def default_model_path() -> Path:
    import nudenet

    return Path(nudenet.__file__).resolve().parent / "320n.onnx"


_BAND_ROWS = 256
"""Rows of a Pillow image copied at a time into the detector's input (`NudeNetScorer.blob`)."""

DETECTOR_COPY_BYTES_PER_PIXEL = 3
"""Transient memory of `NudeNetScorer.blob` per image pixel: one uint8 RGB copy, padded."""

DETECTOR_BYTES_PER_INPUT_PIXEL = 100
"""onnxruntime's working memory per pixel of a detector run (batch x resolution^2), measured
96 B: 70 MB for a chunk of 8 at 320, 3.2 GB for 8 at 2048 (`SafetyFilter.resources`)."""


def _row_bands(rgb: np.ndarray | Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, pixels) of an image, `_BAND_ROWS` rows at a time: a band copied at most."""
    if isinstance(rgb, np.ndarray):
        for y0 in range(0, rgb.shape[0], _BAND_ROWS):
            yield y0, rgb[y0 : y0 + _BAND_ROWS]
    else:
        for y0 in range(0, rgb.height, _BAND_ROWS):
            yield y0, np.asarray(rgb.crop((0, y0, rgb.width, min(rgb.height, y0 + _BAND_ROWS))))


class Blob(NamedTuple):
    """One image as the detector takes it ([3, r, r] float32, 1.2 MB at 320) and the scale
    back to its pixels: what a batch keeps of each image instead of its full-size decode."""

    tensor: np.ndarray
    scale: float


class NudeNetScorer:
    """NudeNet's ONNX detector with batched, NudeDetector-equivalent pre/post-processing."""

    def __init__(self, model_path: str | None = None, resolution: int = 320, threads: int = 1):
        self.model_path = Path(model_path) if model_path else default_model_path()
        self.resolution = resolution
        self.threads = threads
        self._session: Any = None

    def setup(self) -> None:
        if self._session is not None:
            return
        if not self.model_path.is_file():
            raise FileNotFoundError(
                f"safety.model_path: NudeNet model not found at {self.model_path} "
                "(the default 320n.onnx ships in the nudenet wheel: pip install nudenet==3.4.2)"
            )
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            str(self.model_path), opts, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def blob(self, rgb: np.ndarray | Image.Image) -> Blob:
        """The detector's input of an RGB image (array or Pillow image): NudeDetector's
        zero-pad to a square at the bottom/right, INTER_LINEAR resize to `resolution`, BGR.

        Bit-identical to resizing the padded square, without allocating it (a panorama's
        square is many times its size): the image, with a zero margin wider than one source
        step where the square is padded, is resized at the square's scale (`fx`), so cv2
        samples the same pixels or zeros; the rest of the square is zero. The channel swap
        commutes with the resize. Memory: one copy of the image (3 B/px), filled in bands."""
        w, h = rgb.size if isinstance(rgb, Image.Image) else (rgb.shape[1], rgb.shape[0])
        side, r = max(h, w), self.resolution
        margin = math.ceil(side / r) + 2
        ph, pw = (h + (margin if h < side else 0), w + (margin if w < side else 0))
        padded = np.zeros((ph, pw, 3), np.uint8)
        for y0, band in _row_bands(rgb):
            padded[y0 : y0 + len(band), :w] = band
        small = cv2.resize(padded, (0, 0), fx=r / side, fy=r / side, interpolation=cv2.INTER_LINEAR)
        del padded
        square = np.zeros((r, r, 3), np.uint8)
        sh, sw = min(r, small.shape[0]), min(r, small.shape[1])
        square[:sh, :sw] = small[:sh, :sw, ::-1]  # BGR, as NudeDetector feeds it (module doc)
        return Blob(square.transpose(2, 0, 1).astype(np.float32) / 255.0, side / r)

    def raw(
        self, images: Sequence[np.ndarray | Image.Image | Blob]
    ) -> list[tuple[np.ndarray, float]]:
        """Per image (or its `blob`, made beforehand): (anchors [N, 4 + classes] in model
        coordinates, scale to pixels)."""
        self.setup()
        blobs = [im if isinstance(im, Blob) else self.blob(im) for im in images]
        out = self._session.run(None, {self._input: np.stack([b.tensor for b in blobs])})[0]
        return [(out[i].T, blobs[i].scale) for i in range(len(blobs))]

    @staticmethod
    def class_max(anchors: np.ndarray) -> dict[str, float]:
        """Highest score per class over anchors assigned to that class (NudeNet's argmax)."""
        cls = anchors[:, 4:]
        best = cls.argmax(axis=1)
        score = cls.max(axis=1)
        out: dict[str, float] = {}
        for k, label in enumerate(LABELS[: cls.shape[1]]):
            sel = score[best == k]
            out[label] = float(sel.max()) if sel.size else 0.0
        return out

    @staticmethod
    def boxes(
        anchors: np.ndarray, scale: float, labels: tuple[str, ...], min_score: float
    ) -> list[tuple[int, int, int, int, float]]:
        """NMS'd (x, y, w, h, score) in pixels of the anchors whose best class is in `labels`."""
        cls = anchors[:, 4:]
        best = cls.argmax(axis=1)
        score = cls.max(axis=1)
        ids = [LABELS.index(lab) for lab in labels]
        sel = np.where(np.isin(best, ids) & (score >= min_score))[0]
        if sel.size == 0:
            return []
        cx, cy, bw, bh = (anchors[sel, j] * scale for j in range(4))
        rects = [[float(x - w / 2), float(y - h / 2), float(w), float(h)]
                 for x, y, w, h in zip(cx, cy, bw, bh, strict=True)]  # fmt: skip
        keep = cv2.dnn.NMSBoxes(rects, [float(s) for s in score[sel]], min_score, 0.45)
        out = []
        for i in np.asarray(keep).reshape(-1):
            x, y, w, h = rects[int(i)]
            out.append((round(x), round(y), round(w), round(h), float(score[sel][int(i)])))
        return out


@functools.lru_cache(maxsize=1)
def _haar() -> cv2.CascadeClassifier:
    path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
    return cv2.CascadeClassifier(path)


def haar_faces(rgb: np.ndarray) -> list[tuple[int, int, int, int, float]]:
    """OpenCV's shipped frontal-face Haar cascade (the non-learned alternative)."""
    cascade = _haar()
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    found = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(20, 20))
    return [(int(x), int(y), int(w), int(h), 1.0) for x, y, w, h in found]


def _blur_boxes(
    w: int, h: int, boxes: list[tuple[int, int, int, int, float]]
) -> Iterator[tuple[int, int, int, int, float]]:
    """(x0, y0, x1, y1, sigma) of each box grown by 15%, clipped; boxes too thin skipped."""
    for x, y, bw, bh, _ in boxes:
        gx, gy = int(0.15 * bw), int(0.15 * bh)
        x0, y0 = max(0, x - gx), max(0, y - gy)
        x1, y1 = min(w, x + bw + gx), min(h, y + bh + gy)
        if x1 - x0 < 2 or y1 - y0 < 2:
            continue
        yield x0, y0, x1, y1, max(2.0, max(x1 - x0, y1 - y0) / 6.0)


def _blur(roi: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(roi, (0, 0), sigmaX=sigma, sigmaY=sigma)


def blur_regions(
    arr: np.ndarray, boxes: list[tuple[int, int, int, int, float]]
) -> tuple[np.ndarray, int]:
    """Strong Gaussian blur over each box grown by 15% (colour channels only; alpha kept),
    on a copy of `arr`."""
    out = arr.copy()
    n = 0
    for x0, y0, x1, y1, sigma in _blur_boxes(arr.shape[1], arr.shape[0], boxes):
        out[y0:y1, x0:x1, :3] = _blur(out[y0:y1, x0:x1, :3], sigma)
        n += 1
    return out, n


def blur_image(img: Image.Image, boxes: list[tuple[int, int, int, int, float]]) -> int:
    """`blur_regions` in place on an RGB or RGBA image, box by box: memory of the boxes only,
    not of another full-size copy. Returns the boxes blurred."""
    n = 0
    for x0, y0, x1, y1, sigma in _blur_boxes(img.width, img.height, boxes):
        roi = np.array(img.crop((x0, y0, x1, y1)))
        roi[..., :3] = _blur(roi[..., :3], sigma)
        img.paste(Image.fromarray(roi, img.mode), (x0, y0))
        n += 1
    return n


# EXIF tags a re-encoded image keeps: who made it and with what, in plain text. Everything
# else goes: GPS, the IFD1 thumbnail, the Exif IFD (maker notes hold previews), XMP/IPTC/
# Photoshop blocks, sub-IFDs.
SAFE_EXIF_TAGS = (
    0x010E,  # ImageDescription
    0x010F,  # Make
    0x0110,  # Model
    0x0131,  # Software
    0x0132,  # DateTime
    0x013B,  # Artist
    0x8298,  # Copyright
)


def _safe_exif(im: Image.Image) -> bytes:
    """The `SAFE_EXIF_TAGS` of an image, orientation 1 (its pixels are written upright)."""
    try:
        src = im.getexif()
        out = Image.Exif()
        for tag in SAFE_EXIF_TAGS:
            if isinstance(src.get(tag), str):
                out[tag] = src[tag]
        if out or ORIENTATION_TAG in src:
            out[ORIENTATION_TAG] = 1
        return out.tobytes() if out else b""
    except Exception:  # a corrupt EXIF block (Pillow raises many types): keep none of it
        return b""


def frame_count(data: bytes) -> int:
    """Frames in an image file (animated WebP/PNG/GIF, MPO: more than 1), from its headers."""
    with Image.open(io.BytesIO(data)) as im:
        return int(getattr(im, "n_frames", 1) or 1)


REENCODE_BYTES_PER_PIXEL = 16
"""Peak memory of `safe_reencode` per pixel, over the decode the filters already hold
(measured: 8-11 B on RGB/RGBA PNG and JPEG with a face blurred, 2 B on a palette GIF):
what `SafetyFilter.resources` declares for `max_pixels`."""


def safe_reencode(
    data: bytes,
    boxes: list[tuple[int, int, int, int, float]],
    jpeg_quality: int = 95,
    max_pixels: int = MAX_PIXELS,
) -> tuple[bytes, str, int]:
    """The first frame, upright, `boxes` blurred, re-encoded in the image's own format with
    only safe metadata (see the module doc) -> (bytes, mime, boxes blurred).

    Boxes are in the upright frame (the filters decode with EXIF orientation applied). Alpha
    is kept, but colour under fully transparent pixels, which the detector saw as white, is
    made white, before blurring so that it cannot bleed into visible pixels; a CMYK or grey
    colour profile no longer fits the RGB pixels and is dropped.
    16-bit greys are scaled as the filters judged them (`to_rgb`), opaque.

    Memory: one full-size copy at most (`REENCODE_BYTES_PER_PIXEL`). An opaque image reuses
    the filters' decode (`decode_rgb`), copied only to blur; a palette frame without boxes
    keeps its palette (no quantising); boxes are blurred in place. Above `max_pixels` it
    raises `DecompressionBombError` before decoding."""
    im = open_image(data, max_pixels)
    out: Image.Image | None = None
    try:
        fmt = "JPEG" if im.format == "MPO" else im.format or "PNG"
        meta: dict[str, Any] = {}
        exif = _safe_exif(im)
        if exif:
            meta["exif"] = exif
        icc = im.info.get("icc_profile")
        if icc and im.mode in ("RGB", "RGBA"):
            meta["icc_profile"] = icc
        palette = not boxes and fmt in ("GIF", "PNG") and im.mode in ("P", "L")
        palette = palette and not (im.mode == "L" and "transparency" in im.info)
        if palette or has_alpha(im):
            im.load()  # the first frame
            out = upright(im)
            if out is not im:
                im.close()
            if palette:
                _whiten_palette(out)
            else:
                rgba = to_rgba(out)
                if rgba is not out:
                    out.close()
                out = rgba
    finally:
        if out is not im:
            im.close()
    if out is None:  # opaque: the pixels the filters judged (their cached decode, shared)
        out = decode_rgb(data)
        if boxes:
            out = out.copy()
    if out.mode == "RGBA":
        # white under full transparency (what the detector saw) before blurring: blurred
        # first, the hidden never-judged colour would bleed into the visible box pixels
        _whiten_transparent(out)
    n = blur_image(out, boxes)
    if n and out.mode == "RGBA":  # the blur spread visible colour under transparent pixels
        _whiten_transparent(out)
    # encoders read comments, XMP and profiles from `info` too: only `meta` may ship
    if out.info:  # not the shared decode, whose info is empty
        bare(out)
    buf = io.BytesIO()
    try:
        if fmt == "JPEG":
            save_jpeg(to_rgb(out), buf, jpeg_quality, **meta)
        elif fmt == "GIF":
            (out if out.mode in ("P", "L") else to_rgb(out).quantize(256)).save(buf, "GIF")
        elif fmt == "WEBP":
            out.save(buf, "WEBP", quality=jpeg_quality, **meta)
        else:
            out.save(buf, fmt, **meta)
    except (OSError, KeyError, ValueError):
        fmt = "PNG"
        buf = io.BytesIO()
        out.save(buf, "PNG", **meta)
    return buf.getvalue(), Image.MIME.get(fmt, "image/png"), n


def _whiten_transparent(im: Image.Image) -> None:
    """RGB under fully transparent pixels of an RGBA image made white, in place."""
    mask = im.getchannel("A").point(lambda a: 255 if a == 0 else 0)
    im.paste((255, 255, 255, 0), mask=mask)


def _whiten_palette(im: Image.Image) -> None:
    """Palette entries that are fully transparent made white (what the detector saw)."""
    key = im.info.get("transparency")
    palette = im.getpalette()
    if key is None or not palette:
        return
    alphas = [key] if isinstance(key, int) else [i for i, a in enumerate(bytes(key)) if a == 0]
    for i in alphas:
        if 3 * i + 3 <= len(palette):
            palette[3 * i : 3 * i + 3] = [255, 255, 255]
    im.putpalette(palette)


def reencode_blurred(
    data: bytes, boxes: list[tuple[int, int, int, int, float]], jpeg_quality: int = 95
) -> tuple[bytes, str, int]:
    """`safe_reencode` when a box was blurred, else the bytes unchanged (same return)."""
    out, mime, n = safe_reencode(data, boxes, jpeg_quality)
    return (out, mime, n) if n else (data, mime, 0)


def _as_downloaded(sample: Sample) -> bool:
    """The stored bytes are the downloaded file (`keep_original`, or no record of it), which
    may carry metadata; otherwise they are ccurate's own encode of the pixels, with none."""
    image = sample.image or b""
    return sample.sha256 is None or hashlib.sha256(image).hexdigest() == sample.sha256


def no_derivatives(license_id: str | None) -> bool:
    """The licence (as the licence filter recorded it) forbids sharing adaptations (ND)."""
    info = normalize(license_id) if license_id else None
    return info is not None and not info.derivatives


class SafetyFilter(Filter):
    """Drops `nsfw`; stores what it judged (see the module doc), faces blurred with
    `blur_faces`."""

    name: ClassVar[str] = "safety"

    def __init__(self, cfg: SafetyConfig | None = None) -> None:
        self.cfg = cfg or SafetyConfig()
        self._scorer: NudeNetScorer | None = None

    @property
    def resources(self) -> Resources:
        # the detector: its session, one chunk's run (grows with batch_size x resolution^2)
        # and one image's padded copy for its input, at the decode cap (images are detected
        # one at a time; the decode is the shared cache's). 0.5 GB at least, as ever: 0.4 GB
        # at the defaults. Plus with blur_faces one re-encode at the pixel cap: then every
        # downloaded original is re-encoded. Without it only multi-frame originals are
        # (keep_original), and declaring the worst case for every task would cut a node's
        # parallel filter tasks by a third for a rare file
        c = self.cfg
        run = c.batch_size * c.resolution**2 * DETECTOR_BYTES_PER_INPUT_PIXEL
        detector = 0.1 + (run + MAX_PIXELS * DETECTOR_COPY_BYTES_PER_PIXEL) / 2**30
        reencode = c.max_pixels * REENCODE_BYTES_PER_PIXEL / 2**30
        memory = max(0.5, detector) + (reencode if c.blur_faces else 0.0)
        return Resources(cpus=float(max(1, c.threads)), memory_gb=memory)

    def setup(self) -> None:
        if self.cfg.enabled and self._scorer is None:
            self._scorer = NudeNetScorer(self.cfg.model_path, self.cfg.resolution, self.cfg.threads)
            self._scorer.setup()

    def teardown(self) -> None:
        self._scorer = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scorer": None}

    def nsfw_score(self, class_max: dict[str, float]) -> float:
        return max((class_max.get(c, 0.0) for c in self.cfg.classes), default=0.0)

    def is_nsfw(self, nsfw: float, person: float) -> bool:
        c = self.cfg
        return nsfw >= c.threshold_alone or (nsfw >= c.threshold and person >= c.person_min)

    def decide(self, sample: Sample) -> Decision:
        return self.decide_batch([sample])[0]

    def decide_batch(self, samples: list[Sample]) -> list[Decision]:
        """Chunk by chunk (`batch_size` decodable samples), keeping only each image's small
        detector input: a full-size decode lives for one image at a time, so memory does not
        grow with the stage batch (64) beyond the decode cache's budget and `resources`."""
        if not self.cfg.enabled:
            return [self.keep() for _ in samples]
        self.setup()
        out: dict[int, Decision] = {}
        pending: list[tuple[int, Blob]] = []
        for i, s in enumerate(samples):
            try:
                blob = self._blob_of(s)
            except DecodeError:
                out[i] = self.reject("decode_error")
                continue
            pending.append((i, blob))
            if len(pending) == self.cfg.batch_size:
                self._judge(samples, pending, out)
                pending = []
        if pending:
            self._judge(samples, pending, out)
        return [out[i] for i in range(len(samples))]

    def _blob_of(self, sample: Sample) -> Blob:
        """The detector's input; the decode is the shared cache's (bounded), not kept here."""
        assert self._scorer is not None
        return self._scorer.blob(decode_rgb(sample.image))

    def _judge(
        self, samples: list[Sample], chunk: list[tuple[int, Blob]], out: dict[int, Decision]
    ) -> None:
        """Detect on one chunk's blobs, then decide and store each sample in turn."""
        scorer = self._scorer
        assert scorer is not None
        raw = scorer.raw([b for _, b in chunk])
        for (i, _), (anchors, scale) in zip(chunk, raw, strict=True):
            class_max = scorer.class_max(anchors)
            nsfw = self.nsfw_score(class_max)
            person = max(class_max.get(f, 0.0) for f in FACES)
            scores = {"nsfw": nsfw, "person": person}
            if self.is_nsfw(nsfw, person):
                out[i] = self.reject("nsfw", **scores)
                continue
            reason = self._store_judged(samples[i], anchors, scale, scores)
            out[i] = self.reject(reason, **scores) if reason else self.keep(**scores)

    def _store_judged(
        self,
        sample: Sample,
        anchors: np.ndarray,
        scale: float,
        scores: dict[str, float],
    ) -> str | None:
        """Replace the stored image by what was judged (see the module doc), faces blurred
        with `blur_faces`; adds the scores, returns a drop reason (`nd_needs_blur`) or None."""
        if not sample.image:
            return None
        try:
            frames = frame_count(sample.image)
        except Exception:  # later frames unreadable (Pillow raises many types): keep frame 0
            frames = 0
        if frames > 1:
            scores["frames"] = float(frames)
        if not self.cfg.blur_faces and frames == 1:
            return None
        faces: list[tuple[int, int, int, int, float]] = []
        if self.cfg.blur_faces:
            if self.cfg.face_detector == "haar":
                try:  # the full-size pixels again, one sample at a time (likely still cached)
                    faces = haar_faces(np.asarray(decode_rgb(sample.image)))
                except DecodeError:
                    return "decode_error"
            else:
                faces = NudeNetScorer.boxes(anchors, scale, FACES, self.cfg.face_min_score)
        if not faces and frames == 1 and not _as_downloaded(sample):
            if self.cfg.blur_faces:
                scores.update(faces=0.0, faces_blurred=0.0)
            return None  # ccurate's own encode (ingest resized it): no metadata, no face
        try:
            data, mime, blurred = safe_reencode(
                sample.image, faces, self.cfg.jpeg_quality, self.cfg.max_pixels
            )
        except Image.DecompressionBombError:
            return "decompression_bomb"
        except Exception:  # decoded once, failed now (Pillow raises many types): not shipped
            return "decode_error"
        if self.cfg.blur_faces:
            scores.update(faces=float(len(faces)), faces_blurred=float(blurred))
        if blurred and no_derivatives(sample.license):
            return "nd_needs_blur"
        sample.image, sample.mime = data, mime
        scores["reencoded"] = 1.0
        return None

    def describe(self) -> dict[str, Any]:
        return self.cfg.model_dump()
