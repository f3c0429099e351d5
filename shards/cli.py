"""CLI commands of the shards area: catalog query/stats, release export and diff.

`register(app)` adds them to the main `ccurate` Typer app. The catalog is
opened read-only here (the pipeline driver is its only writer). It is the one a
config names (`-c CONFIG`, `[run] catalog_dir`, default `<work_dir>/catalog`,
resolved like `ccurate run` resolves it), `--catalog DIR` (wins over `-c`), or
without either `work/catalog` under the current directory.
"""

from __future__ import annotations

import json
import math
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ccurate.config import RunConfig

from .catalog import Catalog

# [run].catalog_dir, default <work_dir>/catalog: where the pipeline records runs
_DEFAULT_CATALOG = RunConfig.model_validate({}).catalog
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="pipeline config (TOML): use the catalog it names (\\[run] catalog_dir, "
        "default <work_dir>/catalog, relative to the config's folder)",
        show_default=False,
    ),
]
CatalogOpt = Annotated[
    Path | None,
    typer.Option(
        "--catalog",
        help=f"catalog directory (wins over --config; without either: {_DEFAULT_CATALOG}, "
        "relative to the current directory)",
        show_default=False,
    ),
]


def _open_catalog(config: Path | None, catalog: Path | None) -> Catalog:
    """The catalog of `--catalog`, else of the config, else the default one, read-only.

    The config is resolved by the same helper as `ccurate takedown` (`load_config`: relative
    paths against the config's folder); a config that cannot be loaded is a ConfigError, and
    one whose catalog holds nothing yet says which config named it (both exit 2)."""
    from ccurate.rebuild_cli import catalog_dir

    if catalog is None and config is None:
        return Catalog(_DEFAULT_CATALOG, read_only=True)
    where = catalog_dir(config, catalog)
    try:
        return Catalog(where, read_only=True)
    except FileNotFoundError as e:
        if catalog is not None:
            raise
        raise FileNotFoundError(
            f"{e}; it is the catalog that {config} names ([run] catalog_dir, default "
            "<work_dir>/catalog): run the pipeline with that config first, or give --catalog"
        ) from None


def _usage_errors() -> AbstractContextManager[None]:
    """A missing catalog, an unknown release, bad SQL, an export target that exists: exit 2
    with one line, not a traceback."""
    from ccurate.cli import usage_errors

    return usage_errors(FileNotFoundError, FileExistsError, ValueError, KeyError, duckdb.Error)


def json_safe(v: Any) -> Any:
    """`v` with NaN and +-Infinity as null: `--json` prints strict JSON (RFC 8259 has no
    NaN), which JavaScript, Go and serde parse; a manifest's extra columns carried from
    LAION-like inputs (`punsafe`, `pwatermark`) hold NaN."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [json_safe(x) for x in v]
    return v


def _dumps(v: Any, indent: int | None = None) -> str:
    return json.dumps(json_safe(v), default=str, ensure_ascii=False, allow_nan=False, indent=indent)


def _print_table(t: pa.Table, as_json: bool, title: str | None = None) -> None:
    if as_json:
        typer.echo(_dumps(t.to_pylist()))
        return
    # cells are data (captions, URLs with [brackets]), never rich markup
    table = Table(title=title)
    for name in t.column_names:
        table.add_column(escape(name))
    for row in t.to_pylist():
        table.add_row(*("" if v is None else escape(str(v)) for v in row.values()))
    Console().print(table)


def _print_dict(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(_dumps(d, indent=1))
        return
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value")
    for k, v in d.items():
        text = json.dumps(v, default=str) if isinstance(v, dict | list) else str(v)
        table.add_row(escape(k), escape(text))
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add `query`, `stats`, `export` and `diff` to the ccurate app."""

    @app.command("query")
    def query_cmd(
        sql: Annotated[
            str, typer.Argument(help="SQL over samples, runs, releases, manifests, ...")
        ],
        config: ConfigOpt = None,
        catalog: CatalogOpt = None,
        as_json: Annotated[
            bool, typer.Option("--json", help="print JSON rows (NaN and infinities as null)")
        ] = False,
    ) -> None:
        """Run SQL against the catalog and the manifests of its recorded releases (read-only)."""
        with _usage_errors(), _open_catalog(config, catalog) as cat:
            _print_table(cat.query(sql), as_json)

    @app.command("stats")
    def stats_cmd(
        config: ConfigOpt = None,
        catalog: CatalogOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    ) -> None:
        """Counts of samples, URLs, statuses, drop reasons, licences and releases."""
        with _usage_errors(), _open_catalog(config, catalog) as cat:
            _print_dict(cat.stats(), as_json)

    @app.command("export")
    def export_cmd(
        release: Annotated[Path, typer.Argument(help="release directory")],
        out: Annotated[Path, typer.Option("--out", help="output directory")],
        fmt: Annotated[str, typer.Option("--format", help="export format: mds")] = "mds",
        split: Annotated[
            list[str] | None, typer.Option("--split", help="splits (default all)")
        ] = None,
        size_limit: Annotated[
            int, typer.Option(help="MDS shard size limit, bytes (0: no limit)")
        ] = 1 << 26,
        overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    ) -> None:
        """Export a release to another training format (MosaicML Streaming MDS)."""
        if fmt != "mds":
            raise typer.BadParameter(f"unknown format {fmt!r} (supported: mds)")
        from .mds import export_mds

        with _usage_errors():
            done = export_mds(
                release, out, splits=split or None, size_limit=size_limit, overwrite=overwrite
            )
        for name, path in done.items():
            typer.echo(f"{name}: {path}")

    @app.command("diff")
    def diff_cmd(
        release_a: Annotated[str, typer.Argument(help="release name (recorded) or directory")],
        release_b: Annotated[str, typer.Argument(help="release name (recorded) or directory")],
        config: ConfigOpt = None,
        catalog: CatalogOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
        keys: Annotated[bool, typer.Option("--keys", help="list every changed key")] = False,
    ) -> None:
        """What was added, removed, moved between splits or changed (licence, image, caption)
        from one release to another, and why."""
        with _usage_errors(), _open_catalog(config, catalog) as cat:
            if keys:
                t = cat.diff_table(release_a, release_b)
                mask = pc.not_equal(t.column("change"), "unchanged")
                _print_table(t.filter(mask), as_json)
            else:
                _print_dict(cat.diff(release_a, release_b), as_json)
