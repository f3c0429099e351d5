"""Progress bars for long work: rich on a terminal, sparse log lines otherwise."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    """A bar over `total` units; quiet when disabled, line-based when not a TTY."""

    def __init__(self, label: str, total: int, enabled: bool = True) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = enabled
        self._t0 = time.perf_counter()
        self._last_log = 0.0
        self._rich: RichProgress | None = None
        if enabled and sys.stderr.isatty():
            self._rich = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,
                # the terminal checked above: rich's default console is stdout, so with
                # stdout redirected the bar went nowhere and left a blank line in the file
                console=Console(stderr=True),
            )
            self._rich.start()
            self._task = self._rich.add_task(label, total=total)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._rich is not None:
            self._rich.update(self._task, advance=n)
        elif self.enabled:
            now = time.perf_counter()
            if now - self._last_log > 5 or self.done == self.total:
                self._last_log = now
                print(
                    f"[{self.label}] {self.done}/{self.total} ({now - self._t0:.0f}s)",
                    file=sys.stderr,
                    flush=True,
                )

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
