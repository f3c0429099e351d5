"""`precompute`: run the VAE and text encoder once over a release, write latent shards.

Training from latents skips JPEG decoding, resizing and the VAE/text-encoder
forward passes on every epoch. Each input shard gives one output shard with the
same relative name, holding per sample:

- `{key}.latent.npy`  VAE posterior moments (mean ‖ std along channels), float16,
  unscaled: the trainer samples `mean + std·ε` and applies `shift_factor` and `scaling_factor`;
- `{key}.emb.npy`     text-encoder hidden states of the synthetic caption, float16;
- `{key}.alt.npy`     the same for the alt text (caption policy `alt_text` / `mix`);
- `{key}.json`        the release record, plus the captions used and `latent_hw`.

`latents.json` (written last) names the models, resolution, the source release (its
content digest, from the release's `SHA256SUMS`, which the trainer's resume check compares)
and the empty-caption embedding (`uncond.npy`) used for caption dropout. Shards are
published atomically with a `.done` marker, so a rerun skips finished ones made from the
same source shard (same recorded digest, or same file, size and mtime) with the same
settings and redoes the rest; a rerun first removes `latents.json` and the finished shards
no longer in the source, so the folder never mixes two releases under one manifest. Under
`torchrun` each rank takes every world-th shard. Only the `train.splits` of a release are
encoded.

Undecodable samples are left out and counted with their reason in the marker (and in
`latents.json`'s `dropped`). The pixel path keeps such a sample's slot (another sample's
image stands in), so when any sample is dropped the latent stream holds fewer samples than
the release and its order differs from the pixel stream's for the same seed; a checkpoint
of a pixel run therefore never resumes exactly on latents (nor the other way round).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ccurate.progress import Progress
from ccurate.record import row_json
from ccurate.shardio import (
    atomic_path,
    clear_shard,
    is_done,
    read_marker,
    write_json_atomic,
)
from ccurate.tario import TarWriter
from ccurate.train.config import TrainConfig
from ccurate.train.decode import IMAGE_EXTS, Decoder, npy_bytes, pick_caption
from ccurate.train.models import (
    build_text_encoder,
    build_vae,
    place,
    resolve_refs,
    vae_scale_factor,
    vae_shift_factor,
)
from ccurate.train.presets import get_preset
from ccurate.train.stream import (
    LATENT_FORMAT,
    LATENT_MANIFEST,
    DataError,
    MemberReader,
    RawSample,
    _release_root,
    find_shards,
    iter_tar,
    make_buckets,
    nearest_bucket,
    shard_names,
)

REASONS = {
    "decode_error": "the image member could not be decoded",
    "no_image": "the sample has no image member",
}


def _out_name(shard: str, release: Path | None, name: str) -> str:
    """The latent shard's name: relative to the release directory, else `name` (relative to
    the shards' common directory: a list of shards from several directories may repeat a
    file name, and one would then overwrite, or pass for, the other)."""
    if release is not None and release.is_dir():
        try:
            return str(Path(shard).resolve().relative_to(release.resolve()))
        except ValueError:
            pass
    return name


def _settings(cfg: TrainConfig, resolution: int) -> dict[str, Any]:
    """What a latent shard's content depends on: a finished shard made with other values is
    stale and must be redone by a rerun, not kept next to a manifest that describes others."""
    refs = resolve_refs(cfg)
    return {
        "preset": cfg.preset,
        "vae": refs["vae"],
        "text_encoder": refs["text_encoder"],
        "text_layer": cfg.text_layer,
        "resolution": resolution,
        "aspect_buckets": cfg.aspect_buckets,
        "max_aspect": cfg.max_aspect if cfg.aspect_buckets else None,
    }


def _captions(cfg: TrainConfig) -> list[str]:
    """The embedding members the caption policy needs in every sample."""
    return {"synthetic": ["emb"], "alt_text": ["alt"], "mix": ["alt", "emb"]}[cfg.caption_source]


def _reusable(
    marker: dict[str, Any],
    settings: dict[str, Any],
    captions: list[str],
    src: str,
    source_id: str,
) -> bool:
    """A finished shard is kept when made from this source shard (same content identity;
    the same path for a marker without one) with these settings and carries these captions
    (markers written before settings were recorded are trusted on those)."""
    same = (
        marker["source_id"] == source_id if "source_id" in marker else marker.get("source") == src
    )
    if not same or (not source_id and marker.get("source") != src):  # a URL: only its name
        return False
    if "settings" in marker and marker["settings"] != settings:
        return False
    return "captions" not in marker or set(captions) <= set(marker["captions"])


def _dst(out: Path, name: str) -> Path:
    dst = out / name
    return dst if dst.suffix == ".tar" else dst.with_suffix(".tar")


def _check_out(out: Path, shards: list[str], dsts: dict[str, Path]) -> None:
    """Refuse an output folder that overlaps the source: precompute clears each destination
    shard (tar, index, stats) before writing it, and removes stale ones, so a destination
    that is a source shard, a folder holding source shards, one inside a source folder, or
    one in or around a release would delete the data it is about to read."""
    o = out.resolve()
    src_dirs = {Path(s).resolve().parent for s in shards if os.path.exists(s)}
    src_files = {Path(s).resolve() for s in shards if os.path.exists(s)}
    bad = [d for d in dsts.values() if d.resolve() in src_files]
    overlap = next(
        (d for d in sorted(src_dirs) if d == o or o in d.parents or d in o.parents), None
    )
    release = _release_root(o)
    if bad or overlap is not None or release is not None:
        what = (
            f"source shard {bad[0]}"
            if bad
            else f"source folder {overlap}"
            if overlap is not None
            else f"release {release}"
        )
        raise DataError(
            f"precompute output {out} overlaps the {what}: writing latents there would delete "
            "or mix with the source shards; choose a separate, empty folder"
        )


def _clear_stale(out: Path, expected: set[Path], sources: frozenset[Path] = frozenset()) -> None:
    """Remove `latents.json` (rewritten last, once every shard is of this source) and the
    finished latent shards that are not this run's (a previous release's extra shards);
    a shard precompute did not write is refused rather than deleted, and a source shard is
    never deleted."""
    (out / LATENT_MANIFEST).unlink(missing_ok=True)
    for tar in sorted(out.glob("**/*.tar")):
        if tar in expected or any(p.startswith(".") for p in tar.relative_to(out).parts):
            continue
        if tar.resolve() in sources:
            raise DataError(f"{tar} is a source shard: precompute into a separate folder")
        prefix = str(tar)[: -len(".tar")]
        if not (is_done(prefix) and "settings" in read_marker(prefix)):
            raise DataError(
                f"{tar} is not a latent shard of precompute: the trainer would read it with "
                f"the latents in {out}; precompute into an empty folder"
            )
        clear_shard(prefix)


class _Encoder:
    """The frozen models of one precompute run."""

    def __init__(self, cfg: TrainConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.dtype = (
            torch.bfloat16
            if device.type == "cuda" and cfg.mixed_precision == "bf16"
            else torch.float32
        )
        self.vae = place(build_vae(cfg), device, self.dtype)
        self.text = place(build_text_encoder(cfg), device, self.dtype)
        self.factor = vae_scale_factor(self.vae)

    @torch.no_grad()
    def latents(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device, self.dtype) / 127.5 - 1.0
        dist = self.vae.encode(x).latent_dist
        moments = torch.cat([dist.mean, dist.std], dim=1).float()
        return moments.cpu().numpy().astype(np.float16)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        return self.text.encode(texts, self.device).float().cpu().numpy().astype(np.float16)


def _process_shard(
    enc: _Encoder,
    cfg: TrainConfig,
    src: str,
    source_id: str,
    dst: Path,
    resolution: int,
    buckets: list[tuple[int, int]] | None,
) -> dict[str, Any]:
    """One input shard -> one latent shard (+ marker). Returns the marker's stats."""
    prefix = Path(str(dst)[: -len(".tar")])
    if dst.resolve() == Path(src).resolve():
        raise DataError(f"precompute would overwrite its source shard {src}")
    clear_shard(prefix)
    want_alt = cfg.caption_source in ("alt_text", "mix")
    want_syn = cfg.caption_source in ("synthetic", "mix")
    decoder = Decoder(
        "image", resolution, resolution, cfg.caption_source, cfg.caption_mix, cfg.seed
    )
    reader = MemberReader()
    stats: dict[str, Any] = {
        "samples": 0,
        "dropped": {},
        "empty_captions": 0,  # trained as the null condition (see ccurate.train.decode)
        "source": src,
        "source_id": source_id,
        "settings": _settings(cfg, resolution),
        "captions": _captions(cfg),
    }
    pending: list[tuple[RawSample, dict[str, Any], np.ndarray, str, str]] = []

    def flush(tf: TarWriter) -> None:
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, (_, _, px, _, _) in enumerate(pending):
            by_shape.setdefault(px.shape, []).append(i)
        lat: dict[int, np.ndarray] = {}
        for idx in by_shape.values():
            out = enc.latents(np.stack([pending[i][2] for i in idx]))
            for j, i in enumerate(idx):
                lat[i] = out[j]
        syn = enc.texts([p[3] for p in pending]) if want_syn else None
        alt = enc.texts([p[4] for p in pending]) if want_alt else None
        for i, (raw, rec, _, syn_text, alt_text) in enumerate(pending):
            rec = dict(rec)
            rec.update(
                key=rec.get("key", raw.key),
                train_caption=syn_text,
                train_alt_text=alt_text,
                latent_hw=list(lat[i].shape[-2:]),
            )
            tf.add(f"{raw.key}.latent.npy", npy_bytes(lat[i]))
            if syn is not None:
                tf.add(f"{raw.key}.emb.npy", npy_bytes(syn[i]))
            if alt is not None:
                tf.add(f"{raw.key}.alt.npy", npy_bytes(alt[i]))
            tf.add(f"{raw.key}.json", row_json(rec).encode())
            stats["samples"] += 1
        pending.clear()

    with atomic_path(dst) as tmp, TarWriter(tmp) as tf:
        for raw in iter_tar(src):
            rec = decoder.record(raw, reader)
            txt = decoder.text(raw, reader)
            syn_text, syn_src = pick_caption(rec, txt, "synthetic")
            alt_text = pick_caption(rec, txt, "alt_text")[0]
            if not any(ext in raw.members for ext in IMAGE_EXTS):
                stats["dropped"]["no_image"] = stats["dropped"].get("no_image", 0) + 1
                continue
            h = w = resolution
            try:
                if buckets is not None:
                    wh = (rec.get("width"), rec.get("height"))
                    if not all(isinstance(v, int) and v > 0 for v in wh):
                        from PIL import Image

                        ext = next(e for e in IMAGE_EXTS if e in raw.members)
                        with Image.open(io.BytesIO(reader.read(raw.members[ext]))) as im:
                            wh = im.size
                    h, w = nearest_bucket(int(wh[0]), int(wh[1]), buckets)  # type: ignore[arg-type]
                pixels = decoder._image(raw, reader, h, w)
            except Exception:
                stats["dropped"]["decode_error"] = stats["dropped"].get("decode_error", 0) + 1
                continue
            stats["empty_captions"] += syn_src == "empty"  # its fallbacks cover all fields
            pending.append((raw, rec, pixels, syn_text, alt_text))
            if len(pending) >= cfg.precompute_batch:
                flush(tf)
        if pending:
            flush(tf)
    reader.close()
    write_json_atomic(f"{prefix}.done", stats)
    return stats


