"""What changed between two release inputs: added, removed (by reason), changed (by field).

Each rebuild writes it beside the generation (`diff.json`, `diff.parquet`) so an
operator, and the release's `run_info`, can say why a sample came or went.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ccurate.shardio import write_json_atomic, write_table_atomic

DIFF_FIELDS = [
    "url",
    "page_url",
    "license",
    "license_url",
    "author",
    "title",
    "alt_text",
    "caption",
    "caption_model",
    "sha256",
]


def _parquet_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def diff_release_inputs(
    old_inputs: list[str],
    new_inputs: list[str],
    gate_dropped: list[str],
    prev_ledger: Path | None,
    out_dir: Path,
) -> dict[str, Any]:
    """Added, removed (by reason) and changed (by field) between two release inputs.

    Written as `diff.parquet` (one row per key that differs) and `diff.json`
    (counts and a few example keys per group). DuckDB does the join, so it
    scales past memory.
    """
    import duckdb

    con = duckdb.connect()
    cols = ", ".join(f"CAST({c} AS VARCHAR) AS {c}" for c in ["key", *DIFF_FIELDS])
    empty = ", ".join(f"NULL::VARCHAR AS {c}" for c in ["key", *DIFF_FIELDS])

    def rel(files: list[str]) -> str:
        if not files:
            return f"SELECT {empty} WHERE false"
        paths = [f"{p}.parquet" for p in files]
        return f"SELECT {cols} FROM read_parquet({_parquet_list(paths)}, union_by_name=true)"

    gate = (
        f"SELECT key, any_value(drop_reason) AS reason, any_value(removed_because) AS detail "
        f"FROM read_parquet({_parquet_list(gate_dropped)}, union_by_name=true) GROUP BY key"
        if gate_dropped
        else "SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS reason, NULL::VARCHAR AS detail "
        "WHERE false"
    )
    if gate_dropped and not any("removed_because" in pq.read_schema(p).names for p in gate_dropped):
        gate = gate.replace("any_value(removed_because)", "NULL::VARCHAR")
    ledger = (
        f"SELECT key, outcome, reason FROM read_parquet({_parquet_list([str(prev_ledger)])})"
        if prev_ledger is not None and prev_ledger.exists()
        else "SELECT NULL::VARCHAR AS key, NULL::VARCHAR AS outcome, NULL::VARCHAR AS reason "
        "WHERE false"
    )
    changed = ", ".join(
        f"CASE WHEN o.{c} IS DISTINCT FROM n.{c} THEN '{c}' END" for c in DIFF_FIELDS
    )
    sql = f"""
    WITH o AS ({rel(old_inputs)}), n AS ({rel(new_inputs)}), g AS ({gate}), l AS ({ledger}),
    j AS (
      SELECT coalesce(n.key, o.key) AS key,
             CASE WHEN o.key IS NULL THEN 'added' WHEN n.key IS NULL THEN 'removed'
                  ELSE 'changed' END AS change,
             concat_ws(',', {changed}) AS fields,
             coalesce(n.url, o.url) AS url
      FROM o FULL OUTER JOIN n ON o.key = n.key)
    SELECT j.key, j.change,
      CASE WHEN j.change = 'removed' THEN coalesce(g.reason, 'unknown')
           WHEN j.change = 'added' THEN CASE WHEN l.key IS NULL THEN 'new'
                ELSE 'previously_' || l.outcome || coalesce(':' || l.reason, '') END
      END AS reason,
      CASE WHEN j.change = 'changed' THEN j.fields END AS fields,
      CASE WHEN j.change = 'removed' THEN g.detail END AS detail,
      j.url
    FROM j LEFT JOIN g ON g.key = j.key LEFT JOIN l ON l.key = j.key
    WHERE j.change <> 'changed' OR j.fields <> ''
    ORDER BY j.change, j.key
    """
    table = con.sql(sql).to_arrow_table()
    n_new = con.sql(f"SELECT count(*) FROM ({rel(new_inputs)})").fetchall()[0][0]
    con.close()
    write_table_atomic(out_dir / "diff.parquet", table)
    rows = table.to_pylist()
    by: dict[str, Counter[str]] = {"added": Counter(), "removed": Counter(), "changed": Counter()}
    examples: dict[str, list[str]] = {"added": [], "removed": [], "changed": []}
    for r in rows:
        c = r["change"]
        if c == "changed":
            for f in (r["fields"] or "").split(","):
                by[c][f] += 1
        else:
            by[c][r["reason"] or "unknown"] += 1
        if len(examples[c]) < 20:
            examples[c].append(r["key"])
    summary = {
        "added": sum(1 for r in rows if r["change"] == "added"),
        "removed": sum(1 for r in rows if r["change"] == "removed"),
        "changed": sum(1 for r in rows if r["change"] == "changed"),
        "added_by_reason": dict(by["added"].most_common()),
        "removed_by_reason": dict(by["removed"].most_common()),
        "changed_fields": dict(by["changed"].most_common()),
        "samples": int(n_new),
        "examples": examples,
    }
    write_json_atomic(out_dir / "diff.json", summary)
    return summary
