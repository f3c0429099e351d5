"""CLI: `ccurate rebuild`, `ccurate takedown add|list`, `ccurate lookup`.

Exit codes (as for every ccurate command): 0 success, 1 unexpected error,
2 bad config, usage or takedown list, 3 a step cannot run yet, 4 another
rebuild of the same work directory holds the lock. A rebuild logs to stderr
and appends to `<work_dir>/logs/rebuild.log` (tracebacks included).
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

err = Console(stderr=True, soft_wrap=True)
out = Console()

ConfigArg = Annotated[Path, typer.Argument(help="pipeline config (TOML)", show_default=False)]
ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="pipeline config (its catalog / releases)")
]
CatalogOpt = Annotated[
    Path | None, typer.Option("--catalog", help="catalog directory (instead of --config)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON lines on stdout")]


def _codes() -> tuple[int, int, int, int]:
    from ccurate.cli import EXIT_CONFIG, EXIT_ERROR, EXIT_LOCKED, EXIT_NOT_READY

    return EXIT_ERROR, EXIT_CONFIG, EXIT_NOT_READY, EXIT_LOCKED


def _guard(fn: Callable[[], Any], state: dict[str, Any] | None = None) -> Any:
    """Known failures -> a clear message and the documented exit code."""
    from ccurate.config import ConfigError
    from ccurate.lookup import ReleaseLookupError
    from ccurate.pipeline import PipelineError
    from ccurate.rebuild import RebuildLocked
    from ccurate.takedown import TakedownError

    error, config, not_ready, locked = _codes()
    try:
        return fn()
    except RebuildLocked as e:  # messages hold paths, URLs and [tables]: escaped, not markup
        err.print(f"[red]locked[/red]: {escape(str(e))}")
        raise typer.Exit(locked) from None
    except (ConfigError, TakedownError, ReleaseLookupError) as e:
        err.print(f"[red]error[/red]: {escape(str(e))}")
        raise typer.Exit(config) from None
    except PipelineError as e:
        err.print(f"[red]cannot run[/red]: {escape(str(e))}")
        raise typer.Exit(not_ready) from None
    except Exception as e:
        err.print(f"[red]failed[/red]: {type(e).__name__}: {escape(str(e))}")
        log_file = (state or {}).get("log")
        if log_file is not None:
            err.print(f"traceback in {escape(str(log_file))}")
        else:
            traceback.print_exc(file=sys.stderr)
        raise typer.Exit(error) from None


def catalog_dir(config: Path | None, catalog: Path | None) -> Path:
    """The catalog folder of `--catalog`, else the one the config names (`[run] catalog_dir`)."""
    if catalog is not None:
        return catalog
    if config is not None:
        from ccurate.rebuild import load_rebuild_config

        return Path(load_rebuild_config(config)[0].run.catalog)
    from ccurate.config import ConfigError

    raise ConfigError("give --config CONFIG or --catalog DIR (where takedowns.jsonl lives)")


def _log_to(work_dir: Path) -> tuple[logging.Handler, Path]:
    path = work_dir / "logs" / "rebuild.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")
    )
    root = logging.getLogger("ccurate")
    root.addHandler(handler)
    if root.level == logging.NOTSET or root.level > logging.INFO:
        root.setLevel(logging.INFO)
    return handler, path


def register(app: typer.Typer) -> None:
    """Add `rebuild`, `takedown add|list` and `lookup` to the ccurate app."""
    takedown_app = typer.Typer(
        help="The takedown list (catalog_dir/takedowns.jsonl), applied to every rebuild.",
        no_args_is_help=True,
    )
    app.add_typer(takedown_app, name="takedown")

    @app.command("rebuild")
    def rebuild_cmd(
        config: ConfigArg,
        workers: Annotated[
            int | None, typer.Option("--workers", "-w", help="worker processes")
        ] = None,
        executor: Annotated[str | None, typer.Option(help="local, ray or slurm")] = None,
        address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
        retry_reason: Annotated[
            list[str] | None,
            typer.Option(
                "--retry-reason",
                help="also fetch again the records last dropped by ingest for this reason "
                "(repeat for several), e.g. decode_error after an upgrade that decodes more "
                "images",
            ),
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Incremental rebuild: new or due work only, takedowns, opt-outs, release + diff.

        Safe to run from cron or a systemd timer (see docs/rebuilds.md)."""
        from ccurate.cli import usage_errors
        from ccurate.ingest.stage import retry_reasons
        from ccurate.pipeline import PipelineError
        from ccurate.rebuild import RebuildLocked, rebuild
        from ccurate.takedown import TakedownError

        with usage_errors(ValueError):  # before the lock and the generation
            reasons = retry_reasons(retry_reason or [])
        state: dict[str, Any] = {}

        def go() -> None:
            from ccurate.cli import load_run_config, make_executor

            cfg = load_run_config(config, workers, executor, address)
            handler, state["log"] = _log_to(Path(cfg.run.work_dir))
            try:
                result = rebuild(cfg, cfg.rebuild, make_executor(cfg), retry_reasons=reasons)
            except (RebuildLocked, PipelineError, TakedownError) as e:
                logging.getLogger("ccurate.rebuild").warning("rebuild not run: %s", e)
                raise
            except Exception:
                logging.getLogger("ccurate.rebuild").exception("rebuild failed")
                raise
            finally:
                logging.getLogger("ccurate").removeHandler(handler)
                handler.close()
            _print_result(result.info, as_json)

        _guard(go, state)

    @takedown_app.command("add")
    def takedown_add(
        url: Annotated[list[str] | None, typer.Option("--url", help="image URL")] = None,
        page_url: Annotated[list[str] | None, typer.Option("--page-url", help="page URL")] = None,
        domain: Annotated[
            list[str] | None, typer.Option("--domain", help="host and its subdomains")
        ] = None,
        author: Annotated[list[str] | None, typer.Option("--author", help="author name")] = None,
        sha256: Annotated[
            list[str] | None, typer.Option("--sha256", help="SHA-256 of the image file")
        ] = None,
        phash: Annotated[
            list[str] | None, typer.Option("--phash", help="64-bit pHash (16 hex digits)")
        ] = None,
        image: Annotated[
            list[Path] | None,
            typer.Option("--image", help="image file: its hashes and near copies"),
        ] = None,
        reason: Annotated[str | None, typer.Option(help="why (kept in the list)")] = None,
        by: Annotated[
            str | None, typer.Option("--by", help="who asked (default user@host)")
        ] = None,
        radius: Annotated[
            int | None, typer.Option(help="pHash bits for near copies (--image, --phash)")
        ] = None,
        config: ConfigOpt = None,
        catalog: CatalogOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Add takedowns; the next rebuild removes every matching sample (and near copies)."""
        from ccurate.takedown import TakedownError, TakedownList, image_entry, make_entry

        def go() -> None:
            entries = []
            for kind, values in (
                ("url", url),
                ("page_url", page_url),
                ("domain", domain),
                ("author", author),
                ("sha256", sha256),
            ):
                for v in values or []:
                    entries.append(make_entry(kind, v, reason, by))
            for v in phash or []:
                entries.append(make_entry("phash", v, reason, by, radius=radius))
            for p in image or []:
                entries.append(image_entry(p, reason, by, radius=radius))
            if not entries:
                raise TakedownError(
                    "nothing to add: give --url, --page-url, --domain, --author, --sha256, "
                    "--phash or --image"
                )
            lst = TakedownList(catalog_dir(config, catalog))
            for e, added in lst.add(entries):
                if as_json:
                    typer.echo(json.dumps({**e.model_dump(exclude_none=True), "added": added}))
                else:
                    state = "added" if added else "already listed"
                    out.print(f"{state}: {e.id} {e.kind} {escape(e.value)}")
            if not as_json:
                out.print(
                    f"takedown list: {escape(str(lst.path))} "
                    "(applied by the next `ccurate rebuild`)"
                )

        _guard(go)

    @takedown_app.command("list")
    def takedown_list(
        config: ConfigOpt = None, catalog: CatalogOpt = None, as_json: JsonOpt = False
    ) -> None:
        """Print the takedown list."""
        from ccurate.takedown import TakedownList

        def go() -> None:
            lst = TakedownList(catalog_dir(config, catalog))
            entries = lst.load()
            if as_json:
                for e in entries:
                    typer.echo(e.model_dump_json(exclude_none=True))
                return
            table = Table(title=f"{escape(str(lst.path))} ({len(entries)} entries)")
            for c in ("id", "kind", "value", "reason", "added_at", "added_by"):
                table.add_column(c)
            for e in entries:
                row = (e.id, e.kind, e.value, e.reason, e.added_at, e.added_by)
                table.add_row(*(escape(v) for v in row))
            out.print(table)

        _guard(go)

    @app.command("lookup")
    def lookup_cmd(
        images: Annotated[list[Path], typer.Argument(help="image files to look for")],
        release: Annotated[
            Path | None,
            typer.Option(
                "--release", help="a release, or a folder of releases (the newest is used)"
            ),
        ] = None,
        config: ConfigOpt = None,
        radius: Annotated[int, typer.Option(help="pHash bits that count as a near copy")] = 8,
        as_json: JsonOpt = False,
    ) -> None:
        """Is this image (or a near copy) in a release? Keys, licence and attribution."""
        from ccurate.lookup import lookup

        def go() -> bool:
            where = release
            if where is None:
                if config is None:
                    from ccurate.config import ConfigError

                    raise ConfigError("give --release DIR or --config CONFIG")
                from ccurate.rebuild import load_rebuild_config

                where = Path(load_rebuild_config(config)[0].run.release_dir)
            results = lookup(list(images), where, radius, skip_unreadable=True)
            for r in results:
                if as_json:
                    if r.error:
                        failed = {"query": r.query, "release": r.release, "found": None}
                        typer.echo(json.dumps({**failed, "error": r.error}, ensure_ascii=False))
                        continue
                    for m in r.to_json()["matches"] or [None]:
                        typer.echo(
                            json.dumps(
                                {
                                    "query": r.query,
                                    "release": r.release,
                                    "query_sha256": r.sha256,
                                    "query_phash": r.phash,
                                    "found": m is not None,
                                    **(m or {}),
                                },
                                ensure_ascii=False,
                            )
                        )
                elif r.error:
                    err.print(f"[red]error[/red]: {escape(r.error)}")
                elif not r.matches:
                    out.print(
                        f"{escape(r.query)}: not in release {escape(r.release)} (radius {radius})"
                    )
                else:
                    table = Table(
                        title=f"{escape(r.query)}: {len(r.matches)} match(es) in "
                        f"{escape(r.release)}"
                    )
                    for c in ("key", "match", "bits", "licence", "attribution", "url"):
                        table.add_column(c, overflow="fold")
                    for m in r.matches:
                        row = (m.key, m.match, str(m.distance), m.license, m.attribution, m.url)
                        table.add_row(*(escape(v or "") for v in row))
                    out.print(table)
            return any(r.error for r in results)

        if _guard(go):  # some images could not be read; the others were answered
            raise typer.Exit(_codes()[1])


def _print_result(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(info, default=str))
        return
    plan = info.get("plan", {})
    diff = info.get("diff", {})
    out.print(
        f"generation {info['generation']}: planned {plan.get('planned', 0)} "
        f"(new {plan.get('new', 0)}, retries {plan.get('retry_due', 0)}, refetch "
        f"{plan.get('refetch_due', 0)}"
        + (f", asked again {plan['retry_reason']}" if plan.get("retry_reason") else "")
        + f"; already done {plan.get('already_done', 0)})"
    )
    rc = info.get("recheck") or {}
    if rc:
        out.print(
            f"opt-out re-check: {rc.get('checked', 0)} checked, "
            f"{sum(v for k, v in rc.items() if k.startswith('optout_'))} opted out"
        )
    again = (info.get("settings") or {}).get("safety_judged_again") or {}
    if again.get("judged"):
        from ccurate.release_gate import rejudged_summary

        out.print(escape(rejudged_summary(again)))
    out.print(
        f"diff: +{diff.get('added', 0)} added, -{diff.get('removed', 0)} removed "
        f"{diff.get('removed_by_reason', {})}, ~{diff.get('changed', 0)} changed "
        f"{diff.get('changed_fields', {})}; {diff.get('samples', 0)} samples"
    )
    if info.get("published"):
        out.print(f"release: {escape(str(info['release']))}")
    else:
        latest = escape(str(info.get("latest_release")))
        out.print(f"nothing changed: no new release (latest: {latest})")
