"""Deterministic synthetic curation output (kept + dropped shards) for tests, bench and demos.

It mimics what the last stage of a run leaves behind: `ShardWriter` shards
whose samples carry licences of every family (incl. ND, not releasable),
page-level evidence, resized and PNG images, missing synthetic captions, merged
duplicates and filter scores; and dropped side outputs with real reason names.
"""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

import numpy as np
from PIL import Image

from ccurate.pixels import save_jpeg
from ccurate.record import Decision, LicenseEvidence, Sample, make_key
from ccurate.shardio import ShardWriter, list_shards

LICENSES = [
    ("CC-BY-4.0", "https://creativecommons.org/licenses/by/4.0/"),
    ("CC-BY-SA-4.0", "https://creativecommons.org/licenses/by-sa/4.0/"),
    ("CC0-1.0", "https://creativecommons.org/publicdomain/zero/1.0/"),
    ("LicenseRef-PDM-1.0", "https://creativecommons.org/publicdomain/mark/1.0/"),
    ("CC-BY-NC-SA-2.0", "https://creativecommons.org/licenses/by-nc-sa/2.0/"),
    ("CC-BY-NC-4.0", "https://creativecommons.org/licenses/by-nc/4.0/"),
    ("CC-BY-ND-4.0", "https://creativecommons.org/licenses/by-nd/4.0/"),
    ("LicenseRef-All-Rights-Reserved", ""),  # cannot be kept by a real run: the release guards
]
DROP_REASONS = [
    ("license", "license_unknown"),
    ("quality", "too_small"),
    ("quality", "clip_score_low"),
    ("dedup", "duplicate_exact"),
    ("ingest", "http_404"),
]


def synth_image(
    rng: random.Random, w: int, h: int, fmt: str = "JPEG", quality: int = 90, noise: float = 12.0
) -> bytes:
    """A photo-like image (smooth gradient + noise; `noise` sets the bits per pixel)."""
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            (xx / max(w, 1)) * 255 * rng.random(),
            (yy / max(h, 1)) * 255 * rng.random(),
            ((xx + yy) / max(w + h, 1)) * 255,
        ],
        axis=-1,
    )
    base += nrng.normal(0, noise, size=base.shape)
    arr = np.clip(base, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    im = Image.fromarray(arr, "RGB")
    if fmt == "JPEG":
        save_jpeg(im, out, quality)  # as ingest writes them
    else:
        im.save(out, format=fmt)
    return out.getvalue()


def synth_sample(
    i: int, rng: random.Random, size: tuple[int, int] = (64, 48), noise: float = 12.0
) -> Sample:
    """One kept sample; properties vary with i so a few dozen cover every case."""
    lid, lurl = LICENSES[i % len(LICENSES)]
    url = f"https://images.example.org/{i:05d}.jpg"
    page = f"https://www.example.org/gallery/{i // 3}"
    w, h = size
    if i % 5 == 3:
        w, h = size[1], size[0]  # portrait
    png = i % 11 == 4
    data = synth_image(rng, w, h, "PNG" if png else "JPEG", noise=noise)
    page_level = i % 4 == 1
    s = Sample(
        key=make_key(url, page),
        url=url,
        page_url=page,
        alt_text=f"alt text {i}: a photo of thing {i % 13}" if i % 9 != 8 else None,
        license=lid,
        license_url=lurl,
        license_rule=("link_rel_license@page" if page_level else "rel_license@image"),
        license_evidence=[LicenseEvidence("page" if page_level else "image", "rel_license", lurl)],
        author=f"Author {i % 17}" if i % 10 != 7 else None,
        title=f"Picture {i}",
        source_url=f"https://www.example.org/file/{i}",
        image=data,
        mime="image/png" if png else "image/jpeg",
        width=w,
        height=h,
        original_width=w * 4 if i % 6 == 0 else w,
        original_height=h * 4 if i % 6 == 0 else h,
        sha256=hashlib.sha256(data).hexdigest(),
        pixel_sha256=hashlib.sha256(f"px{i}".encode()).hexdigest(),
        phash=f"{i:016x}",
        duplicate_count=2 if i % 8 == 5 else 1,
        caption=f"a synthetic caption of picture {i}" if i % 5 != 2 else None,
        caption_model="tiny-blip2-test" if i % 5 != 2 else None,
    )
    s.record(Decision("license", True, None, {}))
    s.record(Decision("quality", True, None, {"clip": 0.25 + (i % 10) / 100, "entropy": 6.5}))
    return s


def make_inputs(
    root: str | Path,
    n_shards: int = 2,
    per_shard: int = 12,
    seed: int = 0,
    size: tuple[int, int] = (64, 48),
    dropped_per_shard: int = 5,
    noise: float = 12.0,
) -> tuple[list[str], list[str]]:
    """Write `n_shards` final shards (+ dropped side outputs); returns (prefixes, dropped paths)."""
    root = Path(root)
    rng = random.Random(seed)
    i = 0
    for k in range(n_shards):
        w = ShardWriter(root / f"shard-{k:05d}")
        for _ in range(per_shard):
            w.write(synth_sample(i, rng, size, noise))
            i += 1
        for j in range(dropped_per_shard):
            by, reason = DROP_REASONS[(k * dropped_per_shard + j) % len(DROP_REASONS)]
            url = f"https://images.example.org/dropped-{k}-{j}.jpg"
            d = Sample(key=make_key(url), url=url, license="CC-BY-4.0" if by != "license" else None)
            d.drop(reason, by)
            w.write(d)
        w.commit(
            {
                "stage": "caption",
                "in": per_shard + dropped_per_shard,
                "kept": per_shard,
                "dropped": dropped_per_shard,
                "drops": {},
            }
        )
    prefixes = [str(p) for p in list_shards(root)]
    return prefixes, [f"{p}.dropped.parquet" for p in prefixes]
