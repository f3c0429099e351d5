"""A self-contained HTML report of a run: counts, drop reasons, score plots, sample grids.

Everything is read back from the work directory (stage shards and their
dropped side outputs), so the report can be made for any finished or
resumed run, and embedded images make it a single file to share.

Being shared, it shows no image the run would not publish: never one of an `nsfw` drop,
and, when the run blurs faces (`[filters.safety] blur_faces` in the filter step's
`_SETTINGS`), each dropped sample shown goes through the run's safety filter first (most
were dropped before it, unblurred): faces blurred, or no image when the filter drops it.
Images decode under the shared pixel cap (`ccurate.pixels.open_image`), and the blur is the
safety filter's own re-encode, bounded by its `max_pixels`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from ccurate.pixels import open_image, to_rgb, upright
from ccurate.record import Sample
from ccurate.shardio import iter_samples, list_shards

if TYPE_CHECKING:
    from ccurate.filters.safety import SafetyFilter

STEP_ORDER = ["00_plan", "10_ingest", "20_filter", "30_dedup", "40_caption"]


def _thumb(data: bytes | None, size: int = 128) -> str | None:
    if not data:
        return None
    try:
        with open_image(data) as opened:  # the shared pixel cap, whatever the process
            opened.draft("RGB", (size, size))
            # upright as a viewer shows it, transparency on white (convert made it black)
            im = to_rgb(upright(opened))
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plain(label: str) -> str:
    """A label matplotlib draws as is: `$...$` in a reason or score name would be parsed
    as mathtext (and a malformed one makes savefig raise)."""
    return label.replace("$", r"\$")


# score -> the [filters.<section>] settings its filter cuts at (drawn as lines on its plot)
THRESHOLDS: dict[str, tuple[tuple[str, str], ...]] = {
    "quality.width": (("quality", "min_side"),),
    "quality.height": (("quality", "min_side"),),
    "quality.aspect": (("quality", "max_aspect"),),
    "quality.file_bytes": (("quality", "min_file_bytes"),),
    "quality.entropy": (("quality", "min_entropy"),),
    "quality.grey_std": (("quality", "min_std"),),
    "quality.blur": (("quality", "min_blur"),),
    "clip_score.score": (("clip_score", "min_score"),),
    "aesthetic.score": (("aesthetic", "min_score"),),
    "safety.nsfw": (("safety", "threshold"), ("safety", "threshold_alone")),
    "watermark.pwatermark_ocr": (("watermark", "ocr_threshold"),),
    "watermark.pwatermark": (("watermark", "model_threshold"),),
}


@dataclass
class _Drops:
    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    # score -> its values on the samples its own filter dropped (the part a kept-only
    # histogram cannot show: where the cut fell)
    scores: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


NOT_SHOWN = "image not shown"


def _drops(work: Path, per_reason: int) -> _Drops:
    out = _Drops()
    faces = _face_blur(work)
    for step in STEP_ORDER:
        for p in sorted((work / step).glob("*dropped.parquet")):
            # counts from the small columns; image bytes only for the rows shown (reading
            # every dropped image made a large run's report hold them all in memory)
            cols = ["url", "drop_reason", "dropped_by", "scores"]
            names = pq.read_schema(p).names
            t = pq.read_table(p, columns=[c for c in cols if c in names])
            picked: list[tuple[int, dict[str, Any]]] = []
            for i, row in enumerate(t.to_pylist()):
                reason = row.get("drop_reason") or "unknown"
                out.counts[reason] += 1
                by = row.get("dropped_by")
                for k, v in row.pop("scores", None) or []:
                    if by and k.startswith(f"{by}."):
                        out.scores[k].append(v)
                if len(out.examples[reason]) < per_reason:
                    out.examples[reason].append(row)
                    picked.append((i, row))
            for _, row in picked:
                if row.get("drop_reason") == "nsfw":
                    row["hidden"] = f"{NOT_SHOWN} (nsfw)"
            picked = [(i, row) for i, row in picked if "hidden" not in row]
            if picked and "image" in names:
                column = pq.read_table(p, columns=["image"])["image"]
                images = column.take([i for i, _ in picked]).to_pylist()
                for (_, row), image in zip(picked, images, strict=True):
                    row["image"] = image
                if faces is not None:
                    _blur_faces([row for _, row in picked], faces)
    return out


def _face_blur(work: Path) -> SafetyFilter | None:
    """The run's safety filter when the run blurs faces, else None. Its recorded settings,
    with the NSFW rule on even if the run had it off: what it judges here is only shown."""
    from ccurate.filters.safety import SafetyConfig, SafetyFilter

    section = _filter_settings(work).get("safety")
    if not isinstance(section, dict) or not section.get("blur_faces"):
        return None
    try:
        cfg = SafetyConfig.model_validate({**section, "enabled": True})
    except ValueError:  # settings of another version: the defaults, blurring on
        cfg = SafetyConfig(blur_faces=True)
    return SafetyFilter(cfg)


def _blur_faces(rows: list[dict[str, Any]], faces: SafetyFilter) -> None:
    """Replace each row's image by the safety filter's output (faces blurred); a row the
    filter drops (NSFW, undecodable) keeps no image."""
    shown = [r for r in rows if r.get("image")]
    samples = [Sample(key=str(i), url="", image=r["image"]) for i, r in enumerate(shown)]
    for row, s, d in zip(shown, samples, faces.decide_batch(samples), strict=True):
        row["image"] = s.image if d.keep else None
        if not d.keep:
            row["hidden"] = f"{NOT_SHOWN} ({d.reason})"


def _filter_settings(work: Path) -> dict[str, Any]:
    """The filter step's recorded settings (`_SETTINGS`: what the run was made with, not
    today's config file); {} when not recorded."""
    try:
        filters = json.loads((work / "20_filter" / "_SETTINGS").read_text()).get("filters", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return filters if isinstance(filters, dict) else {}


def _thresholds(work: Path) -> dict[str, list[tuple[str, float]]]:
    """score -> [(setting, value)] from the filter step's recorded settings."""
    filters = _filter_settings(work)
    out: dict[str, list[tuple[str, float]]] = {}
    for score, settings in THRESHOLDS.items():
        for section, key in settings:
            value = (filters.get(section) or {}).get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                out.setdefault(score, []).append((f"{section}.{key}", float(value)))
    return out


def _plots(work: Path, drops: _Drops) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: list[tuple[str, str]] = []
    drop_counts = drops.counts
    if drop_counts:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(drop_counts) + 1))
        items = drop_counts.most_common()
        labels = [_plain(k) for k, _ in items][::-1]
        ax.barh(labels, [v for _, v in items][::-1], color="#c0504d")
        ax.set_xlabel("samples dropped")
        plots.append(("Drops by reason", _png(fig)))
        plt.close(fig)
    scores: dict[str, list[float]] = defaultdict(list)
    sizes: list[tuple[int, int]] = []
    final = work / "40_caption" if (work / "40_caption").exists() else work / "30_dedup"
    for prefix in list_shards(final):
        t = pq.read_table(
            f"{prefix}.parquet",
            columns=["scores", "width", "height", "original_width", "original_height"],
        )
        for row in t.to_pylist():
            for k, v in row["scores"] or []:
                scores[k].append(v)
            w, h = row["original_width"] or row["width"], row["original_height"] or row["height"]
            if w and h:
                sizes.append((w, h))
    if sizes:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter([w for w, _ in sizes], [h for _, h in sizes], s=6, alpha=0.6)
        ax.set_xlabel("original width")
        ax.set_ylabel("original height")
        plots.append(("Sizes of kept images", _png(fig)))
        plt.close(fig)
    thresholds = _thresholds(work)
    for name in sorted(set(scores) | set(drops.scores)):
        # NaN/inf scores make hist raise (and a whole run end without its report)
        kept = [v for v in scores.get(name, []) if v is not None and math.isfinite(v)]
        cut = [v for v in drops.scores.get(name, []) if v is not None and math.isfinite(v)]
        if len(set(kept + cut)) < 2:
            continue
        left_out = len(scores.get(name, [])) + len(drops.scores.get(name, [])) - len(kept + cut)
        fig, ax = plt.subplots(figsize=(4.5, 2.8))
        ax.hist(
            [kept, cut], bins=30, stacked=True, color=["#4f81bd", "#c0504d"],
            label=[f"kept ({len(kept)})", f"dropped by this filter ({len(cut)})"],
        )  # fmt: skip
        lines = thresholds.get(name, [])
        for (setting, value), style in zip(lines, ["--", ":"], strict=False):
            ax.axvline(value, color="black", linestyle=style, linewidth=1, label=_plain(setting))
        ax.set_title(_plain(name), fontsize=9)
        ax.legend(fontsize=7)
        note = f", {left_out} not finite left out" if left_out else ""
        at = "; ".join(f"{k} = {v:g}" for k, v in lines)
        cut_at = f"; cut at {at}" if at else ""
        plots.append(
            (f"Score: {name} (kept {len(kept)}, dropped {len(cut)}{note}{cut_at})", _png(fig))
        )
        plt.close(fig)
    return plots


