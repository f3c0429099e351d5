"""Type-check the project as it is installed: `ccurate.*` mapped onto the stage folders.

mypy cannot follow setuptools' package-dir mapping, so we mirror it with a
tree of symlinks under build/mypy and check that tree.
Usage: python tools/mypy_check.py [folder-or-file ...]   (default: everything)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPING = {
    "ccurate": "ccurate",
    "ccurate/ingest": "ingest",
    "ccurate/filters": "filters",
    "ccurate/captioning": "captioning",
    "ccurate/shards": "shards",
    "ccurate/train": "train",
}


def build_tree() -> Path:
    tree = ROOT / "build" / "mypy"
    shutil.rmtree(tree, ignore_errors=True)  # fresh each time: no links to deleted files
    pkg = tree / "ccurate"
    pkg.mkdir(parents=True, exist_ok=True)
    for entry in (ROOT / "ccurate").iterdir():
        link = pkg / entry.name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(entry)
    for target, folder in MAPPING.items():
        if target == "ccurate":
            continue
        link = tree / target
        if not link.is_symlink():
            link.symlink_to(ROOT / folder, target_is_directory=True)
    return tree


def main(argv: list[str]) -> int:
    tree = build_tree()
    targets: list[str] = [] if argv else [str(tree / "ccurate")]
    for arg in argv:
        rel = Path(arg).resolve().relative_to(ROOT)
        parts = rel.parts
        mapped = next((t for t, f in MAPPING.items() if parts and parts[0] == f), None)
        targets.append(str(tree / mapped / Path(*parts[1:])) if mapped else str(ROOT / rel))
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets]
    env = dict(os.environ, MYPYPATH=str(tree))
    return subprocess.call(cmd, cwd=tree, env=env)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
