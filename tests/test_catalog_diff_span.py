"""Catalog diff across more than one generation (review finding F4): a -> c must explain each
key as the chain a -> b -> c does, not give every removal as `not_in_release_inputs`."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ccurate.record import Sample, samples_to_table
from ccurate.shards.catalog import Catalog
from ccurate.shards.release import SUCCESS

# generation -> (kept in its run, {key: drop reason} in its run, released, {key: exclusion})
GENS: list[tuple[list[str], dict[str, str], list[str], dict[str, str]]] = [
    (  # r1
        ["stay", "take", "back", "back2", "excl", "gone", "late", "two"],
        {"new": "watermark"},
        ["stay", "take", "back", "back2", "excl", "gone", "late", "two"],
        {},
    ),
    (  # r2: takedown, transient drops, an exclusion, a key that left the inputs
        ["excl", "new"],
        {"take": "takedown", "back": "http_503", "back2": "http_503"},
        ["stay", "late", "two"],
        {"excl": "not_releasable", "new": "not_releasable"},
    ),
    (  # r3: re-added, a second drop of removed keys for other reasons, new keys
        ["back", "back2", "new", "fresh"],
        {
            "take": "license_not_allowed",
            "excl": "takedown",
            "gone": "takedown",
            "late": "license_not_allowed",
        },
        ["stay", "back", "back2", "new", "fresh", "two"],
        {},
    ),
    (  # r4: a re-added key removed again, for another reason
        [],
        {"back2": "optout_x_robots_tag", "two": "optout_tdmrep"},
        ["stay", "back", "new", "fresh"],
        {},
    ),
]
NAMES = [f"ds-r000{i + 1}" for i in range(len(GENS))]


def _release(d: Path, name: str, keys: list[str], excluded: dict[str, str]) -> Path:
    """What `record_release` and the diff read: manifest, exclusions, the `_SUCCESS` marker."""
    d.mkdir(parents=True)
    n = len(keys)
    pq.write_table(
        pa.table(
            {"key": keys, "split": ["commercial"] * n, "shard": ["s-00000"] * n,
             "offset": list(range(n)), "license": ["CC0-1.0"] * n,
             "license_family": ["permissive"] * n}
        ),
        d / "manifest.parquet",
    )  # fmt: skip
    pq.write_table(
        pa.table(
            {"key": list(excluded), "reason": list(excluded.values()),
             "detail": [""] * len(excluded)},
            schema=pa.schema([("key", pa.string()), ("reason", pa.string()),
                              ("detail", pa.string())]),
        ),
        d / "excluded.parquet",
    )  # fmt: skip
    (d / SUCCESS).write_text(json.dumps({"release": name}))
    return d


def _run(cat: Catalog, d: Path, run_id: str, kept: list[str], dropped: dict[str, str]) -> None:
    ok = [Sample(key=k, url=f"https://example.org/{k}.jpg", license="CC0-1.0") for k in kept]
    gone = []
    for k, why in dropped.items():
        s = Sample(key=k, url=f"https://example.org/{k}.jpg", license="CC0-1.0")
        s.drop(why, "rebuild")
        gone.append(s)
    d.mkdir(parents=True)
    pq.write_table(samples_to_table(ok), d / "kept.parquet")
    pq.write_table(samples_to_table(gone), d / "kept.dropped.parquet")
    cat.record_run([str(d / "kept")], [str(d / "kept.dropped.parquet")], run_id)


@pytest.fixture(scope="module")
def cat_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("span")
    with Catalog(root / "catalog") as cat:
        for name, (kept, dropped, released, excluded) in zip(NAMES, GENS, strict=True):
            _run(cat, root / "runs" / name, name, kept, dropped)
            cat.record_release(_release(root / "rel" / name, name, released, excluded))
    return root / "catalog"


def _whys(cat: Catalog, a: str, b: str) -> dict[str, tuple[str, str | None]]:
    return {
        r["key"]: (r["change"], r["why"])
        for r in cat.diff_table(a, b).to_pylist()
        if r["change"] != "unchanged"
    }


def test_span_diff_reasons_per_key(cat_dir: Path) -> None:
    """r1 -> r4: each removal by the event that took the key out after its last release
    (a takedown dropped again later for another reason stays a takedown); a key removed,
    re-added and removed again by its last removal; an addition by the release before it."""
    with Catalog(cat_dir, read_only=True) as cat:
        got = _whys(cat, "ds-r0001", "ds-r0004")
        assert got == {
            "take": ("removed", "dropped:takedown"),  # not r3's license_not_allowed
            "excl": ("removed", "excluded:not_releasable"),  # kept in r2, not released
            "gone": ("removed", "not_in_release_inputs"),  # r2 lost it; r3's drop is later
            "late": ("removed", "dropped:license_not_allowed"),
            "back2": ("removed", "dropped:optout_x_robots_tag"),  # its last removal (r4)
            "two": ("removed", "dropped:optout_tdmrep"),
            "new": ("added", "was_excluded:not_releasable"),  # r2 excluded it, r3 added it
            "fresh": ("added", "new"),
        }
        # removed in r2 and re-added in r3: added from r2 on, with r2's drop as the reason
        assert _whys(cat, "ds-r0002", "ds-r0004") == {
            "back": ("added", "previously_dropped:http_503"),
            "new": ("added", "was_excluded:not_releasable"),
            "fresh": ("added", "new"),
            "late": ("removed", "dropped:license_not_allowed"),  # r3 dropped it
            "two": ("removed", "dropped:optout_tdmrep"),
        }
        # re-added before c: r1 -> r3 does not list it at all
        assert "back" not in _whys(cat, "ds-r0001", "ds-r0003")
        d = cat.diff("ds-r0001", "ds-r0004")
        assert d["removed_why"]["dropped:takedown"] == 1
        assert "not_in_release_inputs" in d["removed_why"]  # only "gone"
        assert d["removed_why"]["not_in_release_inputs"] == 1


def test_span_diff_equals_the_chain_of_consecutive_diffs(cat_dir: Path) -> None:
    """For every pair i < j: a key's change and why equal those of the consecutive step at
    which it last changed (from the last release holding, or lacking, it)."""
    with Catalog(cat_dir, read_only=True) as cat:
        steps = [_whys(cat, NAMES[i], NAMES[i + 1]) for i in range(len(NAMES) - 1)]
        held = [set(g[2]) for g in GENS]
        for i in range(len(NAMES)):
            for j in range(i + 1, len(NAMES)):
                want = {}
                for k in held[i] ^ held[j]:
                    inside = k in held[j]  # added: last release lacking it; removed: holding
                    last = max(m for m in range(i, j) if (k in held[m]) != inside)
                    want[k] = steps[last][k]
                got = {k: v for k, v in _whys(cat, NAMES[i], NAMES[j]).items()
                       if v[0] in ("added", "removed")}  # fmt: skip
                assert got == want, (NAMES[i], NAMES[j])


def test_consecutive_and_reverse_diffs_keep_their_reasons(cat_dir: Path) -> None:
    """Consecutive diffs read b's run only; a reverse diff (b recorded before a) has no span."""
    with Catalog(cat_dir, read_only=True) as cat:
        assert _whys(cat, "ds-r0002", "ds-r0003") == {
            "back": ("added", "previously_dropped:http_503"),
            "back2": ("added", "previously_dropped:http_503"),
            "new": ("added", "was_excluded:not_releasable"),
            "fresh": ("added", "new"),
            "late": ("removed", "dropped:license_not_allowed"),
        }
        back = _whys(cat, "ds-r0004", "ds-r0001")
        assert back["take"] == ("added", "new")  # no run before r1's dropped it
        assert back["fresh"] == ("removed", "not_in_release_inputs")