def write_report(
    work: str | Path, out: str | Path | None = None, per_reason: int = 8, kept_examples: int = 24
) -> Path:
    """Write `report.html` for the run in `work`; returns its path."""
    work = Path(work)
    out = Path(out) if out else work / "report.html"
    summary_path = work / "summary.json"
    steps = json.loads(summary_path.read_text())["steps"] if summary_path.exists() else []
    drops = _drops(work, per_reason)
    drop_counts, drop_examples = drops.counts, drops.examples
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>ccurate run report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        ".grid{display:flex;flex-wrap:wrap;gap:6px}.cell{width:132px;font-size:11px;"
        "word-break:break-all}"
        ".cell img{width:128px;height:128px;object-fit:contain;background:#eee}"
        "</style></head><body><h1>ccurate run report</h1>",
        "<h2>Steps</h2><table><tr><th>step</th><th>in</th><th>kept</th><th>dropped</th>"
        "<th>drop reasons</th><th>wall s</th></tr>",
    ]
    for s in steps:
        reasons = ", ".join(f"{k}: {v}" for k, v in s.get("drops", {}).items()) or "-"
        parts.append(
            f"<tr><td>{html.escape(s['stage'])}</td><td>{s['in']}</td><td>{s['kept']}</td>"
            f"<td>{s['dropped']}</td><td>{html.escape(reasons)}</td>"
            f"<td>{s.get('wall_seconds', s['seconds'])}</td></tr>"
        )
    parts.append("</table>")
    for title, src in _plots(work, drops):
        parts.append(f"<h3>{html.escape(title)}</h3><img src='{src}'>")
    final = work / "40_caption" if (work / "40_caption").exists() else work / "30_dedup"
    kept_cells: list[str] = []
    for prefix in list_shards(final):
        for batch in iter_samples(prefix, batch_size=32):
            for s in batch:
                thumb = _thumb(s.image)
                if thumb and len(kept_cells) < kept_examples:
                    label = s.caption or s.alt_text or ""
                    kept_cells.append(
                        f"<div class='cell'><img src='{thumb}'><br>{html.escape(s.license or '?')}"
                        f"<br>{html.escape(label[:80])}</div>"
                    )
            if len(kept_cells) >= kept_examples:
                break
        if len(kept_cells) >= kept_examples:
            break
    parts.append(f"<h2>Kept samples (first {len(kept_cells)})</h2><div class='grid'>")
    parts += kept_cells
    parts.append("</div><h2>Dropped samples by reason</h2>")
    for reason, rows in sorted(drop_examples.items()):
        parts.append(f"<h3>{html.escape(reason)} ({drop_counts[reason]})</h3><div class='grid'>")
        for row in rows:
            thumb = _thumb(row.get("image"))
            why = html.escape(row.get("hidden", "no image"))
            img = f"<img src='{thumb}'>" if thumb else f"<div style='height:128px'>{why}</div>"
            parts.append(
                f"<div class='cell'>{img}<br>{html.escape(str(row.get('url'))[-60:])}</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
