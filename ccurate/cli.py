"""The `ccurate` command line: one command per step, `run` for all, `demo` for the tour.

Exit codes: 0 success, 1 unexpected error, 2 bad config or usage, 3 a step
cannot run yet (e.g. its input step is unfinished), 4 another run holds the lock.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.core import Context  # typer vendors its own click
from typer.core import TyperGroup

from ccurate import __version__

console = Console(stderr=True, soft_wrap=True)  # paths in messages stay copyable
out = Console()

EXIT_ERROR, EXIT_CONFIG, EXIT_NOT_READY, EXIT_LOCKED = 1, 2, 3, 4


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument may be a config file: `ccurate train CONFIG`
    runs its default command, while `ccurate train precompute ...` runs a subcommand."""

    default_command = "run"

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    name="ccurate",
    help="Build Creative-Commons image-text datasets for latent diffusion, and train on them.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
train_app = typer.Typer(
    cls=DefaultCommandGroup,
    help="Train a latent diffusion model on a release: `ccurate train CONFIG`, or a tool below.",
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")

ConfigArg = Annotated[Path, typer.Argument(help="pipeline config (TOML)", show_default=False)]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", "-w", help="worker processes (overrides \\[run].workers)")
]
RetryReasonOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--retry-reason",
        help="with the retry step: also fetch again the ingest drops of this reason (repeat "
        "for several), e.g. decode_error after an upgrade that decodes more images",
    ),
]


def _retry_reasons(chosen: list[str] | None, retrying: bool) -> frozenset[str]:
    """`--retry-reason` values checked before any step runs (a usage error, exit 2)."""
    from ccurate.ingest.stage import retry_reasons

    with usage_errors(ValueError):
        if chosen and not retrying:
            raise ValueError(
                "--retry-reason needs the retry step (--retry-failed, or retry in --steps)"
            )
        return retry_reasons(chosen or [])


def _version(value: bool) -> None:
    if value:
        out.print(f"ccurate {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """ccurate: ingest -> filter -> dedup -> caption -> shard -> train."""


INTERRUPTED = "interrupted: rerun the same command to resume"


def _guard(fn: Callable[[], Any], interrupted: str = INTERRUPTED) -> Any:
    """Turn known failures into clear messages and exit codes instead of tracebacks.
    Ctrl-C prints `interrupted` (what a rerun does) and exits 130: caught here, as typer
    would end the command with a bare exit 130 and the message in `main` would not show."""
    from ccurate.config import ConfigError
    from ccurate.pipeline import PipelineError

    try:
        return fn()
    except KeyboardInterrupt:
        console.print(interrupted)
        raise typer.Exit(130) from None
    except ConfigError as err:  # messages hold paths and [tables]: escaped, not markup
        console.print(f"[red]config error[/red]: {escape(str(err))}")
        raise typer.Exit(EXIT_CONFIG) from None
    except PipelineError as err:
        console.print(f"[red]cannot run[/red]: {escape(str(err))}")
        raise typer.Exit(EXIT_NOT_READY) from None
    except Exception as err:  # the trainer's: a checkpoint or data set that does not fit
        from ccurate.train.cli import input_errors

        if not isinstance(err, input_errors()):
            raise
        console.print(f"[red]error[/red]: {escape(str(err))}")
        raise typer.Exit(EXIT_CONFIG) from None


@contextmanager
def usage_errors(*errors: type[BaseException]) -> Iterator[None]:
    """`errors` are the user's doing (a path, a setting, a release that does not fit): one
    `error: ...` line on stderr and exit 2 (bad config or usage), not a traceback."""
    try:
        yield
    except errors as e:
        why = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) quotes
        typer.echo(f"error: {why}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def load_run_config(
    config: Path, workers: int | None, executor: str | None = None, address: str | None = None
) -> Any:
    """The config file with the command line's run overrides applied."""
    from pydantic import ValidationError

    from ccurate.config import ConfigError, load_config

    cfg = load_config(config)
    for option, field, value in (
        ("--workers", "workers", workers),
        ("--executor", "executor", executor),
        ("--address", "ray_address", address),
    ):
        if value is None:
            continue
        try:  # validated like the file's [run] table: a bad value is a usage error (exit 2)
            setattr(cfg.run, field, value)
        except ValidationError as err:
            why = err.errors()[0]["msg"]
            raise ConfigError(f"{option} {value!r}: {why} (overrides run.{field})") from None
    if address is not None and cfg.run.executor != "ray":  # it would be silently ignored
        raise ConfigError(
            f"--address {address!r} is a Ray cluster address: it needs --executor ray "
            f'(or [run] executor = "ray"); the executor is {cfg.run.executor!r}'
        )
    return cfg


def _pipeline(
    config: Path,
    workers: int | None,
    executor: str | None = None,
    address: str | None = None,
    retry_reasons: frozenset[str] = frozenset(),
) -> Any:
    from ccurate.pipeline import Pipeline

    cfg = load_run_config(config, workers, executor, address)
    return Pipeline(cfg, make_executor(cfg), retry_reasons)


def make_executor(cfg: Any) -> Any:
    """The executor a config asks for (Ray is imported only when chosen)."""
    from ccurate.executor import LocalExecutor

    if cfg.run.executor == "ray":
        from ccurate.ray_executor import RayExecutor

        return RayExecutor(address=cfg.run.ray_address)
    if cfg.run.executor == "slurm":
        from ccurate.slurm_executor import SlurmExecutor

        return SlurmExecutor(cfg.slurm)
    return LocalExecutor(cfg.run.workers)


def _run_steps(config: Path, steps: list[str], workers: int | None, **kw: Any) -> None:
    from ccurate.summary import print_summary

    def go() -> None:
        pipe = _pipeline(config, workers, **kw)
        results = pipe.run(steps)
        print_summary(results, out)
        for r in results:
            if "release" in r.outputs:
                out.print(f"release: {escape(str(r.outputs['release']))}")
        out.print(f"report: {escape(str(pipe.report_path))}")

    _guard(go)


@app.command()
def run(
    config: ConfigArg,
    workers: WorkersOpt = None,
    steps: Annotated[
        str | None,
        typer.Option(
            help="comma-separated, of: ingest, filter, dedup, caption, shard, train, retry "
            "(default: all)"
        ),
    ] = None,
    executor: Annotated[
        str | None, typer.Option(help="local, ray or slurm (overrides \\[run].executor)")
    ] = None,
    address: Annotated[str | None, typer.Option(help="Ray cluster address")] = None,
    retry_reason: RetryReasonOpt = None,
) -> None:
    """Run every step (ingest, filter, dedup, caption, shard, train); resumes where it stopped."""
    from ccurate.pipeline import STEPS

    chosen = [s.strip() for s in steps.split(",") if s.strip()] if steps else []
    with usage_errors(ValueError):  # checked before any step runs, not when its turn comes
        for step in chosen:
            if step not in STEPS and step != "retry":
                raise ValueError(
                    f"--steps: unknown step {step!r}; expected one of {', '.join(STEPS)}, retry"
                )
    reasons = _retry_reasons(retry_reason, "retry" in chosen)
    _run_steps(config, chosen, workers, executor=executor, address=address, retry_reasons=reasons)


@app.command()
def ingest(
    config: ConfigArg,
    workers: WorkersOpt = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            "--retry-failed",
            help="fetch again the transient failures (timeout, connection_error, http_408, "
            "http_429, http_5xx) of the finished ingest; successes are not downloaded again",
        ),
    ] = False,
    retry_reason: RetryReasonOpt = None,
) -> None:
    """Read sources (URL lists, pages, WARCs) and download images with licence evidence."""
    reasons = _retry_reasons(retry_reason, retry_failed)
    _run_steps(config, ["retry"] if retry_failed else ["ingest"], workers, retry_reasons=reasons)


