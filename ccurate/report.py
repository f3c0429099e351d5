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

Its memory does not grow with the run: parquet is read in batches of `BATCH_ROWS` rows,
each score's histogram is `HIST_BINS` counts filled while streaming (two passes: the
range, then the counts), the size scatter draws a seeded uniform sample of at most
`SIZE_SAMPLE` kept images, and examples are a fixed number per reason. What it holds is
O(score names x HIST_BINS + SIZE_SAMPLE + drop reasons x per_reason + one batch).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ccurate.pixels import open_image, to_rgb, upright
from ccurate.record import Sample
from ccurate.shardio import atomic_path, iter_samples, list_shards

if TYPE_CHECKING:
    from ccurate.filters.safety import SafetyFilter

STEP_ORDER = ["00_plan", "10_ingest", "20_filter", "30_dedup", "40_caption"]
HIST_BINS = 30  # bins of each score histogram, over the score's range in this run
SIZE_SAMPLE = 2000  # kept images drawn in the size scatter (a uniform sample of them)
SIZE_SEED = 0  # the sample's seed: the same run gives the same report
BATCH_ROWS = 65_536  # parquet rows read at a time


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


NOT_SHOWN = "image not shown"


def _batches(
    path: str | Path, columns: list[str], rows: int | None = None
) -> Iterator[pa.RecordBatch]:
    """`path`'s rows in batches (`BATCH_ROWS`), with those of `columns` it has (older files
    lack some)."""
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    cols = [c for c in columns if c in names]
    yield from pf.iter_batches(batch_size=rows or BATCH_ROWS, columns=cols)


def _column(batch: pa.RecordBatch, name: str, fill: Any) -> pa.Array:
    """A batch's column with nulls as `fill`; all `fill` when the file has no such column."""
    if name not in batch.schema.names:
        return pa.array([fill] * batch.num_rows)
    return pc.fill_null(batch.column(name), fill)


def _drops(work: Path, per_reason: int) -> _Drops:
    out = _Drops()
    faces = _face_blur(work)
    for step in STEP_ORDER:
        for p in sorted((work / step).glob("*dropped.parquet")):
            # counts from the reason column, batch by batch; the other columns only for the
            # rows shown, and image bytes only for those (a large run's report held them all)
            picked: list[tuple[int, dict[str, Any]]] = []
            offset = 0
            for batch in _batches(p, ["url", "drop_reason", "dropped_by"]):
                reasons = _column(batch, "drop_reason", "unknown")
                reasons = pc.if_else(pc.equal(reasons, ""), "unknown", reasons)
                for item in pc.value_counts(reasons).to_pylist():
                    reason, n = str(item["values"]), int(item["counts"])
                    out.counts[reason] += n
                    need = per_reason - len(out.examples[reason])
                    if need <= 0:
                        continue
                    at = pc.indices_nonzero(pc.equal(reasons, reason)).slice(0, need)
                    for i, row in zip(at.to_pylist(), batch.take(at).to_pylist(), strict=True):
                        out.examples[reason].append(row)
                        picked.append((offset + i, row))
                offset += batch.num_rows
            for _, row in picked:
                if row.get("drop_reason") == "nsfw":
                    row["hidden"] = f"{NOT_SHOWN} (nsfw)"
            picked = sorted(((i, r) for i, r in picked if "hidden" not in r), key=lambda x: x[0])
            if picked and "image" in pq.read_schema(p).names:
                _attach_images(p, picked)
                if faces is not None:
                    _blur_faces([row for _, row in picked], faces)
    return out


def _attach_images(path: Path, picked: list[tuple[int, dict[str, Any]]]) -> None:
    """Set each picked row's `image` (rows by index, ascending), reading the image column
    a few rows at a time and only up to the last one picked."""
    wanted = dict(picked)
    last = picked[-1][0]
    offset = 0
    for batch in _batches(path, ["image"], rows=64):
        images = batch.column("image")
        for i in range(offset, offset + batch.num_rows):
            if i in wanted:
                wanted[i]["image"] = images[i - offset].as_py()
        offset += batch.num_rows
        if offset > last:
            return


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