def precompute(cfg: TrainConfig, release: str | Path | list[str], out_dir: str | Path) -> list[str]:
    """Write latent shards for `release` under `out_dir`; returns this rank's shard paths.

    Resumable: shards with a `.done` marker made from the same source shard with the same
    settings are kept as they are; those made from another (a new release) or with other
    settings (resolution, models, captions) are redone.
    """
    import torch.distributed as dist

    from ccurate.train.loop import init_distributed, shard_sources, sources_digest

    ctx = init_distributed(cfg)
    out = Path(out_dir)
    shards = find_shards(release, cfg.splits)
    sources, releases, splits = shard_sources(shards)
    source_ids = dict(zip(shards, shard_sources(shards, with_mtime=True)[0], strict=True))
    rel_root = Path(release) if isinstance(release, (str, Path)) else None
    preset = get_preset(cfg.preset)
    resolution = cfg.resolution or preset.resolution
    buckets = (
        make_buckets(resolution, preset.size_multiple, cfg.max_aspect)
        if cfg.aspect_buckets
        else None
    )
    names = dict(zip(shards, shard_names(shards), strict=True))
    dsts = {s: _dst(out, _out_name(s, rel_root, names[s])) for s in shards}
    _check_out(out, shards, dsts)  # on every rank, before anything is touched or loaded
    out.mkdir(parents=True, exist_ok=True)
    enc = _Encoder(cfg, ctx.device)
    if ctx.rank == 0:
        _clear_stale(out, set(dsts.values()), frozenset(Path(s).resolve() for s in shards))
    if ctx.world > 1:
        dist.barrier()  # no shard is rewritten while latents.json may still name the old set
    mine = [s for i, s in enumerate(shards) if i % ctx.world == ctx.rank]
    settings, captions = _settings(cfg, resolution), _captions(cfg)
    written: list[str] = []
    totals: dict[str, Any] = {"samples": 0, "dropped": {}, "empty_captions": 0}
    carried = {"emb", "alt"}  # the embedding members every shard has (kept ones may have more)
    bar = Progress("precompute", total=len(mine), enabled=ctx.rank == 0)
    try:
        for src in mine:
            dst = dsts[src]
            prefix = str(dst)[: -len(".tar")]
            marker = read_marker(prefix) if is_done(prefix) else None
            if marker is not None and _reusable(marker, settings, captions, src, source_ids[src]):
                stats = marker
            else:
                stats = _process_shard(enc, cfg, src, source_ids[src], dst, resolution, buckets)
            totals["samples"] += int(stats.get("samples", 0))
            totals["empty_captions"] += int(stats.get("empty_captions", 0))
            carried &= set(stats.get("captions") or captions)
            for k, v in stats.get("dropped", {}).items():
                totals["dropped"][k] = totals["dropped"].get(k, 0) + v
            written.append(str(dst))
            bar.advance()
        bar.close()
        if ctx.world > 1:
            gathered: list[Any] = [None] * ctx.world
            dist.all_gather_object(gathered, sorted(carried))
            for other in gathered:
                carried &= set(other)
        if ctx.rank == 0:
            uncond = enc.texts([""])[0]
            with atomic_path(out / "uncond.npy") as tmp:
                tmp.write_bytes(npy_bytes(uncond))
            write_json_atomic(
                out / LATENT_MANIFEST,
                {
                    "format": LATENT_FORMAT,
                    **settings,  # what the shard markers record: preset, models, size
                    "scaling_factor": float(enc.vae.config.scaling_factor),
                    "shift_factor": vae_shift_factor(enc.vae),
                    "vae_scale_factor": enc.factor,
                    "latent_channels": int(enc.vae.config.latent_channels),
                    "moments": True,
                    "caption_source": cfg.caption_source,
                    # what the trainer may ask for: "emb" (synthetic), "alt" (alt text)
                    "captions": sorted(carried),
                    "text_dim": int(uncond.shape[-1]),
                    "uncond": "uncond.npy",
                    "source": [str(s) for s in shards]
                    if len(shards) <= 64
                    else f"{len(shards)} shards",
                    # the source's content identity, as the trainer computes it for the
                    # release itself: a resume compares it (and the models above)
                    "source_digest": sources_digest(sources),
                    "releases": releases,
                    "splits": splits or None,
                    "samples": totals["samples"] if ctx.world == 1 else None,
                    "dropped": totals["dropped"] if ctx.world == 1 else None,
                    "empty_captions": totals["empty_captions"] if ctx.world == 1 else None,
                },
            )
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()
    return written
