"""One TOML file describes a pipeline run; it is validated before any work starts.

Every section comes from the stage that owns it (`ingest/config.py`,
`filters/...`, `captioning/config.py`, `shards/config.py`, `train/config.py`),
so a stage's settings live beside its code. Unknown keys and bad values fail
with a message naming the key and what was expected. Relative paths are
resolved against the config file's folder.
"""

from __future__ import annotations

import difflib
import json
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from ccurate.captioning.config import CaptionConfig
from ccurate.configbase import Section
from ccurate.filters.config import DedupConfig, FiltersConfig
from ccurate.ingest.config import IngestConfig
from ccurate.ingest.sources import Source
from ccurate.rebuild import RebuildConfig
from ccurate.shards.config import FAMILIES, ShardsConfig
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

    @field_validator("release_name")
    @classmethod
    def _release_dir_name(cls, v: str | None) -> str | None:
        """A folder name inside release_dir; the shard step would refuse it after every
        other step had run."""
        if v and ("/" in v or "\\" in v or v.startswith(".")):
            raise ValueError(
                f"release_name {v!r} must be a plain folder name (no '/', no leading '.')"
            )
        return v

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
    # the config file's folder, which its relative paths were resolved against
    _base: Path | None = PrivateAttr(default=None)

    @property
    def base_dir(self) -> Path | None:
        """The config file's folder (None for a config built in code without one)."""
        return self._base

    @model_validator(mode="after")
    def _coherent(self) -> PipelineConfig:
        """Settings of different sections that cannot work together: refused before any
        step runs, not discovered in a late step or left as a silent no-op."""
        clip = self.filters.clip_score
        if clip.enabled and clip.weights and clip.text == "caption":
            raise ValueError(
                "filters.clip_score.text = 'caption' scores nothing: the filter step runs "
                "before captioning, so every sample would be kept unscored; use text = 'alt_text'"
            )
        if self.dedup.enabled and self.dedup.semantic and not self.dedup.semantic_weights:
            raise ValueError(
                "dedup.semantic = true needs dedup.semantic_weights (a local open_clip "
                "checkpoint of dedup.semantic_model, or an hf-hub: id in the local cache)"
            )
        lic, sh = self.filters.license, self.shards
        admitted = ["commercial"] if lic.enabled and lic.policy == "commercial" else FAMILIES
        published = set(sh.splits)
        if sh.noncommercial_includes_commercial and "noncommercial" in published:
            published.add("commercial")
        if not published & set(admitted):
            raise ValueError(
                f"shards.splits = {sh.splits} publishes nothing: filters.license.policy = "
                f"{lic.policy!r} admits only {list(admitted)} licences (add 'commercial' to "
                "shards.splits, or set shards.noncommercial_includes_commercial = true)"
            )
        return self


class ConfigError(ValueError):
    """A config file that cannot be used; the message says where and why."""


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = _unknown_key(e["loc"]) if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The config sections a field may hold (through lists, unions and Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is None and not isinstance(annotation, types.UnionType):
        return []
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _unknown_key(loc: tuple[str | int, ...]) -> str:
    """'unknown key in [section]', with the nearest valid key when one is close (a typo)."""
    models: list[type[BaseModel]] = [PipelineConfig]
    where: list[str] = []
    kind = ""
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        tagged = [m for m in models if _tag(m) == part] if len(models) > 1 else []
        if tagged:  # the `type` of a [[sources]] entry, not a key
            models, kind = tagged, f" (type = {part!r})"
            continue
        owners = [m for m in models if part in m.model_fields]
        if not owners:
            break
        where.append(part)
        models = _models_in(owners[0].model_fields[part].annotation)
    key = str(loc[-1])
    names = sorted({n for m in models for n in m.model_fields})
    table = ".".join(where)
    section = (
        f"[[{table}]]{kind}" if table == "sources" else f"[{table}]" if table else "the top level"
    )
    near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown key {key!r} in {section}{hint}"


def _tag(model: type[BaseModel]) -> object:
    field = model.model_fields.get("type")
    return field.default if field is not None else None


def parse_config(
    data: dict[str, Any], origin: str = "<dict>", base: Path | None = None
) -> PipelineConfig:
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    if base is not None:
        _resolve_paths(cfg, base)
        cfg._base = base
    return cfg


def portable_dump(cfg: PipelineConfig) -> dict[str, Any]:
    """The settings as JSON, for what a release publishes (`release.json`) and compares
    reruns by: paths inside the config's folder stated relative to it again, as the file
    wrote them. Resolved absolute paths would publish the builder's directory layout
    (`/home/<user>/...`) and make the same release's bytes differ between checkouts."""
    return dict(portable(json.loads(cfg.model_dump_json()), cfg.base_dir))


def portable(value: Any, base: Path | None) -> Any:
    """`value` (JSON) with every string that is `base` or a path under it made relative to
    it; also how a release written before `portable_dump` (absolute paths) is compared."""
    if base is None or base.parent == base:  # no folder, or the root: every path is under it
        return value
    inside = str(base).rstrip(os.sep) + os.sep

    def rel(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, list):
            return [rel(x) for x in v]
        if isinstance(v, str) and (v == str(base) or v.startswith(inside)):
            return Path(os.path.relpath(v, base)).as_posix()
        return v

    return rel(value)


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
        if isinstance(value, str) and looks_local(value, base):
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


def looks_local(value: str, base: Path) -> bool:
    """A path, not a hub id or tag: ./ ../ ~ prefixes, a weights suffix, or it exists there."""
    if not value or value == "scratch" or value.startswith(("hf-hub:", "http://", "https://", "/")):
        return False
    return (
        value.startswith(("./", "../", "~"))
        or value.endswith((".pt", ".pth", ".bin", ".safetensors", ".onnx"))
        or (base / value).exists()
    )
