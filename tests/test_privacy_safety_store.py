"""What the safety filter stores is what it judged: with `blur_faces` the image is always
re-encoded without hidden metadata (EXIF thumbnail, GPS, XMP, APP13, comments), a file of
several frames keeps only the judged first one, a no-derivatives work with faces to blur
is dropped, and `blur_faces` without the filter is a config error."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms
from pydantic import ValidationError

from ccurate.config import ConfigError, parse_config
from ccurate.filters.safety import LABELS, REASONS, SafetyConfig, SafetyFilter
from ccurate.pixels import ORIENTATION_TAG, jpeg_segments
from ccurate.record import Sample
from ccurate.stage import FilterStage


def _stubbed(monkeypatch: pytest.MonkeyPatch, faces: bool, **cfg: object) -> SafetyFilter:
    """A safety filter whose detector finds one confident face at (100, 100, 40, 40), or
    nothing."""
    f = SafetyFilter(SafetyConfig.model_validate(cfg))
    f.setup()
    assert f._scorer is not None
    row = np.zeros(4 + len(LABELS), np.float32)
    row[:4] = (120, 120, 40, 40)  # centre x, centre y, w, h
    row[4 + LABELS.index("FACE_FEMALE")] = 0.9
    anchors = row[None] if faces else np.zeros((0, 4 + len(LABELS)), np.float32)
    monkeypatch.setattr(f._scorer, "raw", lambda ims: [(anchors, 1.0) for _ in ims])
    return f


def _gradient(w: int, h: int, colour: tuple[int, int, int]) -> Image.Image:
    ramp = np.linspace(0.4, 1.0, w)[None, :, None]
    arr = np.broadcast_to(ramp * np.array(colour), (h, w, 3))
    return Image.fromarray(arr.astype(np.uint8))


def _exif_with_thumbnail_and_gps(thumb: bytes, orientation: int) -> bytes:
    """Little-endian TIFF as phones write it: IFD0 (Make, Orientation, GPS pointer), a GPS
    IFD (latitude) and IFD1 holding a JPEG thumbnail."""

    def entry(tag: int, kind: int, count: int, value: int) -> bytes:
        return struct.pack("<HHII", tag, kind, count, value)

    gps_at, rational_at, ifd1_at, thumb_at = 50, 80, 104, 146
    out = b"II*\x00" + struct.pack("<I", 8)
    out += struct.pack("<H", 3)
    out += entry(0x010F, 2, 4, int.from_bytes(b"ACM\x00", "little"))  # Make "ACM"
    out += entry(ORIENTATION_TAG, 3, 1, orientation)
    out += entry(0x8825, 4, 1, gps_at) + struct.pack("<I", ifd1_at)
    out += struct.pack("<H", 2) + entry(0x0001, 2, 2, int.from_bytes(b"N\x00\x00\x00", "little"))
    out += entry(0x0002, 5, 3, rational_at) + struct.pack("<I", 0)
    out += struct.pack("<IIIIII", 48, 1, 51, 1, 2866, 100)
    out += struct.pack("<H", 3) + entry(0x0103, 3, 1, 6) + entry(0x0201, 4, 1, thumb_at)
    out += entry(0x0202, 4, 1, len(thumb)) + struct.pack("<I", 0)
    assert len(out) == thumb_at
    return b"Exif\x00\x00" + out + thumb


def _phone_jpeg() -> tuple[bytes, bytes]:
    """A sideways-stored JPEG (Orientation 6) with everything a camera or editor leaves in
    it: EXIF thumbnail, GPS, XMP, an APP13 (Photoshop/IPTC) block, a comment, an sRGB
    profile. Returns (file, ICC profile)."""
    thumb = io.BytesIO()
    _gradient(64, 48, (250, 40, 40)).save(thumb, "JPEG")
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    _gradient(240, 200, (40, 120, 220)).save(
        buf,
        "JPEG",
        quality=90,
        exif=_exif_with_thumbnail_and_gps(thumb.getvalue(), 6),
        xmp=b'<x:xmpmeta xmlns:x="adobe:ns:meta/">who and where</x:xmpmeta>',
        comment=b"taken at 12 Example Street",
        icc_profile=icc,
    )
    data = buf.getvalue()
    iptc = b"Photoshop 3.0\x00" + b"8BIM\x04\x04\x00\x00\x00\x00\x00\x04abcd"
    app13 = b"\xff\xed" + struct.pack(">H", len(iptc) + 2) + iptc
    return data[:2] + app13 + data[2:], icc


@pytest.mark.parametrize("faces", [False, True])
def test_blur_faces_stores_the_judged_pixels_without_hidden_metadata(
    monkeypatch: pytest.MonkeyPatch, faces: bool
) -> None:
    """Faces or none, with `blur_faces` the stored image is re-encoded: upright, with
    descriptive EXIF and its colour profile, and none of the thumbnail, GPS, XMP, APP13
    or comment the detector never saw (the old filter kept a faceless file's bytes, and
    the GPS block of a blurred one)."""
    data, icc = _phone_jpeg()
    assert any(m == 0xED for m, _, _ in jpeg_segments(data))  # the fixture has them all
    assert b"http://ns.adobe.com/xap/1.0/" in data and data.count(b"\xff\xd8") == 2
    f = _stubbed(monkeypatch, faces, blur_faces=True)
    s = Sample(key="k", url="https://example.org/k.jpg", image=data, mime="image/jpeg")
    FilterStage([f]).process([s])
    assert s.kept
    assert s.scores["safety.faces_blurred"] == (1.0 if faces else 0.0)
    out = s.image or b""
    assert out != data and s.mime == "image/jpeg"
    markers = [m for m, _, _ in jpeg_segments(out)]
    assert 0xED not in markers  # no APP13
    assert b"http://ns.adobe.com/xap/1.0/" not in out and b"who and where" not in out
    assert b"Example Street" not in out
    assert out.count(b"\xff\xd8") == 1  # no embedded thumbnail JPEG
    with Image.open(io.BytesIO(out)) as im:
        assert im.size == (200, 240)  # written upright
        exif = im.getexif()
        assert exif.get(ORIENTATION_TAG) == 1 and exif.get(0x010F) == "ACM"
        assert not exif.get_ifd(0x8825)  # no GPS
        assert im.info.get("icc_profile") == icc
        assert "comment" not in im.info
    assert s.scores["safety.reencoded"] == 1.0


def _frames(fmt: str) -> tuple[bytes, np.ndarray]:
    """A 2-frame file of `fmt` (first frame blue, second red) and its first frame."""
    first, second = _gradient(96, 80, (30, 90, 230)), _gradient(96, 80, (230, 30, 30))
    buf = io.BytesIO()
    kw = {"duration": 200} if fmt in ("GIF", "PNG", "WEBP") else {}
    first.save(buf, fmt, save_all=True, append_images=[second], **kw)
    return buf.getvalue(), np.asarray(first, np.float64)


@pytest.mark.parametrize(
    ("fmt", "mime", "stored"),
    [
        ("WEBP", "image/webp", "image/webp"),
        ("PNG", "image/png", "image/png"),
        ("GIF", "image/gif", "image/gif"),
        ("MPO", "image/jpeg", "image/jpeg"),  # ingest stores MPO bodies as image/jpeg
    ],
)
@pytest.mark.parametrize("blur", [False, True])
def test_a_file_of_several_frames_keeps_only_the_judged_first_frame(
    monkeypatch: pytest.MonkeyPatch, fmt: str, mime: str, stored: str, blur: bool
) -> None:
    """Only frame 0 is scored (NSFW, faces), so only frame 0 may ship: with the filter on,
    blurring or not, a multi-frame body is replaced by its first frame."""
    data, first = _frames(fmt)
    with Image.open(io.BytesIO(data)) as im:
        assert getattr(im, "n_frames", 1) == 2
    f = _stubbed(monkeypatch, False, blur_faces=blur)
    s = Sample(key="k", url="https://example.org/k", image=data, mime=mime)
    FilterStage([f]).process([s])
    assert s.kept
    with Image.open(io.BytesIO(s.image or b"")) as im:
        assert getattr(im, "n_frames", 1) == 1
        got = np.asarray(im.convert("RGB"), np.float64)
    assert np.abs(got - first).mean() < 12  # the blue frame, not the red one
    assert s.mime == stored
    assert s.scores["safety.frames"] == 2.0 and s.scores["safety.reencoded"] == 1.0


def test_single_frame_without_blurring_is_left_as_stored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, _ = _phone_jpeg()
    f = _stubbed(monkeypatch, True)  # blur_faces off: nothing to rewrite
    s = Sample(key="k", url="https://example.org/k.jpg", image=data, mime="image/jpeg")
    FilterStage([f]).process([s])
    assert s.kept and s.image is data
    assert "safety.reencoded" not in s.scores and "safety.frames" not in s.scores


def test_blur_faces_leaves_ccurates_own_encode_without_faces_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ingest's own encode of the resized pixels (its bytes are not the downloaded file's
    `sha256`) holds no metadata: without a face it is not encoded a second time; the
    downloaded file (`keep_original`) is, and so is the own encode with a face."""
    import hashlib

    data, _ = _phone_jpeg()
    own = io.BytesIO()
    _gradient(320, 240, (200, 160, 120)).save(own, "JPEG", quality=95)
    for faces, image, sha, rewritten in (
        (False, own.getvalue(), hashlib.sha256(data).hexdigest(), False),
        (False, data, hashlib.sha256(data).hexdigest(), True),
        (True, own.getvalue(), hashlib.sha256(data).hexdigest(), True),
    ):
        f = _stubbed(monkeypatch, faces, blur_faces=True)
        s = Sample(key="k", url="https://example.org/k.jpg", image=image, mime="image/jpeg")
        s.sha256 = sha
        FilterStage([f]).process([s])
        assert s.kept
        assert (s.image is not image) == rewritten, (faces, rewritten)
        assert ("safety.reencoded" in s.scores) == rewritten
        assert s.scores["safety.faces_blurred"] == float(faces)


