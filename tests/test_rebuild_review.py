"""Review of rebuilds, takedowns and opt-out re-checks: each test pins one bug found in review
(a takedown that leaked, a bad list that crashed, a race, a count lost on resume)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ccurate.executor import LocalExecutor
from ccurate.rebuild import RebuildConfig, rebuild
from ccurate.takedown import TakedownError, TakedownList, load_entries, make_entry
from ccurate.takedown_match import Blocklist, match_index
from tests.test_rebuild import CountingHandler, _config, _release_urls, _serve, _tiny_site
from tests.test_takedown import _index


def _handler() -> type[CountingHandler]:
    return type("H", (CountingHandler,), {"hits": Counter(), "fail": {}, "headers_for": {}})


# --------------------------------------------------------------------------- takedowns


def test_sha256_takedown_of_the_released_bytes_removes_the_sample(tmp_path: Path) -> None:
    """docs: kind `sha256` matches "the fetched file's SHA-256 (also the released bytes)".
    Ingest re-encodes the image, so the bytes a rights holder downloads from the release
    (`image_sha256`) differ from the fetched file's `sha256`; the takedown must still apply."""
    _tiny_site(tmp_path)
    server, base = _serve(tmp_path / "corpus", _handler())
    rc = RebuildConfig(report=False, recheck_optout_days=None)
    ex = LocalExecutor(1, progress=False)
    cfg = _config(tmp_path, base, ["/pages/p.html"])
    try:
        g1 = rebuild(cfg, rc, ex)
        assert g1.release is not None
        man = pq.read_table(g1.release / "manifest.parquet").to_pylist()
        row = next(r for r in man if r["url"] == base + "/img/0.jpg")
        assert row["image_sha256"] != row["sha256"]  # re-encoded at ingest
        TakedownList(tmp_path / "catalog").add(
            [make_entry("sha256", row["image_sha256"], "hash of the file in your dataset")]
        )
        g2 = rebuild(cfg, rc, ex)
    finally:
        server.shutdown()
        server.server_close()
    assert g2.release is not None
    assert _release_urls(g2.release) == {base + "/img/1.jpg"}
    assert g2.info["diff"]["removed_by_reason"] == {"takedown": 1}


def test_author_takedown_matches_as_the_entry_normalises() -> None:
    """An author entry is stored casefolded with whitespace collapsed ("Straße" -> "strasse");
    the release input's author must be compared the same way, not just lower-cased."""
    block = Blocklist()
    block.add_entries(
        [make_entry("author", "Jürgen Straße"), make_entry("author", "Li Wei")], radius=8
    )
    rows = [
        {"key": "a", "author": "Jürgen Straße"},
        {"key": "b", "author": "Li\n  Wei"},
        {"key": "c", "author": "LI WEI "},
        {"key": "d", "author": "Ana Ruiz"},
        {"key": "e", "author": None},
    ]
    got = match_index(_index(rows), block)
    assert sorted(got.column("key").to_pylist()) == ["a", "b", "c"]


def test_a_takedown_list_that_is_not_utf8_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "takedowns.jsonl"
    good = make_entry("url", "http://a.example/x.jpg", "r", "me").model_dump_json()
    path.write_bytes(good.encode() + b'\n{"kind": "author", "value": "Jos\xe9"}\n')
    with pytest.raises(TakedownError, match=r"takedowns\.jsonl:2: .*UTF-8"):
        load_entries(path)


def test_loading_the_list_waits_for_an_append_in_progress(tmp_path: Path) -> None:
    """`takedown add` appends under an exclusive flock; a rebuild starting at that moment
    must not read the half-written line (and stop with 'invalid JSON')."""
    lst = TakedownList(tmp_path)
    lst.add([make_entry("url", "http://a.example/x.jpg", "r", "me")])
    line = make_entry("author", "Li Wei", "r", "me").model_dump_json() + "\n"
    fd = os.open(lst.path, os.O_RDWR | os.O_APPEND)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, line[:10].encode())  # the writer is mid-line
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(_try_load(lst)))
    reader.start()
    time.sleep(0.3)
    os.write(fd, line[10:].encode())
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    reader.join(10)
    assert got and not isinstance(got[0], Exception), got
    assert [e.kind for e in got[0]] == ["url", "author"]


def _try_load(lst: TakedownList) -> Any:
    try:
        return lst.load()
    except Exception as e:
        return e


# --------------------------------------------------------------------------- diff


def test_diff_reads_a_previous_ledger_under_a_path_with_a_quote(tmp_path: Path) -> None:
    from ccurate.rebuild_ledger import LEDGER_SCHEMA
    from ccurate.release_diff import DIFF_FIELDS, diff_release_inputs

    d = tmp_path / "o'brien"
    d.mkdir()
    new = d / "new.parquet"
    row = {"key": "k1", **dict.fromkeys(DIFF_FIELDS, "x")}
    pq.write_table(pa.Table.from_pylist([row]), new)
    ledger = d / "ledger.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [{"key": "k1", "outcome": "transient", "reason": "http_503", "attempts": 1}],
            schema=LEDGER_SCHEMA,
        ),
        ledger,
    )
    out = diff_release_inputs([], [str(new).removesuffix(".parquet")], [], ledger, d)
    assert out["added_by_reason"] == {"previously_transient:http_503": 1}


