"""CLI of the trainer: `ccurate train precompute` and `ccurate train fit`.

`add_commands(group)` adds both to the `train` group of the root CLI, beside
`ccurate train CONFIG` (the pipeline's train step). Every `TrainConfig` field
can be set from a TOML file's `[train]` table (`--config`) and then overridden
with `--set key=value` (values parsed as JSON when they parse, else strings).
DDP: `torchrun --nproc_per_node N --no-python ccurate train fit ...`.
"""

from __future__ import annotations

import json
import tomllib
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from ccurate.train.config import TrainConfig


def parse_sets(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise typer.BadParameter(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def build_config(config: Path | None, sets: list[str], **direct: Any) -> TrainConfig:
    """[train] of a TOML file, then direct options that were given, then `--set` overrides.

    A bad file, key or value is a usage error (exit 2) naming it, not a traceback."""
    values: dict[str, Any] = {}
    if config is not None:
        try:
            with open(config, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise typer.BadParameter(f"{config}: {exc}", param_hint="--config") from None
        from ccurate.config import PipelineConfig

        if set(PipelineConfig.model_fields) & set(doc):  # a pipeline config: its [train] table
            values.update(doc.get("train", {}))
        else:
            values.update(doc)  # a file of bare [train] keys
    values.update({k: v for k, v in direct.items() if v is not None})
    values.update(parse_sets(sets))
    try:
        return TrainConfig(**values)
    except ValidationError as exc:
        why = "; ".join(
            ": ".join(
                filter(None, [".".join(map(str, e["loc"])), e["msg"].removeprefix("Value error, ")])
            )
            for e in exc.errors()
        )
        raise typer.BadParameter(why, param_hint="train settings") from None


def input_errors() -> tuple[type[Exception], ...]:
    """The trainer's errors that are the user's to fix (a checkpoint, data set or model that
    does not fit the settings; each message says how): `ccurate train` and the tools below
    print them as one line and exit 2, not as a traceback."""
    from ccurate.train.checkpoint import CheckpointError
    from ccurate.train.stream import DataError
    from ccurate.weights import WeightsNotFoundError

    return CheckpointError, DataError, WeightsNotFoundError


def _input_errors() -> AbstractContextManager[None]:
    """`input_errors` as usage errors: exit 2 with one line naming it, not a traceback;
    divergence and other failures keep theirs."""
    from ccurate.cli import usage_errors

    return usage_errors(*input_errors())


ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="TOML file; its \\[train] table is used")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="override a TrainConfig field: key=value")
]
PresetOpt = Annotated[str | None, typer.Option("--preset", help="tiny | sd2-base")]
ResOpt = Annotated[int | None, typer.Option("--resolution", help="training size in pixels")]


def add_commands(app: typer.Typer) -> None:
    """Add `precompute` and `fit` to a Typer group."""

    @app.command("precompute")
    def precompute_cmd(
        data: Annotated[
            str,
            typer.Option(
                "--data", help="release directory (its train.splits), shard file or URL pattern"
            ),
        ],
        out: Annotated[Path, typer.Option("--out", help="directory for the latent shards")],
        config: ConfigOpt = None,
        preset: PresetOpt = None,
        resolution: ResOpt = None,
        batch: Annotated[int | None, typer.Option("--batch", help="images per VAE call")] = None,
        set_: SetOpt = None,
    ) -> None:
        """Encode a release once with the VAE and text encoder; write latent shards."""
        from ccurate.train.precompute import precompute

        cfg = build_config(
            config, set_ or [], preset=preset, resolution=resolution, precompute_batch=batch
        )
        with _input_errors():
            shards = precompute(cfg, data, out)
        typer.echo(f"{len(shards)} latent shards under {out}")

    @app.command("fit")
    def fit_cmd(
        data: Annotated[
            str,
            typer.Option("--data", help="release (its train.splits) or latent directory, or shard"),
        ],
        out: Annotated[
            Path, typer.Option("--out", help="run directory (logs, checkpoints, samples)")
        ],
        config: ConfigOpt = None,
        preset: PresetOpt = None,
        steps: Annotated[int | None, typer.Option("--steps")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", help="per rank")] = None,
        resolution: ResOpt = None,
        resume: Annotated[
            str | None, typer.Option("--resume", help="'latest' or a checkpoint directory")
        ] = None,
        compile_: Annotated[bool | None, typer.Option("--compile/--no-compile")] = None,
        set_: SetOpt = None,
    ) -> None:
        """Train (or resume) the UNet on a release or on precomputed latents."""
        from ccurate.train.loop import train

        cfg = build_config(
            config,
            set_ or [],
            preset=preset,
            steps=steps,
            batch_size=batch_size,
            resolution=resolution,
            resume=resume,
            compile=compile_,
        )
        with _input_errors():
            summary = train(cfg, data, out)
        typer.echo(json.dumps(summary, indent=1, default=str))
