"""`ccurate licenses ...`: look at how the licence filter reads evidence."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from ccurate.filters.licenses import explain


def register(app: typer.Typer) -> None:
    """Add the `licenses` command group to the main CLI."""
    licenses = typer.Typer(
        help="Licence normalisation and policy.", no_args_is_help=True, add_completion=False
    )

    @licenses.callback()
    def _group() -> None:
        """Licence normalisation and policy (the licence filter's view of evidence)."""

    @licenses.command("explain")
    def explain_cmd(
        evidence: Annotated[
            list[str],
            typer.Argument(
                help="licence evidence: URL, flickr:N, Wikimedia code, name or text",
                show_default=False,
            ),
        ],
    ) -> None:
        """Print one JSON line per EVIDENCE: licence id, drop reason under the default
        `commercial` policy, and whether it allows commercial use and derivatives and
        requires attribution (null when unknown)."""
        for item in evidence:
            typer.echo(json.dumps(explain(item), ensure_ascii=False, separators=(",", ":")))

    app.add_typer(licenses, name="licenses")
