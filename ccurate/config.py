"""One TOML file describes a pipeline run; it is validated before any work starts.

Every section comes from the stage that owns it (`ingest/config.py`,
`filters/...`, `captioning/config.py`, `shards/config.py`, `train/config.py`),
so a stage's settings live beside its code. Unknown keys and bad values fail
with a message naming the key and what was expected. Relative paths are
resolved against the config file's folder.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError

from ccurate.captioning.config import CaptionConfig
from ccurate.configbase import Section
from ccurate.filters.config import DedupConfig, FiltersConfig
from ccurate.ingest.config import IngestConfig
from ccurate.ingest.sources import Source
from ccurate.rebuild import RebuildConfig
from ccurate.shards.config import ShardsConfig
from ccurate.slurm_executor import SlurmConfig
from ccurate.train.config import TrainConfig


class RunConfig(Section):
    """Where a run keeps its work and outputs, and how wide it runs."""

    name: str = "ccurate"
    work_dir: str = "work"
    release_dir: str = "releases"
    release_name: str | None = None
    catalog_dir: str | None = Field(None, description="default: <work_dir>/catalog")
    train_dir: str | None = Field(None, description="default: <work_dir>/train")
    workers: int = Field(1, ge=1, le=1024)
    partition_size: int = Field(1000, ge=1, description="records per planned ingest shard")
    executor: str = Field("local", pattern="^(local|ray|slurm)$")
    ray_address: str | None = None

    @property
    def catalog(self) -> Path:
        return Path(self.catalog_dir or Path(self.work_dir) / "catalog")

    @property
    def train_out(self) -> Path:
        return Path(self.train_dir or Path(self.work_dir) / "train")


class PipelineConfig(Section):
    """The whole run: sources, then one section per stage."""

    run: RunConfig = Field(default_factory=lambda: RunConfig())
    sources: list[Source] = Field(default_factory=list)
    ingest: IngestConfig = Field(default_factory=lambda: IngestConfig())
    filters: FiltersConfig = Field(default_factory=lambda: FiltersConfig())
    dedup: DedupConfig = Field(default_factory=lambda: DedupConfig())
    caption: CaptionConfig = Field(default_factory=lambda: CaptionConfig())
    shards: ShardsConfig = Field(default_factory=lambda: ShardsConfig())
    train: TrainConfig = Field(default_factory=lambda: TrainConfig())
    rebuild: RebuildConfig = Field(default_factory=lambda: RebuildConfig())
    slurm: SlurmConfig = Field(default_factory=lambda: SlurmConfig())


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {e['msg']}{got_s}")
    return "\n".join(lines)


def parse_config(
    data: dict[str, Any], origin: str = "<dict>", base: Path | None = None
) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    if base is not None:
        _resolve_paths(cfg, base)
    return cfg


def load_config(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline TOML file."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML in {path}: {err}") from None
    return parse_config(data, str(path), base=path.parent.resolve())


def _resolve_paths(cfg: PipelineConfig, base: Path) -> None:
    """Relative paths in the file mean relative to the file, not to the caller's cwd."""

    def fix(p: str | None) -> str | None:
        if p is None or "://" in p:
            return p
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else base / path)

    run = cfg.run
    run.work_dir = fix(run.work_dir) or run.work_dir
    run.release_dir = fix(run.release_dir) or run.release_dir
    run.catalog_dir = fix(run.catalog_dir)
    run.train_dir = fix(run.train_dir)
    for src in cfg.sources:
        if getattr(src, "path", None):
            src.path = fix(src.path)
    if cfg.caption.cache_dir:
        cfg.caption.cache_dir = fix(cfg.caption.cache_dir)
    # model weights given as local paths (hub ids such as "org/name" are left alone)
    for section, name in _WEIGHT_PATHS:
        owner: Any = cfg
        for part in section.split("."):
            owner = getattr(owner, part)
        value = getattr(owner, name)
        if isinstance(value, str) and _looks_local(value, base):
            setattr(owner, name, fix(value))


# (section, field) of every setting that may name a local weights file or folder
_WEIGHT_PATHS = [
    ("filters.clip_score", "weights"),
    ("filters.aesthetic", "weights"),
    ("filters.aesthetic", "clip_weights"),
    ("filters.watermark", "model_weights"),
    ("filters.safety", "model_path"),
    ("caption", "model"),
    ("train", "unet"),
    ("train", "vae"),
    ("train", "text_encoder"),
]


def _looks_local(value: str, base: Path) -> bool:
    """A path, not a hub id or tag: ./ ../ ~ prefixes, a weights suffix, or it exists there."""
    if not value or value == "scratch" or value.startswith(("hf-hub:", "http://", "https://", "/")):
        return False
    return (
        value.startswith(("./", "../", "~"))
        or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".onnx"))
        or (base / value).exists()
    )
