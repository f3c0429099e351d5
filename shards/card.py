"""The dataset card (README.md of a release), rendered from the release's own numbers.

Every number in the card comes from the summary that the release writer
gathered while writing (also published as release.json) or from the dropped
side outputs of the run; what the run did not record is said to be
"not recorded", never left blank or guessed.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

import pyarrow.parquet as pq

from .attribution import license_name


def count_drops(dropped: list[str]) -> dict[str, Any]:
    """Drop counts per reason and per stage from the `.dropped.parquet` side outputs."""
    by_reason: Counter[str] = Counter()
    by_stage: dict[str, Counter[str]] = defaultdict(Counter)
    for path in dropped:
        p = path if str(path).endswith(".parquet") else f"{path}.dropped.parquet"
        schema = pq.read_schema(p)
        cols = [c for c in ("drop_reason", "dropped_by") if c in schema.names]
        t = pq.read_table(p, columns=cols)
        reasons = t.column("drop_reason").to_pylist() if "drop_reason" in cols else [None] * len(t)
        stages = t.column("dropped_by").to_pylist() if "dropped_by" in cols else [None] * len(t)
        for r, st in zip(reasons, stages, strict=True):
            by_reason[r or "unknown"] += 1
            by_stage[st or "unknown"][r or "unknown"] += 1
    return {
        "total": sum(by_reason.values()),
        "files": len(dropped),
        "by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "by_stage": {
            st: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
            for st, c in sorted(by_stage.items())
        },
    }


def _pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "n/a (0 samples)"


def _recorded(v: Any) -> Any:
    """A cell the run did not record says so (a stage's stats may lack a count)."""
    return "not recorded" if v is None or v == "" else v


def _table(header: list[str], rows: list[list[Any]]) -> str:
    if not rows:
        return "_none_\n"
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _json_block(obj: Any) -> str:
    return "```json\n" + json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n```\n"


def _yaml_fields(fields: list[dict[str, Any]], pad: str) -> list[str]:
    """`dataset_info.features` entries as YAML (names JSON-quoted: a score name may hold
    any character)."""
    out: list[str] = []
    for f in fields:
        out.append(f"{pad}- name: {json.dumps(f['name'])}")
        kind = next((k for k in ("struct", "list") if k in f), None)
        if kind is None:
            out.append(f"{pad}  dtype: {f['dtype']}")
        elif not f[kind]:
            out.append(f"{pad}  {kind}: []")
        else:
            out.append(f"{pad}  {kind}:")
            out += _yaml_fields(f[kind], pad + "  ")
    return out


def front_matter(s: dict[str, Any]) -> list[str]:
    """The card's YAML header, read by the Hugging Face Hub and by
    `datasets.load_dataset(<release dir>)`: a split per licence family with its shards, and
    the declared sample features (no guessing from the first samples), licence "other"
    pointing at ATTRIBUTION (each image has its own CC licence)."""
    buckets = bool((s.get("config") or {}).get("resolution_buckets"))
    lines = [
        "---",
        "license: other",
        "license_name: creative-commons-per-image",
        "license_link: ATTRIBUTION",
        "pretty_name: " + json.dumps(f"ccurate release {s['release']}"),
        "task_categories:",
        "- text-to-image",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for split in sorted(s.get("shards_per_split") or {}):
        pattern = f"{split}/res-*/*.tar" if buckets else f"{split}/*.tar"
        lines += [f"  - split: {split}", f"    path: {pattern}"]
    lines += ["dataset_info:", "  features:", *_yaml_fields(s["features"], "  "), "---", ""]
    return lines


def _rebuild_changes(add: Any, rebuild: dict[str, Any]) -> None:
    """A rebuild release: what changed since the previous release, per sample key (as the
    generation's `diff.json`); a record fetched again and kept replaced the released one."""
    diff = rebuild["diff"]
    gen = rebuild.get("generation")
    add(
        f"Rebuild generation {gen}: against the previous release, {diff.get('removed', 0)} "
        f"samples were removed, {diff.get('added', 0)} added and {diff.get('changed', 0)} "
        f"changed (per sample key, as `diff.json`); {rebuild.get('replaced', 0)} released "
        "samples were fetched again and replaced by their fresh record (still published).\n"
    )
    for title, key in (("Removed", "removed_by_reason"), ("Added", "added_by_reason")):
        rows = [[f"`{k}`", v] for k, v in (diff.get(key) or {}).items()]
        if rows:
            add(f"{title}, by reason:\n")
            add(_table(["reason", "samples"], rows))
    if diff.get("changed_fields"):
        add("Changed, by field:\n")
        add(
            _table(["field", "samples"], [[f"`{k}`", v] for k, v in diff["changed_fields"].items()])
        )


def _faces(filters: Any, blurred: int, n: int) -> str:
    """What the card says about faces: whether blurring was on, and how many were blurred."""
    safety = filters.get("safety") if isinstance(filters, dict) else None
    on = isinstance(safety, dict) and bool(safety.get("blur_faces"))
    if not on and not blurred:
        if isinstance(safety, dict):
            return (
                "Face blurring: off (`[filters.safety] blur_faces`): faces are published "
                "as found.\n"
            )
        return "Face blurring: not recorded (the run passed no safety settings).\n"
    detector = f"{safety.get('face_detector', 'nudenet')} " if isinstance(safety, dict) else ""
    return (
        f"Face blurring: on (`[filters.safety] blur_faces`); {blurred} of the {n} published "
        f"images had faces blurred ({detector}face detector: automatic and imperfect, a face "
        "it misses is published unblurred). Each kept image stored as downloaded, or with "
        "faces blurred, is re-encoded to the frame the filter judged, without metadata it "
        "could not see (EXIF thumbnails, GPS, XMP); "
        "no-derivatives (ND) works with faces to blur are dropped (`nd_needs_blur`). Blurring "
        "covers the published image only: `url` and `page_url` point to the unblurred "
        "original.\n"
    )


def render_card(s: dict[str, Any]) -> str:
    """Markdown card for the summary `s` built by the release writer."""
    ri: dict[str, Any] = s.get("run_info") or {}
    run_cfg: dict[str, Any] = ri.get("config") or {}  # the pipeline passes its whole config

    def setting(key: str) -> Any:
        return ri.get(key) or run_cfg.get(key)

    cfg: dict[str, Any] = s["config"]
    n = s["published_samples"]
    lines: list[str] = front_matter(s) if s.get("features") and s.get("shards_per_split") else []
    add = lines.append
    add(f"# ccurate release `{s['release']}`\n")
    add(
        "Creative-Commons image-text pairs for training text-to-image (latent diffusion) "
        "models, curated by the ccurate pipeline: licence-checked, filtered, deduplicated, "
        "captioned, with per-image attribution.\n"
    )
    add(f"- Release date: {s['date']}")
    for k in ("run_id", "started_at", "finished_at"):
        if ri.get(k):
            add(f"- Run {k.replace('_', ' ')}: {ri[k]}")
    add(f"- Samples published: {n} (of {s['input_samples']} kept by the curation run)")
    add(f"- Shards: {s['shards']} webdataset tar files, {_human_bytes(s['image_bytes'])} of images")
    add(f"- Image format: {cfg['image_format']} ({s['reencoded']} images re-encoded to it)\n")

    add("## Splits\n")
    add(
        "Splits follow licence families (as in CommonCatalog): `commercial` holds works whose "
        "licence allows commercial use (CC0, Public Domain Mark, CC BY, BY-SA, and BY-ND where "
        "the licence policy admitted ND), `noncommercial` the NC ones (BY-NC, BY-NC-SA, ...). "
        f"Assignment: `{s['split_policy']}`."
        + (
            " Commercial works are also included in `noncommercial` (superset)."
            if cfg.get("noncommercial_includes_commercial")
            else ""
        )
        + "\n"
    )
    add(
        _table(
            ["split", "samples", "shards"],
            [[k, v, s["shards_per_split"].get(k, 0)] for k, v in s["rows_per_split"].items()],
        )
    )
    if s["rows_per_bucket"]:
        add(f"Resolution buckets (short side lower bounds {cfg['resolution_buckets']}):\n")
        add(_table(["split/bucket", "samples"], [[k, v] for k, v in s["rows_per_bucket"].items()]))

    add("## Licences\n")
    add(
        _table(
            ["licence", "name", "samples", "share"],
            [[k, license_name(k), v, _pct(v, n)] for k, v in s["per_license"].items()],
        )
    )
    add(
        "Every image is credited in `ATTRIBUTION` (title, author, the licensor's requested "
        "credit where the source gives one, source, licence with link, "
        f"modifications). Modifications: {s['resized']} images were resized before release, "
        f"{s['reencoded']} re-encoded, {s.get('faces_blurred', 0)} had faces blurred.\n"
    )

    add("## Text\n")
    add(f"Caption policy for `{{key}}.txt`: `{cfg['caption_source']}`.\n")
    add(
        _table(
            ["text source", "samples", "share"],
            [[k, v, _pct(v, n)] for k, v in s["caption_source"].items()],
        )
    )
    models = s["caption_model"]
    if models:
        add("Synthetic caption model(s):\n")
        add(_table(["model", "samples"], [[f"`{k}`", v] for k, v in models.items()]))
    else:
        add("No published sample uses a synthetic caption.\n")
    if setting("caption"):
        add("Captioning settings (from the run):\n")
        add(_json_block(setting("caption")))

    add("## How samples were selected\n")
    drops = s["drops"]
    rebuild = ri.get("rebuild") if isinstance(ri.get("rebuild"), dict) else None
    if rebuild and isinstance(rebuild.get("diff"), dict):
        _rebuild_changes(add, rebuild)
    else:
        add(
            f"The curation run dropped {drops['total']} records (counted from "
            f"{drops['files']} dropped side outputs); reasons:\n"
        )
        add(_table(["reason", "records"], [[f"`{k}`", v] for k, v in drops["by_reason"].items()]))
    if drops["by_stage"] and not rebuild:
        rows = [[st, f"`{r}`", c] for st, rs in drops["by_stage"].items() for r, c in rs.items()]
        add("Per stage:\n")
        add(_table(["stage", "reason", "records"], rows))
    stages = [st for st in s.get("stages") or [] if isinstance(st, dict)]
    if stages:
        add("Stage counts:\n")
        add(
            _table(
                ["stage", "in", "kept", "dropped"],
                [
                    [_recorded(st.get(k)) for k in ("stage", "in", "kept", "dropped")]
                    for st in stages
                ],
            )
        )
        # ingest's inputs are URLs, pages and WARC records: one page holds many images, so
        # its row adds up only as images (the console summary says the same)
        held = [
            f"{st['stage']}: {st['in']} inputs held {st['kept'] + st['dropped']} images "
            f"({st['kept']} kept, {st['dropped']} dropped)."
            for st in stages
            if all(isinstance(st.get(k), int) for k in ("in", "kept", "dropped"))
            and st["kept"] + st["dropped"] > st["in"]
        ]
        if held:
            add(" ".join(held) + "\n")
    if s["excluded"]:
        add("Kept by the run but not published here:\n")
        add(_table(["reason", "samples"], [[f"`{k}`", v] for k, v in s["excluded"].items()]))
        if s["not_releasable_license"]:
            add("Not releasable by licence (no split admits it):\n")
            add(
                _table(
                    ["licence", "samples"], [[k, v] for k, v in s["not_releasable_license"].items()]
                )
            )
    filters = setting("filters")
    add("### Filters and thresholds\n")
    judged = (ri.get("rebuild") or {}).get("settings") or {}
    again = judged.get("safety_judged_again") or {}
    if judged.get("released_under_earlier_settings"):
        add(
            f"Note: {judged['released_under_earlier_settings']} of the published samples were "
            "judged under earlier filter or caption settings than those below (released by an "
            "earlier rebuild and not fetched again); the licence policy below was applied to "
            "them again, "
            + (
                "and the safety filter as said next.\n"
                if again.get("judged")
                else "the safety filter to none of them.\n"
            )
        )
    if again.get("judged"):
        from ccurate.release_gate import rejudged_summary

        add(f"{rejudged_summary(again)}.\n")
    if filters:
        add(_json_block(filters))
    else:
        add("Not recorded: the run passed no filter settings.\n")
    if setting("dedup"):
        add("Deduplication settings:\n")
        add(_json_block(setting("dedup")))
    for name, what in (("against", "Decontamination"), ("previous", "Earlier releases")):
        ref = (ri.get("dedup_references") or {}).get(name)
        if ref:
            unread = {k: v for k, v in (ref.get("unread") or {}).items() if v}
            add(
                f"{what} (`[dedup] {name}`): {ref['usable']} usable of {ref['rows']} reference "
                "rows"
                + (f"; not read: {json.dumps(unread, sort_keys=True)}" if unread else "")
                + ".\n"
            )
    add(
        "Duplicates merged into published samples (exact, near and semantic copies together, "
        f"each published sample's `duplicate_count` - 1): {s['duplicates_merged']}.\n"
    )
    add(_faces(filters, s.get("faces_blurred", 0), n))

    add("## Known limitations\n")
    add(
        f"- Licence evidence: {s['page_evidence']} of {n} published samples "
        f"({_pct(s['page_evidence'], n)}) were admitted on page-level evidence (a licence "
        "stated for the whole page, not the image). Such a licence may not cover an embedded "
        "image; check the source before reuse where it matters."
    )
    add(
        "- Licences are as declared by the sources; ccurate records the evidence "
        "(`license_evidence`, `license_rule` in each json) but cannot verify authorship."
    )
    add(
        "- Bias: Creative-Commons web images over-represent some hosts, regions, languages and "
        "subjects (photography of places and objects; few people); alt text is often terse or "
        "SEO text, and synthetic captions inherit the captioning model's biases and errors."
    )
    add(
        "- Safety and quality filters are automatic and imperfect: expect some false "
        "negatives (unwanted images kept) and false positives (good images dropped).\n"
    )

    add("## Files and loading\n")
    add(
        "- `<split>/[res-N/]<split>-NNNNNN.tar`: webdataset shards; per sample "
        f"`{{key}}.{cfg['image_format']}`, `{{key}}.txt`, `{{key}}.json` (full record)"
        + (", `{key}.alt.txt`" if cfg["caption_source"] == "both" else "")
        + "; `.parquet` index (img2dataset columns) and `.stats.json` per shard."
    )
    add(
        "- Captions: the text to train on is `{key}.txt`. The `.parquet` index's `caption` is "
        "that text (img2dataset's meaning) and its `synthetic_caption` the captioning model's "
        "output; in `{key}.json`, `text` is that text, `caption` the model's output only "
        '("" when the text came from alt text) and `alt_text` the page\'s; `caption_source` '
        "says which one `.txt` holds."
    )
    add("- `manifest.parquet`: every published sample with split, shard and byte offset.")
    add("- `excluded.parquet`: kept samples not published, with the reason.")
    add("- `release.json`: the numbers of this card. Verify with `sha256sum -c SHA256SUMS`.\n")
    per_split = s["shards_per_split"]
    if per_split and not s["rows_per_bucket"]:
        split, k = next(iter(per_split.items()))
        urls = f"{split}/{split}-{{000000..{k - 1:06d}}}.tar"
        add("```python")
        add("import webdataset as wds")
        add(
            f'ds = wds.WebDataset("{urls}").decode("pil")'
            f'.to_tuple("{cfg["image_format"]}", "txt", "json")'
        )
        add("```")
    add("With Hugging Face `datasets` (splits and features from this card's header):\n")
    add("```python")
    add("import datasets")
    add('ds = datasets.load_dataset("path/to/this/release")')
    add("```")
    add(
        "\nWith `data_files` (a list of shards), pass the features `release.json` declares: "
        "without them `datasets` guesses the schema from the first 5 samples, and a score "
        "null in all of them but set later fails the load.\n"
    )
    add("```python")
    add("import datasets, json")
    add('features = datasets.Features._from_yaml_list(json.load(open("release.json"))["features"])')
    add(
        'ds = datasets.load_dataset("webdataset", data_files={"train": shards}, '
        'features=features, split="train")'
    )
    add("```")
    return "\n".join(lines) + "\n"
