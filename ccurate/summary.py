"""The end-of-run summary table: per step, in / kept / dropped by reason / time / throughput."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ccurate.pipeline import StepResult


def summary_table(results: Sequence[StepResult]) -> Table:
    """One row per step. Ingest's inputs are URLs, pages and WARC records, and one page can
    hold many images: its throughput counts the images handled (kept + dropped), and a
    caption says how many images the inputs held."""
    table = Table(title="ccurate run summary", show_lines=False)
    for col, justify in [
        ("step", "left"),
        ("in", "right"),
        ("kept", "right"),
        ("dropped", "right"),
        ("drop reasons", "left"),
        ("time", "right"),
        ("throughput", "right"),
    ]:
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    notes = []
    for r in results:
        s = r.stats
        # reasons and step names are data, not markup: `[/]` in a custom reason made
        # the table raise at the very end of a run
        reasons = escape(", ".join(f"{k} {v}" for k, v in s.drops.most_common()))
        out = s.n_kept + s.n_dropped
        if out > s.n_in:
            notes.append(f"{r.step}: {s.n_in} inputs held {out} images")
        # resumed shards' counts come from their markers, not from this run's wall time:
        # rate only the share of shards done now (a fully resumed step has no rate)
        done_now = (s.shards - s.skipped_shards) / s.shards if s.shards else 1.0
        handled = max(s.n_in, out) * done_now
        rate = handled / r.wall_seconds if r.wall_seconds > 0 else 0.0
        resumed = f" ({s.skipped_shards} shards resumed)" if s.skipped_shards else ""
        table.add_row(
            escape(r.step),
            str(s.n_in),
            str(s.n_kept),
            str(s.n_dropped),
            reasons or "-",
            f"{r.wall_seconds:.1f}s{resumed}",
            f"{rate:.1f}/s" if done_now > 0 else "-",
        )
    if notes:
        table.caption = escape("; ".join(notes) + " (a page or WARC record can hold many)")
    return table


def print_summary(results: Sequence[StepResult], console: Console | None = None) -> None:
    (console or Console(stderr=False)).print(summary_table(results))
