"""What a published sample looks like: its json record, text, index and manifest rows.

The `{key}.json` of a release is type-stable: every record has the same keys
and every field one JSON type (missing text is "", every score name of the
release is present, missing scores are null). Loaders that infer a schema from
the first few rows (HF `datasets`' webdataset builder infers it from 5) then
read every shard; with nulls in the first rows they fail on the first string.
The parquet files keep real nulls under fixed Arrow schemas.

Captions have two names, by what each file follows. The text to train on is
`{key}.txt`. The shard's parquet index keeps img2dataset's meaning: `caption` is
that text (with `status`, `error_message`, `exif` as img2dataset writes them), and
`synthetic_caption` the captioning model's output. In `{key}.json`, `text` is the
`.txt` text, `caption` the model's output only ("" when the text came from alt
text; the trainer's `synthetic` policy reads it), `alt_text` the page's alt text,
and `caption_source` says which of them `.txt` holds.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import pyarrow as pa
from PIL import Image

from ccurate.pixels import (
    bare,
    jpeg_end,
    open_image,
    png_end,
    save_jpeg,
    to_rgb,
    to_rgba,
    upright,
    webp_end,
)
from ccurate.record import Sample
from ccurate.shardio import EXT_MIME, MIME_EXT

from .attribution import attribution_line, license_link, license_name, modifications
from .config import ShardsConfig

# img2dataset's per-shard parquet columns first, then ours
INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("sha256", pa.string()),
        ("exif", pa.string()),
        ("page_url", pa.string()),
        ("source_url", pa.string()),
        ("alt_text", pa.string()),
        ("synthetic_caption", pa.string()),
        ("caption_model", pa.string()),
        ("caption_source", pa.string()),
        ("license", pa.string()),
        ("license_url", pa.string()),
        ("license_family", pa.string()),
        ("author", pa.string()),
        ("title", pa.string()),
        ("credit", pa.string()),
        ("attribution", pa.string()),
        ("modified", pa.string()),
        ("mime", pa.string()),
        ("image_bytes", pa.int64()),
        ("image_sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("phash", pa.string()),
        ("dhash", pa.string()),  # absent from releases before it: readers take it as null
        ("duplicate_count", pa.int32()),
        ("offset", pa.int64()),
    ]
)

MANIFEST_SCHEMA = pa.schema(
    [
        ("release", pa.string()),
        ("key", pa.string()),
        ("split", pa.string()),
        ("bucket", pa.string()),
        ("shard", pa.string()),
        ("offset", pa.int64()),
        ("license", pa.string()),
        ("license_url", pa.string()),
        ("license_family", pa.string()),
        ("credit", pa.string()),
        ("attribution", pa.string()),
        ("sha256", pa.string()),
        ("image_sha256", pa.string()),
        ("pixel_sha256", pa.string()),
        ("phash", pa.string()),
        ("dhash", pa.string()),  # absent from releases before it: readers take it as null
        ("url", pa.string()),
        ("page_url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption_source", pa.string()),
    ]
)

EXCLUDED_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("url", pa.string()),
        ("license", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)


def choose_text(policy: str, caption: str | None, alt: str | None) -> tuple[str, str]:
    """(text for `{key}.txt`, where it came from); fallbacks are recorded, never silent."""
    cap = (caption or "").strip()
    alt_s = (alt or "").strip()
    if policy == "alt_text":
        if alt_s:
            return alt_s, "alt_text"
        return (cap, "synthetic_fallback") if cap else ("", "none")
    if cap:
        return cap, "synthetic"
    return (alt_s, "alt_text_fallback") if alt_s else ("", "none")


def prepare_image(
    data: bytes, mime: str | None, cfg: ShardsConfig
) -> tuple[bytes, str | None, tuple[int, int] | None]:
    """(member bytes, format re-encoded to or None, decoded size when we decoded it).

    Stored bytes are copied when their type is the configured one and they hold one frame,
    so a release never loses quality to a needless re-encode, but only up to the end of that
    image (a JPEG's EOI, a PNG's IEND, a WebP's RIFF size): what a file carries after it (a
    motion photo's MP4, an MPO's second picture without its index) was never judged, so it
    never ships; a file whose end cannot be found is re-encoded. A file of more frames
    (animated WebP/PNG, an MPO that ingest stores as image/jpeg) ships its first frame only:
    the one the filters judged. A re-encode is written upright (EXIF orientation applied,
    no EXIF kept), as the record's width and height describe it, with the pixels the filters
    judged (`to_rgb` / `to_rgba`: 16-bit greys scaled, transparency on white for JPEG).

    Refuses (`DecompressionBombError`) images above `ccurate.pixels.MAX_PIXELS`; any other
    decode failure is a `ValueError` naming it (the release excludes the sample).
    """
    try:
        with open_image(data) as src:
            fmt = MIME_EXT.get(mime or "")
            if fmt == cfg.image_format and getattr(src, "n_frames", 1) == 1:
                end = _END[fmt](data) if fmt in _END else None
                if end is not None:
                    return data[:end], None, None
            src.seek(0)
            src.load()
            im = upright(src)
            size = im.size
            out = io.BytesIO()
            if cfg.image_format == "jpg":
                save_jpeg(bare(to_rgb(im)), out, cfg.jpeg_quality)
            elif cfg.image_format == "webp":
                bare(to_rgba(im)).save(out, format="WEBP", quality=cfg.webp_quality, method=4)
            else:
                conv = im if im.mode in ("RGB", "RGBA", "L", "LA") else to_rgba(im)
                bare(conv).save(out, format="PNG", optimize=False)
    except Image.DecompressionBombError:
        raise
    except Exception as e:  # Pillow raises many types on corrupt bytes (struct.error, ...)
        raise ValueError(f"{type(e).__name__}: {e}") from e
    return out.getvalue(), cfg.image_format, size


_END = {"jpg": jpeg_end, "png": png_end, "webp": webp_end}


def mime_of(fmt: str) -> str:
    return EXT_MIME[fmt]


def _s(v: Any) -> str:
    return "" if v is None else str(v)


def _f(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(v)


def _extra_value(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False, sort_keys=True, default=str)


def build_record(
    s: Sample,
    *,
    family: str,
    text: str,
    text_source: str,
    image: bytes,
    image_sha256: str,
    reencoded_as: str | None,
    size: tuple[int, int],
    fmt: str,
    score_names: list[str],
    extra_names: list[str],
) -> dict[str, Any]:
    """The published `{key}.json`: the full record, type-stable (see module doc)."""
    width, height = size
    base = {
        "width": width,
        "height": height,
        "original_width": s.original_width or width,
        "original_height": s.original_height or height,
    }
    lid = s.license or ""
    mods = modifications(base, reencoded_as, s.scores.get("safety.faces_blurred") or 0.0)
    rec: dict[str, Any] = {
        "key": s.key,
        "url": s.url,
        "page_url": _s(s.page_url),
        "source_url": _s(s.source_url or s.page_url or s.url),
        "text": text,
        "caption_source": text_source,
        "alt_text": _s(s.alt_text),
        "caption": _s(s.caption),
        "caption_model": _s(s.caption_model),
        "license": lid,
        "license_name": license_name(lid),
        "license_url": _s(s.license_url or license_link(lid)),
        "license_deed": _s(license_link(lid, s.license_url)),
        "license_rule": _s(s.license_rule),
        "license_family": family,
        "license_evidence": [
            {"scope": _s(e.scope), "kind": _s(e.kind), "value": _s(e.value)}
            for e in s.license_evidence
        ],
        "author": _s(s.author),
        "title": _s(s.title),
        "credit": _s(s.credit),
        "attribution": "",
        "modified": bool(mods),
        "modifications": ", ".join(mods),
        "mime": mime_of(fmt),
        **base,
        "image_bytes": len(image),
        "sha256": _s(s.sha256),
        "image_sha256": image_sha256,
        "pixel_sha256": _s(s.pixel_sha256),
        "phash": _s(s.phash),
        "dhash": _s(s.dhash),
        "scores": {n: _f(s.scores.get(n)) for n in score_names},
        "decisions": [
            {"filter": d.filter, "keep": bool(d.keep), "reason": _s(d.reason)} for d in s.decisions
        ],
        "duplicate_count": int(s.duplicate_count or 1),
        "extra": {n: _extra_value(s.extra.get(n)) for n in extra_names},
    }
    rec["attribution"] = attribution_line(
        {**rec, "source_url": s.source_url, "page_url": s.page_url}, mods
    )
    return rec


# the published json's fields in build_record's order, as Hugging Face `datasets` types
_JSON_TYPES: list[tuple[str, Any]] = [
    *((n, "string") for n in (
        "key", "url", "page_url", "source_url", "text", "caption_source", "alt_text", "caption",
        "caption_model", "license", "license_name", "license_url", "license_deed",
        "license_rule", "license_family",
    )),
    ("license_evidence", [("scope", "string"), ("kind", "string"), ("value", "string")]),
    ("author", "string"), ("title", "string"), ("credit", "string"), ("attribution", "string"),
    ("modified", "bool"),
    ("modifications", "string"), ("mime", "string"),
    *((n, "int64") for n in (
        "width", "height", "original_width", "original_height", "image_bytes",
    )),
    *((n, "string") for n in ("sha256", "image_sha256", "pixel_sha256", "phash", "dhash")),
    ("scores", None),  # a struct of the release's score names
    ("decisions", [("filter", "string"), ("keep", "bool"), ("reason", "string")]),
    ("duplicate_count", "int64"),
    ("extra", None),  # a struct of the release's extra column names
]  # fmt: skip


def hf_features(
    fmt: str, score_names: list[str], extra_names: list[str], alt_txt: bool = False
) -> list[dict[str, Any]]:
    """The features of a release's samples in the Hugging Face card format
    (`dataset_info.features`): declared, so `datasets` does not infer them from the first
    5 samples, which fails when a score is null in all of them and set later."""

    def fields(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        return [{"name": n, "dtype": t} for n, t in pairs]

    record: list[dict[str, Any]] = []
    for name, kind in _JSON_TYPES:
        if name == "scores":
            record.append({"name": name, "struct": fields([(n, "float64") for n in score_names])})
        elif name == "extra":
            record.append({"name": name, "struct": fields([(n, "string") for n in extra_names])})
        elif isinstance(kind, list):
            record.append({"name": name, "list": fields(kind)})
        else:
            record.append({"name": name, "dtype": kind})
    return [
        {"name": fmt, "dtype": "image"},
        {"name": "txt", "dtype": "string"},
        *([{"name": "alt.txt", "dtype": "string"}] if alt_txt else []),
        {"name": "json", "struct": record},
        {"name": "__key__", "dtype": "string"},
        {"name": "__url__", "dtype": "string"},
    ]


def index_row(rec: dict[str, Any], offset: int) -> dict[str, Any]:
    """One row of a shard's parquet index (img2dataset columns + ours), real nulls."""

    def n(v: str) -> str | None:
        return v or None

    return {
        "key": rec["key"],
        "url": rec["url"],
        "caption": rec["text"],
        "width": rec["width"],
        "height": rec["height"],
        "original_width": rec["original_width"],
        "original_height": rec["original_height"],
        "status": "success",
        "error_message": None,
        "sha256": n(rec["sha256"]),
        "exif": None,
        "page_url": n(rec["page_url"]),
        "source_url": n(rec["source_url"]),
        "alt_text": n(rec["alt_text"]),
        "synthetic_caption": n(rec["caption"]),
        "caption_model": n(rec["caption_model"]),
        "caption_source": rec["caption_source"],
        "license": rec["license"],
        "license_url": n(rec["license_url"]),
        "license_family": rec["license_family"],
        "author": n(rec["author"]),
        "title": n(rec["title"]),
        "credit": n(rec["credit"]),
        "attribution": rec["attribution"],
        "modified": n(rec["modifications"]),
        "mime": rec["mime"],
        "image_bytes": rec["image_bytes"],
        "image_sha256": rec["image_sha256"],
        "pixel_sha256": n(rec["pixel_sha256"]),
        "phash": n(rec["phash"]),
        "dhash": n(rec["dhash"]),
        "duplicate_count": rec["duplicate_count"],
        "offset": offset,
    }


