"""The catalog: every URL and sample ever seen, and which releases hold it (embedded DuckDB).

Lives in `catalog_dir/catalog.duckdb`. Tables:

- `runs(run_id, recorded_at, kept, dropped, kept_shards, dropped_files)`
- `samples(key, url, page_url, status, drop_reason, dropped_by, duplicate_of, hashes,
  license..., license_decision, width, height, caption_model, first_run, last_run)`:
  the latest state of every sample; `first_run` is kept from the first sighting
- `sample_runs(run_id, key, status, drop_reason, dropped_by)`: the full history
- `releases(name, path, recorded_at, samples, rows, sha256sums)`,
  `release_samples(release, key, split, shard, offset, license)`,
  `release_excluded(release, key, reason, detail)`

Views (per connection, rebuilt on open and after each record): `manifests` over
every recorded release's manifest.parquet, `caption_cache` over
`catalog_dir/caption_cache/*.parquet` when present, `sample_releases`
(samples + the list of releases holding each).

Single writer: DuckDB lets one process open the file read-write; the driver
records runs and releases. Other processes (the CLI) open it `read_only=True`
while no writer holds it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from .release import SUCCESS, is_release

# a key's change between two releases, in the order `Catalog.diff` counts them
CHANGES = ("added", "removed", "moved", "changed", "unchanged")

LICENSE_REASONS = (
    "license_unknown",
    "license_conflict",
    "license_not_allowed",
    "attribution_incomplete",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
  run_id VARCHAR PRIMARY KEY, recorded_at TIMESTAMP, kept BIGINT, dropped BIGINT,
  kept_shards INTEGER, dropped_files INTEGER);
CREATE TABLE IF NOT EXISTS samples (
  key VARCHAR PRIMARY KEY, url VARCHAR, page_url VARCHAR, status VARCHAR,
  drop_reason VARCHAR, dropped_by VARCHAR, duplicate_of VARCHAR,
  sha256 VARCHAR, pixel_sha256 VARCHAR, phash VARCHAR,
  license VARCHAR, license_url VARCHAR, license_rule VARCHAR, license_decision VARCHAR,
  width INTEGER, height INTEGER, caption_model VARCHAR,
  first_run VARCHAR, last_run VARCHAR);
CREATE TABLE IF NOT EXISTS sample_runs (
  run_id VARCHAR, key VARCHAR, status VARCHAR, drop_reason VARCHAR, dropped_by VARCHAR,
  PRIMARY KEY (run_id, key));
CREATE TABLE IF NOT EXISTS releases (
  name VARCHAR PRIMARY KEY, path VARCHAR, recorded_at TIMESTAMP, samples BIGINT, rows BIGINT,
  sha256sums VARCHAR);
CREATE TABLE IF NOT EXISTS release_samples (
  release VARCHAR, key VARCHAR, split VARCHAR, shard VARCHAR, "offset" BIGINT, license VARCHAR);
CREATE TABLE IF NOT EXISTS release_excluded (
  release VARCHAR, key VARCHAR, reason VARCHAR, detail VARCHAR);
"""

_OBS_COLUMNS = (
    "key, url, page_url, status, drop_reason, dropped_by, duplicate_of, sha256, pixel_sha256, "
    "phash, license, license_url, license_rule, width, height, caption_model"
)


def _lit(s: str | Path) -> str:
    return "'" + str(s).replace("'", "''") + "'"


def _list(paths: list[str]) -> str:
    return "[" + ", ".join(_lit(p) for p in paths) + "]"


_QUERY_STATEMENTS = {"SELECT", "EXPLAIN", "PRAGMA", "MULTI"}  # what `ccurate query` may run
# keywords that never appear in a query that only reads (checked in MULTI statements)
_WRITING_KEYWORDS = frozenset(
    [
        "copy",
        "insert",
        "update",
        "delete",
        "create",
        "drop",
        "alter",
        "attach",
        "detach",
        "install",
        "load",
        "export",
        "import",
        "set",
        "reset",
        "call",
        "checkpoint",
        "vacuum",
        "truncate",
        "use",
        "pragma",
        "merge",
        "upsert",
    ]
)
# PRAGMAs that only read (others set options, or import a database: a SQL file that runs)
_READ_PRAGMAS = {
    "version",
    "platform",
    "table_info",
    "show",
    "show_tables",
    "show_tables_expanded",
    "show_databases",
    "database_list",
    "database_size",
    "storage_info",
    "functions",
    "collations",
    "metadata_info",
}
# no extension is fetched behind a query's back (a https:// path made DuckDB download httpfs)
_NO_AUTOLOAD: dict[str, str | bool | int | float | list[str]] = {
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
}