def _entries(col: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """The entries of a list or map column, and the row of each. From its offsets into its
    values (pyarrow's list kernels reject maps, and a map's `keys` ignore a slice)."""
    offsets = col.offsets.to_numpy()
    lengths = np.diff(offsets)
    flat = col.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    rows = np.repeat(np.arange(len(col)), lengths)
    if col.null_count:  # a null row's range (if any) holds no entries of its own
        valid = col.is_valid().to_numpy(zero_copy_only=False)[rows]
        flat, rows = flat.filter(pa.array(valid)), rows[valid]
    return flat, rows


def _scores(batch: pa.RecordBatch) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(score name, values, row of each value) for each score in a batch."""
    if "scores" not in batch.schema.names:
        return
    flat, rows = _entries(batch.column("scores"))
    if not len(flat):
        return
    names = pc.dictionary_encode(flat.field(0))
    codes = names.indices.to_numpy(zero_copy_only=False)
    values = flat.field(1).to_numpy(zero_copy_only=False).astype(np.float64)
    for j, name in enumerate(names.dictionary.to_pylist()):
        at = codes == j
        yield str(name), values[at], rows[at]


def _cut_by(batch: pa.RecordBatch, filt: str) -> np.ndarray:
    """Per row: whether filter `filt` dropped it, from the row's own decision of that
    filter (`Decision.keep`); a row without one (a record from before decisions, a stage
    that records none) was dropped by it if `dropped_by` names it. A score of `filt` on a
    row means `filt` judged it: filters only judge samples still kept."""
    cut = pc.equal(_column(batch, "dropped_by", ""), filt).to_numpy(zero_copy_only=False)
    if "decisions" in batch.schema.names:
        flat, rows = _entries(batch.column("decisions"))
        if len(flat):
            mine = pc.fill_null(pc.equal(flat.field("filter"), filt), False)
            mine = mine.to_numpy(zero_copy_only=False)
            keep = pc.fill_null(flat.field("keep"), True).to_numpy(zero_copy_only=False)
            decided = np.zeros(batch.num_rows, bool)
            decided[rows[mine]] = True
            cut[decided] = False
            cut[rows[mine & ~keep]] = True
    return cut


def _judged(work: Path) -> list[Path]:
    """The files where each sample's record ends, once each: every step's side output of
    dropped samples, and the kept index of the last step with shards. A score's histogram
    reads them: what each filter kept is there, whatever a later step did with it."""
    files = [p for step in STEP_ORDER for p in sorted((work / step).glob("*dropped.parquet"))]
    for step in reversed(STEP_ORDER[1:]):
        kept = list_shards(work / step)
        if kept:
            return files + [Path(f"{prefix}.parquet") for prefix in kept]
    return files


@dataclass
class _Hist:
    """One score over the run: its finite range (pass 1), then fixed-bin counts of the
    samples its filter kept and dropped (pass 2)."""

    low: float = np.inf
    high: float = -np.inf
    seen: int = 0  # values, finite or not
    kept: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64))
    cut: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64))

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, HIST_BINS + 1)


def _score_hists(work: Path) -> dict[str, _Hist]:
    """Each score's histogram of kept / dropped-by-its-filter samples, in memory bounded by
    the number of score names (two streaming passes over `_judged`)."""
    files = _judged(work)
    hists: dict[str, _Hist] = defaultdict(_Hist)
    for path in files:
        for batch in _batches(path, ["scores"]):
            for name, values, _ in _scores(batch):
                h = hists[name]
                h.seen += len(values)
                finite = values[np.isfinite(values)]
                if len(finite):
                    h.low, h.high = min(h.low, finite.min()), max(h.high, finite.max())
    drawn = {k: h for k, h in hists.items() if h.low < h.high}  # 2+ distinct values
    if not drawn:
        return dict(hists)
    for path in files:
        for batch in _batches(path, ["scores", "decisions", "dropped_by"]):
            cut_by: dict[str, np.ndarray] = {}
            for name, values, rows in _scores(batch):
                hist = drawn.get(name)
                if hist is None:
                    continue
                filt = name.split(".", 1)[0]
                if filt not in cut_by:
                    cut_by[filt] = _cut_by(batch, filt)
                finite = np.isfinite(values)
                cut = cut_by[filt][rows]
                edges = hist.edges
                hist.kept += np.histogram(values[finite & ~cut], bins=edges)[0]
                hist.cut += np.histogram(values[finite & cut], bins=edges)[0]
    return dict(hists)


def _size_sample(final: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(widths, heights, how many kept images have a size): a uniform sample of at most
    `SIZE_SAMPLE` of them, seeded (each gets a random priority; the smallest are kept)."""
    rng = np.random.default_rng(SIZE_SEED)
    width, height = np.zeros(0, np.int64), np.zeros(0, np.int64)
    priority = np.zeros(0)
    total = 0
    cols = ["width", "height", "original_width", "original_height"]
    for prefix in list_shards(final):
        for batch in _batches(f"{prefix}.parquet", cols):
            size = {c: _column(batch, c, 0).to_numpy(zero_copy_only=False) for c in cols}
            w = np.where(size["original_width"] != 0, size["original_width"], size["width"])
            h = np.where(size["original_height"] != 0, size["original_height"], size["height"])
            has = (w != 0) & (h != 0)
            total += int(has.sum())
            width = np.concatenate([width, w[has]])
            height = np.concatenate([height, h[has]])
            priority = np.concatenate([priority, rng.random(int(has.sum()))])
            if len(priority) > SIZE_SAMPLE:
                keep = np.sort(np.argpartition(priority, SIZE_SAMPLE - 1)[:SIZE_SAMPLE])
                width, height, priority = width[keep], height[keep], priority[keep]
    return width, height, total


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
    final = work / "40_caption" if (work / "40_caption").exists() else work / "30_dedup"
    widths, heights, n_sized = _size_sample(final)
    if n_sized:
        fig, ax = plt.subplots(figsize=(5, 4))
        ax.scatter(widths, heights, s=6, alpha=0.6)
        ax.set_xlabel("original width")
        ax.set_ylabel("original height")
        some = f" (a uniform sample of {len(widths)} of {n_sized})" if len(widths) < n_sized else ""
        plots.append((f"Sizes of kept images{some}", _png(fig)))
        plt.close(fig)
    thresholds = _thresholds(work)
    for name, h in sorted(_score_hists(work).items()):
        # NaN/inf scores are counted as left out (they made hist raise: no report at all)
        if not h.low < h.high:
            continue
        n_kept, n_cut = int(h.kept.sum()), int(h.cut.sum())
        left_out = h.seen - n_kept - n_cut
        fig, ax = plt.subplots(figsize=(4.5, 2.8))
        edges = h.edges  # each bin's count drawn as one weighted value in it
        ax.hist(
            [edges[:-1], edges[:-1]], bins=edges.tolist(), weights=[h.kept, h.cut], stacked=True,
            color=["#4f81bd", "#c0504d"],
            label=[f"kept by this filter ({n_kept})", f"dropped by this filter ({n_cut})"],
        )  # fmt: skip
        lines = thresholds.get(name, [])
        for (setting, value), style in zip(lines, ["--", ":"], strict=False):
            ax.axvline(value, color="black", linestyle=style, linewidth=1, label=_plain(setting))
        ax.set_title(_plain(name), fontsize=9)
        ax.legend(fontsize=7)
        note = f", {left_out} not finite left out" if left_out else ""
        at = "; ".join(f"{k} = {v:g}" for k, v in lines)
        cut_at = f"; cut at {at}" if at else ""
        plots.append((f"Score: {name} (kept {n_kept}, dropped {n_cut}{note}{cut_at})", _png(fig)))
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
    with atomic_path(out) as tmp:  # a failed write (full disk, a kill) keeps the last report
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return out