# --------------------------------------------------------------------------- generations


def test_a_resumed_rebuild_reports_the_same_recheck_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rebuild.json "says what the generation did": killed after the re-check, the rerun
    must still report how many released samples were due (the counts are in the marker)."""
    import ccurate.rebuild as rb

    _tiny_site(tmp_path)
    server, base = _serve(tmp_path / "corpus", _handler())
    rc = RebuildConfig(report=False, recheck_optout_days=0)
    ex = LocalExecutor(1, progress=False)
    cfg = _config(tmp_path, base, ["/pages/p.html"])
    real = rb._map_gate

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    try:
        rebuild(cfg, rc, ex)
        monkeypatch.setattr(rb, "_map_gate", killed)
        with pytest.raises(KeyboardInterrupt):
            rebuild(cfg, rc, ex)
        monkeypatch.setattr(rb, "_map_gate", real)
        g2 = rebuild(cfg, rc, ex)
    finally:
        server.shutdown()
        server.server_close()
    assert g2.generation == 2
    rc2 = g2.info["recheck"]
    assert rc2["due"] == 2 and rc2["not_due"] == 0 and rc2["checked"] == 2, rc2


def test_the_takedown_snapshot_is_utf8_whatever_the_locale(tmp_path: Path) -> None:
    """The list is UTF-8 (and read as UTF-8); the generation's snapshot must be written as
    UTF-8 too, or a reason like "Urheberrechtsverstoß" crashes a rebuild under LANG=C."""
    import subprocess
    import sys

    TakedownList(tmp_path / "catalog").add(
        [make_entry("url", "http://a.example/x.jpg", "Urheberrechtsverstoß", "me")]
    )
    code = (
        "import sys\nfrom pathlib import Path\nfrom ccurate.config import parse_config\n"
        "from ccurate.rebuild import RebuildConfig, _open_generation\n"
        "root = Path(sys.argv[1])\n"
        "cfg = parse_config({'run': {'work_dir': str(root / 'work'),"
        " 'catalog_dir': str(root / 'catalog')}})\n"
        "gen, _ = _open_generation(root / 'work', cfg, RebuildConfig(), 1.8e9)\n"
        "print(gen.dir)\n"
    )
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0"}
    env["PYTHONCOERCECLOCALE"] = "0"
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-2000:]
    snap = load_entries(Path(res.stdout.strip()) / "takedowns.jsonl")
    assert [e.reason for e in snap] == ["Urheberrechtsverstoß"]


def test_a_malformed_ledger_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    from ccurate.pipeline import PipelineError
    from ccurate.rebuild import Generation
    from ccurate.rebuild_ledger import Ledger

    gen = Generation(1, tmp_path / "gen-0001", 1.8e9, "t-r0001")
    gen.dir.mkdir()
    (gen.dir / "ledger.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PipelineError, match=r"gen-0001/ledger\.parquet.*unreadable"):
        Ledger.load(gen)


# --------------------------------------------------------------------------- lookup


@pytest.mark.parametrize("radius", [-1, 65])
def test_lookup_refuses_a_radius_that_cannot_mean_anything(tmp_path: Path, radius: int) -> None:
    """A negative radius would answer "not in release" for every image: a wrong all-clear
    to a rights holder. It is bad usage (exit 2), said as such."""
    from typer.testing import CliRunner

    from ccurate.cli import app
    from ccurate.lookup import ReleaseLookupError, lookup

    with pytest.raises(ReleaseLookupError, match="radius"):
        lookup([tmp_path / "a.jpg"], tmp_path, radius=radius)
    res = CliRunner().invoke(
        app,
        ["lookup", str(tmp_path / "a.jpg"), "--release", str(tmp_path), "--radius", str(radius)],
    )
    assert res.exit_code == 2 and "radius" in res.output, res.output


def test_false_in_toml_means_never_for_the_day_settings() -> None:
    """TOML has no null: `recheck_optout_days = false` read as 0, re-checking on every
    rebuild, the opposite of what it says."""
    from ccurate.rebuild import RebuildConfig

    cfg = RebuildConfig(recheck_optout_days=False, refetch_after_days=False)  # type: ignore[arg-type]
    assert cfg.recheck_optout_days is None and cfg.refetch_after_days is None
    assert RebuildConfig(recheck_optout_days=0).recheck_optout_days == 0
    with pytest.raises(ValueError, match="false for never"):
        RebuildConfig(recheck_optout_days=True)  # type: ignore[arg-type]