def _check_query(sql: str) -> None:
    """One statement that only reads (`ccurate query`'s contract), else a ValueError."""
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1:
        raise ValueError(
            f"ccurate query runs one statement; got {len(statements)}"
            + (" (only the last result would show)" if statements else "")
        )
    st = statements[0]
    kind = st.type.name
    text = st.query.strip()
    if kind == "EXPLAIN":
        # EXPLAIN ANALYZE runs what it explains: a COPY inside it wrote files
        inner = re.sub(r"(?is)^explain\s+(analy[sz]e\s+)?", "", text)
        inner_kinds = {s.type.name for s in duckdb.extract_statements(inner)} if inner else set()
        if inner_kinds - {"SELECT"}:
            raise ValueError(
                f"ccurate query explains queries only; refused: EXPLAIN {', '.join(inner_kinds)}"
            )
    elif kind == "PRAGMA":
        m = re.match(r"(?is)^pragma\s+([a-z_]+)", text)  # `PRAGMA x = y` parses as a SET
        if m is None or m.group(1).lower() not in _READ_PRAGMAS:
            raise ValueError(
                "ccurate query runs PRAGMAs that only read ("
                + ", ".join(sorted(_READ_PRAGMAS))
                + ")"
            )
    elif kind == "MULTI":
        # a PIVOT without an IN list expands to several statements: DuckDB types the whole
        # as MULTI, whatever wraps it (a COPY of a PIVOT wrote the manifest it read). Its
        # keywords decide: a query's first, and no keyword that writes or loads anywhere
        tokens = duckdb.tokenize(text)
        ends = [start for start, _ in tokens[1:]] + [len(text)]
        words = [
            text[start:end].strip().lower()
            for (start, ttype), end in zip(tokens, ends, strict=True)
            if ttype == duckdb.token_type.keyword
        ]
        bad = sorted(set(words) & _WRITING_KEYWORDS)
        if not words or words[0] not in {"pivot", "unpivot", "with", "select", "from"} or bad:
            raise ValueError(
                "ccurate query runs queries only; refused: a multi-part statement (a PIVOT "
                "without an IN list) "
                + (
                    f"with {', '.join(w.upper() for w in bad)} (quote a column of that name)"
                    if bad
                    else f"starting {words[:1]}"
                )
            )
    elif kind not in _QUERY_STATEMENTS:
        raise ValueError(
            "ccurate query runs queries only (SELECT, WITH, FROM, SHOW, DESCRIBE, SUMMARIZE, "
            f"PIVOT, EXPLAIN, reading PRAGMAs); refused: {kind}"
        )