def test_a_drop_in_an_unpublished_run_explains_nothing(tmp_path: Path) -> None:
    """A generation that published nothing changed no release: its transient refetch
    failure (the released record stays) must not explain a later takedown."""
    with Catalog(tmp_path / "catalog") as cat:
        _run(cat, tmp_path / "runs" / "r1", "r1", ["x", "y"], {})
        cat.record_release(_release(tmp_path / "rel" / "r1", "r1", ["x", "y"], {}))
        _run(cat, tmp_path / "runs" / "r2", "r2", [], {"x": "http_503"})  # no release
        _run(cat, tmp_path / "runs" / "r3", "r3", [], {"x": "takedown"})
        cat.record_release(_release(tmp_path / "rel" / "r3", "r3", ["y"], {}))
        assert _whys(cat, "r1", "r3") == {"x": ("removed", "dropped:takedown")}


def test_another_datasets_releases_in_the_catalog_are_not_steps(tmp_path: Path) -> None:
    """Two datasets recorded in one catalog: y's release between x's two is not a step of
    x's line (it does not hold x's keys, which read as removed there)."""
    with Catalog(tmp_path / "catalog") as cat:
        _run(cat, tmp_path / "runs" / "x-r1", "x-r1", ["a", "b"], {})
        cat.record_release(_release(tmp_path / "rel" / "x-r1", "x-r1", ["a", "b"], {}))
        _run(cat, tmp_path / "runs" / "y-r1", "y-r1", ["c"], {})
        cat.record_release(_release(tmp_path / "rel" / "y-r1", "y-r1", ["c"], {}))
        _run(cat, tmp_path / "runs" / "x-r2", "x-r2", ["b"], {"a": "takedown"})
        cat.record_release(_release(tmp_path / "rel" / "x-r2", "x-r2", ["b"], {}))
        assert _whys(cat, "x-r1", "x-r2") == {"a": ("removed", "dropped:takedown")}