@app.command("filter")
def filter_(config: ConfigArg, workers: WorkersOpt = None) -> None:
    """Apply licence, quality, watermark and safety filters (CLIP score and aesthetics when
    their weights are set), then dedup."""
    _run_steps(config, ["filter", "dedup"], workers)


@app.command()
def caption(config: ConfigArg, workers: WorkersOpt = None) -> None:
    """Write BLIP-2 synthetic captions (skipped, loudly, when no model is configured)."""
    _run_steps(config, ["caption"], workers)


@app.command()
def shard(config: ConfigArg) -> None:
    """Publish a release: webdataset shards by licence split, manifest, ATTRIBUTION, card."""
    _run_steps(config, ["shard"], None)


@train_app.command("run")
def train_run(config: ConfigArg) -> None:
    """Train the latent diffusion model configured in the `train` section on the latest release."""

    def enabled() -> None:  # the pipeline skips a disabled step: asked for, it must say so
        from ccurate.config import ConfigError, load_config

        if not load_config(config).train.enabled:
            raise ConfigError(f"{config}: [train] enabled = false: nothing to train")

    _guard(enabled)
    _run_steps(config, ["train"], None)


@app.command()
def demo(
    out_dir: Annotated[
        Path, typer.Option("--out", help="where the corpus, work and release go")
    ] = Path("demo-out"),
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="worker processes")] = 2,
    caption_model: Annotated[
        str | None,
        typer.Option(help="BLIP-2 weights (hub id or local dir); without it captioning is skipped"),
    ] = None,
    train_steps: Annotated[int, typer.Option(min=1, help="tiny-model training steps")] = 20,
) -> None:
    """Generate the embedded demo corpus, serve it on loopback, and run every step on it."""
    from ccurate.demo.run import INTERRUPTED, run_demo

    _guard(
        lambda: run_demo(
            out_dir,
            workers=workers,
            caption_model=caption_model,
            train_steps=train_steps,
            console=out,
        ),
        interrupted=INTERRUPTED,
    )


def _register_stage_commands() -> None:
    """Stage folders add their own commands (licences, catalog queries, training tools)."""
    from ccurate import rebuild_cli
    from ccurate.filters import cli as filters_cli
    from ccurate.shards import cli as shards_cli
    from ccurate.train import cli as train_cli

    filters_cli.register(app)
    shards_cli.register(app)
    rebuild_cli.register(app)
    train_cli.add_commands(train_app)


_register_stage_commands()


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print(INTERRUPTED)
        sys.exit(130)


if __name__ == "__main__":
    main()