class Catalog:
    """DuckDB catalog of runs, samples and releases; see the module doc for tables and views."""

    def __init__(self, path: str | Path, read_only: bool = False) -> None:
        path = Path(path)
        if path.suffix == ".duckdb":
            self.dir, self.db = path.parent, path
        else:
            self.dir, self.db = path, path / "catalog.duckdb"
        if read_only and not self.db.exists():
            raise FileNotFoundError(f"no catalog at {self.db} (record a run first)")
        if not read_only:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.read_only = read_only
        self.con = duckdb.connect(str(self.db), read_only=read_only, config=_NO_AUTOLOAD)
        self._sandboxed = False
        if not read_only:
            self.con.execute(_SCHEMA)
        self._refresh_views()

    # ---- lifecycle -------------------------------------------------------
    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _refresh_views(self) -> None:
        paths = [
            str(Path(p) / "manifest.parquet")
            for (p,) in self.con.execute("SELECT path FROM releases ORDER BY name").fetchall()
            if (Path(p) / "manifest.parquet").exists()
        ]
        if paths:
            self.con.execute(
                f"CREATE OR REPLACE TEMP VIEW manifests AS "
                f"SELECT * FROM read_parquet({_list(paths)}, union_by_name=true)"
            )
        else:
            self.con.execute(
                "CREATE OR REPLACE TEMP VIEW manifests AS SELECT * FROM release_samples WHERE false"
            )
        cache = sorted(str(p) for p in (self.dir / "caption_cache").glob("*.parquet"))
        if cache:  # listed, not globbed: a query's sandbox admits these files only
            self.con.execute(
                f"CREATE OR REPLACE TEMP VIEW caption_cache AS SELECT * FROM "
                f"read_parquet({_list(cache)}, union_by_name=true)"
            )
        self._view_files = paths + cache
        self.con.execute(
            "CREATE OR REPLACE TEMP VIEW sample_releases AS SELECT s.*, "
            "coalesce(r.releases, []) AS releases FROM samples s LEFT JOIN ("
            "SELECT key, list(DISTINCT release ORDER BY release) AS releases "
            "FROM release_samples GROUP BY key) r USING (key)"
        )

    # ---- recording (the driver only) -------------------------------------
    def record_run(
        self, kept_prefixes: list[str], dropped_paths: list[str], run_id: str
    ) -> dict[str, int]:
        """Record every kept and dropped record of a run; rerunning the same run_id replaces it."""
        parts = []
        if kept_prefixes:
            kept = _list([f"{p}.parquet" for p in kept_prefixes])
            parts.append(
                "SELECT key, url, page_url, 'ok' AS status, NULL::VARCHAR AS drop_reason, "
                "NULL::VARCHAR AS dropped_by, duplicate_of, sha256, pixel_sha256, phash, license, "
                "license_url, license_rule, width, height, caption_model "
                f"FROM read_parquet({kept}, union_by_name=true)"
            )
        if dropped_paths:
            parts.append(
                f"SELECT {_OBS_COLUMNS} "
                f"FROM read_parquet({_list(dropped_paths)}, union_by_name=true)"
            )
        rid = _lit(run_id)
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"DELETE FROM sample_runs WHERE run_id = {rid}")
            con.execute(f"DELETE FROM runs WHERE run_id = {rid}")
            if parts:
                con.execute(
                    "CREATE OR REPLACE TEMP TABLE _obs AS SELECT * FROM ("
                    + " UNION ALL ".join(parts)
                    + ") QUALIFY row_number() OVER (PARTITION BY key "
                    "ORDER BY (status = 'ok') DESC, drop_reason) = 1"
                )
            else:
                con.execute(
                    "CREATE OR REPLACE TEMP TABLE _obs AS SELECT * EXCLUDE "
                    "(license_decision, first_run, last_run) FROM samples WHERE false"
                )
            reasons = ", ".join(_lit(r) for r in LICENSE_REASONS)
            con.execute(
                "INSERT INTO samples SELECT key, url, page_url, status, drop_reason, dropped_by, "
                "duplicate_of, sha256, pixel_sha256, phash, license, license_url, license_rule, "
                f"CASE WHEN drop_reason IN ({reasons}) THEN drop_reason "
                "WHEN status = 'ok' OR license IS NOT NULL THEN 'accepted' ELSE NULL END, "
                f"width, height, caption_model, {rid}, {rid} FROM _obs "
                "ON CONFLICT (key) DO UPDATE SET url = excluded.url, page_url = excluded.page_url, "
                "status = excluded.status, drop_reason = excluded.drop_reason, "
                "dropped_by = excluded.dropped_by, duplicate_of = excluded.duplicate_of, "
                "sha256 = excluded.sha256, pixel_sha256 = excluded.pixel_sha256, "
                "phash = excluded.phash, license = excluded.license, "
                "license_url = excluded.license_url, license_rule = excluded.license_rule, "
                "license_decision = excluded.license_decision, width = excluded.width, "
                "height = excluded.height, caption_model = excluded.caption_model, "
                "last_run = excluded.last_run"
            )
            con.execute(
                f"INSERT INTO sample_runs SELECT {rid}, key, status, drop_reason, dropped_by "
                "FROM _obs"
            )
            kept_n, dropped_n = con.execute(
                "SELECT count(*) FILTER (WHERE status = 'ok'), "
                "count(*) FILTER (WHERE status <> 'ok') FROM _obs"
            ).fetchall()[0]
            con.execute(
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?)",
                [
                    run_id,
                    datetime.now(UTC).replace(tzinfo=None),
                    kept_n,
                    dropped_n,
                    len(kept_prefixes),
                    len(dropped_paths),
                ],
            )
            con.execute("DROP TABLE _obs")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return {"kept": int(kept_n), "dropped": int(dropped_n)}

    def record_release(self, release_dir: str | Path) -> str:
        """Record a published release (its manifest and exclusions); returns its name."""
        root = Path(release_dir).resolve()
        if not is_release(root):
            raise ValueError(f"{root} is not a complete release (no {SUCCESS})")
        meta = json.loads((root / SUCCESS).read_text())
        name = str(meta["release"])
        man = _lit(root / "manifest.parquet")
        excl = root / "excluded.parquet"
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            for table, col in (
                ("releases", "name"),
                ("release_samples", "release"),
                ("release_excluded", "release"),
            ):
                con.execute(f"DELETE FROM {table} WHERE {col} = ?", [name])
            con.execute(
                'INSERT INTO release_samples SELECT ?, key, split, shard, "offset", license '
                f"FROM read_parquet({man})",
                [name],
            )
            if excl.exists():
                con.execute(
                    "INSERT INTO release_excluded SELECT ?, key, reason, detail "
                    f"FROM read_parquet({_lit(excl)})",
                    [name],
                )
            rows = con.execute(
                "SELECT count(*), count(DISTINCT key) FROM release_samples WHERE release = ?",
                [name],
            ).fetchall()[0]
            con.execute(
                "INSERT INTO releases VALUES (?, ?, ?, ?, ?, ?)",
                [
                    name,
                    str(root),
                    datetime.now(UTC).replace(tzinfo=None),
                    rows[1],
                    rows[0],
                    meta.get("sha256sums"),
                ],
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self._refresh_views()
        return name

    # ---- reading ---------------------------------------------------------
    def query(self, sql: str) -> pa.Table:
        """Run SQL over the tables and views; the result as an Arrow table.

        A read-only catalog (the CLI's) runs one query and nothing else: DuckDB's read-only
        mode guards the database file, not the file system, so `COPY ... TO` (also inside
        `EXPLAIN ANALYZE`) could overwrite a release's manifest.parquet, `PRAGMA
        import_database` run a SQL file, and `read_csv` read any file. The statement is
        checked, then the connection is sandboxed for good: files other than the views'
        manifests and caption cache are out of reach, and extensions are never fetched."""
        if self.read_only:
            _check_query(sql)
            self._sandbox()
        rel = self.con.sql(sql)
        if rel is None:
            return pa.table({})
        return rel.to_arrow_table()

    def _sandbox(self) -> None:
        """No file but the views' own from here on, and no setting can undo that."""
        if self._sandboxed:
            return
        self.con.execute(f"SET allowed_paths = {_list(self._view_files)}")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        self._sandboxed = True

    def stats(self) -> dict[str, Any]:
        def counts(sql: str) -> dict[str, int]:
            return {str(k): int(v) for k, v in self.con.execute(sql).fetchall()}

        one = self.con.execute("SELECT count(*), count(DISTINCT url) FROM samples").fetchall()[0]
        out: dict[str, Any] = {
            "samples": int(one[0]),
            "urls": int(one[1]),
            "runs": int(self.con.execute("SELECT count(*) FROM runs").fetchall()[0][0]),
            "by_status": counts(
                "SELECT status, count(*) FROM samples GROUP BY 1 ORDER BY 2 DESC, 1"
            ),
            "drop_reasons": counts(
                "SELECT coalesce(drop_reason, 'unknown'), count(*) FROM samples "
                "WHERE status <> 'ok' "
                "GROUP BY 1 ORDER BY 2 DESC, 1"
            ),
            "licenses": counts(
                "SELECT coalesce(license, 'none'), count(*) FROM samples "
                "GROUP BY 1 ORDER BY 2 DESC, 1"
            ),
            "releases": counts("SELECT name, samples FROM releases ORDER BY name"),
            # samples kept by every filter that the newest release still did not publish
            # (status 'ok' above): not releasable under the split policy, duplicate keys, ...
            "latest_release_excluded": counts(
                "SELECT coalesce(reason, 'unknown'), count(*) FROM release_excluded "
                "WHERE release = (SELECT name FROM releases ORDER BY recorded_at DESC, name DESC "
                "LIMIT 1) GROUP BY 1 ORDER BY 2 DESC, 1"
            ),
        }
        try:
            out["caption_cache_rows"] = int(
                self.con.execute("SELECT count(*) FROM caption_cache").fetchall()[0][0]
            )
        except duckdb.Error:
            out["caption_cache_rows"] = None
        return out

    def _release_files(self, release: str | Path) -> tuple[str, Path]:
        """(name, directory) of a release given by recorded name or by path."""
        p = Path(release)
        if (p / "manifest.parquet").exists():
            name = json.loads((p / SUCCESS).read_text())["release"] if is_release(p) else p.name
            return str(name), p
        row = self.con.execute(
            "SELECT path FROM releases WHERE name = ?", [str(release)]
        ).fetchall()
        if not row:
            raise KeyError(f"unknown release {release!r}: not recorded and not a release directory")
        return str(release), Path(row[0][0])

    def diff_table(self, release_a: str | Path, release_b: str | Path) -> pa.Table:
        """Per key: change (added/removed/moved/changed/unchanged), splits in a and b, why,
        and detail.

        A key both hold in the same splits is `changed` when its licence (a change within a
        family too: CC BY -> CC BY-SA adds ShareAlike, CC0 -> CC BY attribution), its
        published image bytes (`image_sha256`) or its `.txt` text (the shard indexes'
        `caption`) differ; why lists them (`licence_changed,image_changed,caption_changed`)
        and detail says what (`licence CC-BY-4.0 -> CC-BY-SA-4.0; image 1a2b.. -> 3c4d..;
        caption changed`); a moved key's detail says the same. What a release lacks (an
        older manifest without `image_sha256`, a copy without its shard indexes) is not
        compared.

        A moved key's why is `licence_family_changed` when its licence family differs,
        `split_policy_changed` when only the splits holding it do (a release that also
        writes commercial samples into its noncommercial superset split).

        The pipeline and the rebuild record each run under its release's name: when the
        run of a release is recorded, a removal is explained by that run's drop and an
        addition by drops before it, not by the catalog's latest state (a run after b
        that kept, or dropped, the sample again must not rewrite why b differs from a).

        When both releases' runs are recorded and other runs lie between them (a diff
        across generations), each key's why is the one the chain of consecutive diffs
        gives for the step where the key last changed, so a -> c agrees with a -> b -> c:
        a removal is explained by the *first* event after the last release (a, or one
        between) that still held the key: at a release between, its run's drop, its
        exclusion or `not_in_release_inputs`; only when there is none, by b's own
        exclusion or drop. A run that published nothing changed no release (a rebuild's
        failed refetch keeps the released record): its drops explain nothing. Releases
        between count only when of the same line (names equal but for a trailing number,
        as a rebuild's `ds-r0002`); another dataset's releases in the catalog do not.
        The first, not the latest: that event took the key out of the line; a later run
        that drops the already-removed sample again (a takedown still listed, a refetch
        refused for another reason) does not say why a and b differ.
        An addition is explained from the last release before b that lacked the key (a,
        or one between): its exclusion or drop, else the latest drop before the release
        that brought the key back.
        """
        name_a, da = self._release_files(release_a)
        name_b, db = self._release_files(release_b)
        run_a, run_b = _lit(name_a), _lit(name_b)

        def column(d: Path, name: str) -> str:
            # a manifest without the column (hand-made, or older): unknown (a family then
            # counts as changed; a licence or image hash as not compared)
            names = pq.read_schema(d / "manifest.parquet").names
            return f"any_value({name})" if name in names else "NULL::VARCHAR"

        def texts(d: Path) -> str:
            # the `.txt` text of each key: the `caption` column of the shard indexes (the
            # manifest does not carry it); a release without them: not compared
            man = d / "manifest.parquet"
            shards = (
                pq.read_table(man, columns=["shard"])["shard"].to_pylist()
                if "shard" in pq.read_schema(man).names
                else []
            )
            files = [
                str(d / sh[: -len(".tar")]) + ".parquet"
                for sh in sorted({str(x) for x in shards if x})
                if sh.endswith(".tar")
            ]
            files = [f for f in files if Path(f).is_file()]
            if not files:
                return "SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS text WHERE false"
            return (
                "SELECT key, any_value(md5(coalesce(caption, ''))) AS text "
                f"FROM read_parquet({_list(files)}, union_by_name=true) GROUP BY key"
            )

        def excluded(d: Path) -> str:
            # one row per key: a key met twice is excluded again as duplicate_key, and a
            # join on every row would count it twice; its first exclusion is the reason
            e = d / "excluded.parquet"
            if e.exists():
                return (
                    "SELECT key, arg_min(reason, file_row_number) AS reason "
                    f"FROM read_parquet({_lit(e)}, file_row_number=true) GROUP BY key"
                )
            return "SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS reason WHERE false"

        sql = f"""
        WITH a AS (SELECT key, string_agg(split, ',' ORDER BY split) AS splits,
                          {column(da, "license_family")} AS family,
                          {column(da, "license")} AS license,
                          {column(da, "image_sha256")} AS image
                   FROM read_parquet({_lit(da / "manifest.parquet")}) GROUP BY key),
             b AS (SELECT key, string_agg(split, ',' ORDER BY split) AS splits,
                          {column(db, "license_family")} AS family,
                          {column(db, "license")} AS license,
                          {column(db, "image_sha256")} AS image
                   FROM read_parquet({_lit(db / "manifest.parquet")}) GROUP BY key),
             ta AS ({texts(da)}), tb AS ({texts(db)}),
             -- what changed in a key both hold: its licence (any, not just its family), its
             -- published image bytes, its `.txt` text; unknown on either side: not compared
             c AS (SELECT a.key,
                     coalesce(a.license <> b.license, false) AS lic,
                     coalesce(a.image <> b.image, false) AS img,
                     coalesce(ta.text <> tb.text, false) AS txt,
                     a.license AS license_a, b.license AS license_b,
                     a.image AS image_a, b.image AS image_b
                   FROM a JOIN b ON a.key = b.key
                     LEFT JOIN ta ON ta.key = a.key LEFT JOIN tb ON tb.key = a.key),
             ea AS ({excluded(da)}), eb AS ({excluded(db)}),
             ra AS (SELECT key, drop_reason AS reason FROM sample_runs
                    WHERE run_id = {run_a} AND status <> 'ok'),
             rb AS (SELECT key, drop_reason AS reason FROM sample_runs
                    WHERE run_id = {run_b} AND status <> 'ok'),
             cut AS (SELECT max(recorded_at) AS t, count(*) > 0 AS known
                     FROM runs WHERE run_id = {run_b}),
             cut_a AS (SELECT max(recorded_at) AS t FROM runs WHERE run_id = {run_a}),
             -- runs strictly between a's and b's of the same line of releases (names equal
             -- but for their trailing number, as `ds-r0002`; another dataset recorded in
             -- the same catalog is not a step of this one), none unless both are recorded
             -- runs, none for consecutive releases; and the recorded releases among them
             win AS (SELECT r.run_id, r.recorded_at AS t FROM runs r, cut, cut_a
                     WHERE r.recorded_at > cut_a.t AND r.recorded_at < cut.t
                       AND regexp_replace(r.run_id, '[0-9]+$', '')
                           = regexp_replace({run_b}, '[0-9]+$', '')
                       AND regexp_replace({run_a}, '[0-9]+$', '')
                           = regexp_replace({run_b}, '[0-9]+$', '')),
             mid AS (SELECT win.* FROM win JOIN releases ON releases.name = win.run_id),
             -- one reason per key and release: its first exclusion (as `excluded` above)
             mx AS (SELECT release, key, arg_min(reason, rowid) AS reason
                    FROM release_excluded WHERE release IN (SELECT run_id FROM mid)
                    GROUP BY release, key),
             j AS (SELECT coalesce(a.key, b.key) AS key, a.splits AS split_a, b.splits AS split_b,
                   coalesce(a.family <> b.family, true) AS family_changed,
                   CASE WHEN a.key IS NULL THEN 'added' WHEN b.key IS NULL THEN 'removed'
                        WHEN a.splits <> b.splits THEN 'moved'
                        WHEN c.lic OR c.img OR c.txt THEN 'changed'
                        ELSE 'unchanged' END AS change
                   FROM a FULL OUTER JOIN b ON a.key = b.key LEFT JOIN c ON c.key = a.key),
             -- a key's membership of the releases between a and b
             jm AS (SELECT j.key, j.change, m.run_id, m.t,
                           EXISTS (SELECT 1 FROM release_samples rs
                                   WHERE rs.release = m.run_id AND rs.key = j.key) AS holds
                    FROM j CROSS JOIN mid m WHERE j.change IN ('removed', 'added')),
             -- removed: the last release that held the key, then the first event after it
             held AS (SELECT key, max(t) AS t FROM jm WHERE change = 'removed' AND holds
                      GROUP BY key),
             gone_ev AS (
               -- a drop in a run that published a release (one that published nothing
               -- changed no release: a rebuild's failed refetch keeps the released record)
               SELECT sr.key, w.t, w.run_id, 'dropped:' || sr.drop_reason AS why
               FROM sample_runs sr JOIN mid w USING (run_id) JOIN j ON j.key = sr.key
               WHERE j.change = 'removed' AND sr.status <> 'ok'
               UNION ALL
               SELECT jm.key, jm.t, jm.run_id, coalesce('excluded:' || mx.reason,
                 CASE WHEN s.key IS NOT NULL THEN 'not_in_release_inputs' ELSE 'unknown' END)
               FROM jm LEFT JOIN mx ON mx.release = jm.run_id AND mx.key = jm.key
                 LEFT JOIN samples s ON s.key = jm.key
               WHERE jm.change = 'removed' AND NOT jm.holds AND NOT EXISTS (
                 SELECT 1 FROM sample_runs sr WHERE sr.run_id = jm.run_id
                   AND sr.key = jm.key AND sr.status <> 'ok')),
             gone AS (SELECT g.key, arg_min(g.why, (g.t, g.run_id)) AS why
                      FROM gone_ev g CROSS JOIN cut_a LEFT JOIN held h ON h.key = g.key
                      WHERE g.t > coalesce(h.t, cut_a.t) GROUP BY g.key),
             -- added: the last release that lacked the key, and the first after it holding it
             lacked AS (SELECT key, arg_max(run_id, t) AS run_id, max(t) AS t FROM jm
                        WHERE change = 'added' AND NOT holds GROUP BY key),
             back AS (SELECT jm.key, min(jm.t) AS t FROM jm CROSS JOIN cut_a
                        LEFT JOIN lacked l ON l.key = jm.key
                      WHERE jm.change = 'added' AND jm.holds AND jm.t > coalesce(l.t, cut_a.t)
                      GROUP BY jm.key),
             lx AS (SELECT l.key, mx.reason FROM lacked l
                    JOIN mx ON mx.release = l.run_id AND mx.key = l.key),
             ld AS (SELECT l.key, sr.drop_reason AS reason FROM lacked l
                    JOIN sample_runs sr ON sr.run_id = l.run_id AND sr.key = l.key
                    WHERE sr.status <> 'ok'),
             prior AS (SELECT sr.key, arg_max(sr.drop_reason, (r.recorded_at, r.run_id)) AS reason
                       FROM sample_runs sr JOIN runs r USING (run_id)
                         JOIN j ON j.key = sr.key AND j.change = 'added' CROSS JOIN cut
                         LEFT JOIN back bk ON bk.key = sr.key
                       WHERE sr.status <> 'ok' AND (coalesce(bk.t, cut.t) IS NULL
                             OR r.recorded_at < coalesce(bk.t, cut.t))
                       GROUP BY sr.key)
        SELECT j.key, j.change, j.split_a, j.split_b,
          CASE
            WHEN j.change = 'removed' THEN coalesce(
              g.why,
              'excluded:' || eb.reason,
              'dropped:' || rb.reason,
              CASE WHEN s.status = 'dropped' AND NOT cut.known
                   THEN 'dropped:' || s.drop_reason END,
              CASE WHEN s.key IS NOT NULL THEN 'not_in_release_inputs' END,
              'unknown')
            WHEN j.change = 'added' THEN coalesce(
              CASE WHEN l.key IS NOT NULL
                   THEN coalesce('was_excluded:' || lx.reason, 'previously_dropped:' || ld.reason)
                   ELSE coalesce('was_excluded:' || ea.reason, 'previously_dropped:' || ra.reason)
              END,
              'previously_dropped:' || p.reason, 'new')
            -- same family in other splits: the split policy changed (e.g. a superset split)
            WHEN j.change = 'moved' THEN CASE WHEN j.family_changed
              THEN 'licence_family_changed' ELSE 'split_policy_changed' END
            WHEN j.change = 'changed' THEN concat_ws(',',
              CASE WHEN c.lic THEN 'licence_changed' END,
              CASE WHEN c.img THEN 'image_changed' END,
              CASE WHEN c.txt THEN 'caption_changed' END)
          END AS why,
          CASE WHEN j.change IN ('moved', 'changed') THEN nullif(concat_ws('; ',
            CASE WHEN c.lic THEN 'licence ' || c.license_a || ' -> ' || c.license_b END,
            CASE WHEN c.img THEN 'image ' || left(c.image_a, 12) || ' -> '
                                 || left(c.image_b, 12) END,
            CASE WHEN c.txt THEN 'caption changed' END), '') END AS detail
        FROM j CROSS JOIN cut LEFT JOIN c ON c.key = j.key
          LEFT JOIN samples s ON s.key = j.key LEFT JOIN ea ON ea.key = j.key
          LEFT JOIN eb ON eb.key = j.key LEFT JOIN prior p ON p.key = j.key
          LEFT JOIN ra ON ra.key = j.key LEFT JOIN rb ON rb.key = j.key
          LEFT JOIN gone g ON g.key = j.key LEFT JOIN lacked l ON l.key = j.key
          LEFT JOIN lx ON lx.key = j.key LEFT JOIN ld ON ld.key = j.key
        ORDER BY j.change, j.key
        """
        return self.con.sql(sql).to_arrow_table()

    def diff(self, release_a: str | Path, release_b: str | Path) -> dict[str, Any]:
        """Summary of `diff_table`: counts per change; per reason for added, removed, moved
        and changed (a changed key counts under each of its reasons); and
        `licence_changes`, {"CC-BY-4.0 -> CC-BY-SA-4.0": n} over moved and changed keys."""
        name_a, _ = self._release_files(release_a)
        name_b, _ = self._release_files(release_b)
        rows = self.diff_table(release_a, release_b).to_pylist()
        out: dict[str, Any] = {"a": name_a, "b": name_b}
        for change in CHANGES:
            out[change] = sum(1 for r in rows if r["change"] == change)

        def ranked(c: Counter[str]) -> dict[str, int]:
            return dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))

        licences: Counter[str] = Counter()
        for change in ("added", "removed", "moved", "changed"):
            why: Counter[str] = Counter()
            for r in rows:
                if r["change"] != change:
                    continue
                why.update(r["why"].split(",") if change == "changed" else [r["why"]])
                for part in (r["detail"] or "").split("; "):
                    if part.startswith("licence "):
                        licences[part[len("licence ") :]] += 1
            out[f"{change}_why"] = ranked(why)
        out["licence_changes"] = ranked(licences)
        return out
