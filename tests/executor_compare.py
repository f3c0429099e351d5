"""Run the demo pipeline on several executors and compare their releases (Ray, Slurm tests)."""

from __future__ import annotations

from pathlib import Path

from ccurate.config import PipelineConfig
from ccurate.executor import Executor


def demo_on(
    tmp_path: Path, executors: dict[str, Executor]
) -> dict[str, tuple[Path, PipelineConfig]]:
    """The demo corpus (40 images, loopback HTTP, training off) through each executor:
    {name: (release folder, config)}."""
    from ccurate.demo.corpus import generate
    from ccurate.demo.run import demo_config
    from ccurate.demo.server import serve_directory
    from ccurate.pipeline import Pipeline

    corpus = generate(tmp_path / "corpus", n_images=40, per_page=8, seed=3)
    out = {}
    with serve_directory(tmp_path / "corpus") as base_url:
        for name, executor in executors.items():
            cfg = demo_config(corpus, base_url, tmp_path / name, 2, None, 1)
            cfg.train.enabled = False
            Pipeline(cfg, executor).run()
            out[name] = (Path(cfg.run.release_dir) / "demo-v1", cfg)
    return out


def release_sums(root: Path) -> dict[str, str]:
    """A release's SHA256SUMS as {path: digest}."""
    lines = (root / "SHA256SUMS").read_text().splitlines()
    return {path: digest for digest, path in (line.split("  ", 1) for line in lines)}