def manifest_extras(schemas: list[pa.Schema], extra_names: list[str]) -> list[pa.Field]:
    """The manifest's columns for the input's extra columns (`similarity`, `NSFW`, ...), with
    the type they had in the input, so DuckDB can filter a release on them. A type that
    differs between input shards is unified (null -> the other, int -> float), else it is
    stored as the json `extra` writes it (a string). A name the manifest already has gets an
    `extra_` prefix."""
    out: list[pa.Field] = []
    for name in extra_names:
        types = [sc.field(name).type for sc in schemas if name in sc.names]
        try:
            unified = (
                pa.unify_schemas(
                    [pa.schema([(name, t)]) for t in types], promote_options="permissive"
                )
                .field(name)
                .type
            )
        except (pa.ArrowException, ValueError):
            unified = pa.string()
        if pa.types.is_null(unified) or not types:
            unified = pa.string()
        col = f"extra_{name}" if name in MANIFEST_SCHEMA.names else name
        out.append(pa.field(col, unified, metadata={b"ccurate_extra": name.encode()}))
    return out


def manifest_extra_cells(s: Sample, columns: list[pa.Field]) -> dict[str, Any]:
    """One sample's values for `manifest_extras` columns (strings as the json has them)."""
    cells: dict[str, Any] = {}
    for f in columns:
        v = s.extra.get((f.metadata or {}).get(b"ccurate_extra", f.name.encode()).decode())
        if pa.types.is_string(f.type) and v is not None and not isinstance(v, str):
            v = _extra_value(v)
        cells[f.name] = v
    return cells


def manifest_row(
    release: str, rec: dict[str, Any], split: str, bucket: str, shard: str, offset: int
) -> dict[str, Any]:
    return {
        "release": release,
        "key": rec["key"],
        "split": split,
        "bucket": bucket,
        "shard": shard,
        "offset": offset,
        "license": rec["license"],
        "license_url": rec["license_url"] or None,
        "license_family": rec["license_family"],
        "credit": rec["credit"] or None,
        "attribution": rec["attribution"],
        "sha256": rec["sha256"] or None,
        "image_sha256": rec["image_sha256"],
        "pixel_sha256": rec["pixel_sha256"] or None,
        "phash": rec["phash"] or None,
        "dhash": rec["dhash"] or None,
        "url": rec["url"],
        "page_url": rec["page_url"] or None,
        "width": rec["width"],
        "height": rec["height"],
        "caption_source": rec["caption_source"],
    }
