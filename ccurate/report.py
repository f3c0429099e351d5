"""A self-contained HTML report of a run: counts, drop reasons, score plots, sample grids.

Everything is read back from the work directory (stage shards and their
dropped side outputs), so the report can be made for any finished or
resumed run, and embedded images make it a single file to share.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageOps

from ccurate.pixels import to_rgb
from ccurate.shardio import iter_samples, list_shards

STEP_ORDER = ["00_plan", "10_ingest", "20_filter", "30_dedup", "40_caption"]


def _thumb(data: bytes | None, size: int = 128) -> str | None:
    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.draft("RGB", (size, size))
            # upright as a viewer shows it, transparency on white (convert made it black)
            im = to_rgb(ImageOps.exif_transpose(opened))
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


def _drops(work: Path, per_reason: int) -> tuple[Counter[str], dict[str, list[dict[str, Any]]]]:
    counts: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for step in STEP_ORDER:
        for p in sorted((work / step).glob("*dropped.parquet")):
            # counts from the small columns; image bytes only for the rows shown (reading
            # every dropped image made a large run's report hold them all in memory)
            cols = ["url", "drop_reason", "dropped_by"]
            names = pq.read_schema(p).names
            t = pq.read_table(p, columns=[c for c in cols if c in names])
            picked: list[tuple[int, dict[str, Any]]] = []
            for i, row in enumerate(t.to_pylist()):
                reason = row.get("drop_reason") or "unknown"
                counts[reason] += 1
                if len(examples[reason]) < per_reason:
                    examples[reason].append(row)
                    picked.append((i, row))
            if picked and "image" in names:
                column = pq.read_table(p, columns=["image"])["image"]
                images = column.take([i for i, _ in picked]).to_pylist()
                for (_, row), image in zip(picked, images, strict=True):
                    row["image"] = image
    return counts, examples


def _plots(work: Path, drop_counts: Counter[str]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: list[tuple[str, str]] = []
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
    for name, values in sorted(scores.items()):
        # NaN/inf scores make hist raise (and a whole run end without its report)
        finite = [v for v in values if v is not None and math.isfinite(v)]
        if len(set(finite)) < 2:
            continue
        fig, ax = plt.subplots(figsize=(4, 2.6))
        ax.hist(finite, bins=30, color="#4f81bd")
        ax.set_title(_plain(name), fontsize=9)
        left_out = len(values) - len(finite)
        note = f", {left_out} not finite left out" if left_out else ""
        plots.append((f"Score: {name} (kept samples{note})", _png(fig)))
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
    drop_counts, drop_examples = _drops(work, per_reason)
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
    for title, src in _plots(work, drop_counts):
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
            img = f"<img src='{thumb}'>" if thumb else "<div style='height:128px'>no image</div>"
            parts.append(
                f"<div class='cell'>{img}<br>{html.escape(str(row.get('url'))[-60:])}</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out