@pytest.mark.parametrize(
    ("license_id", "faces", "dropped"),
    [
        ("CC-BY-ND-4.0", True, True),
        ("CC-BY-NC-ND-3.0", True, True),
        ("CC-BY-ND-4.0", False, False),  # nothing to blur: published as it is
        ("CC-BY-4.0", True, False),
        (None, True, False),  # no licence filter in the chain: nothing to check
    ],
)
def test_a_no_derivatives_work_with_faces_to_blur_is_dropped(
    monkeypatch: pytest.MonkeyPatch, license_id: str | None, faces: bool, dropped: bool
) -> None:
    """A blurred ND work is an adaptation, which ND does not allow to share: it is
    dropped with its own documented reason, its stored bytes untouched."""
    buf = io.BytesIO()
    _gradient(320, 256, (40, 120, 220)).save(buf, "JPEG")
    data = buf.getvalue()
    f = _stubbed(monkeypatch, faces, blur_faces=True)
    s = Sample(key="k", url="https://example.org/k.jpg", image=data, mime="image/jpeg")
    s.license = license_id
    FilterStage([f]).process([s])
    if dropped:
        assert (s.kept, s.drop_reason, s.dropped_by) == (False, "nd_needs_blur", "safety")
        assert "nd_needs_blur" in REASONS and s.image is data
        assert s.scores["safety.faces"] == 1.0
    else:
        assert s.kept
        assert s.scores["safety.faces_blurred"] == (1.0 if faces else 0.0)


def test_blur_faces_without_the_safety_filter_is_a_config_error() -> None:
    """The faces come from the safety filter's detector: disabled, it would blur nothing
    while the recorded settings said `blur_faces = true`."""
    with pytest.raises(ValidationError, match="blur_faces") as e:
        SafetyConfig(enabled=False, blur_faces=True)
    assert "enabled = true" in str(e.value)
    with pytest.raises(ConfigError) as ce:
        parse_config({"filters": {"safety": {"enabled": False, "blur_faces": True}}}, "x.toml")
    assert "filters.safety" in str(ce.value) and "blur_faces" in str(ce.value)
    assert SafetyConfig(enabled=False).blur_faces is False  # each alone is fine
    assert SafetyConfig(blur_faces=True).enabled is True
