"""Shared test set-up: offline model hubs, the real fixtures folder, small helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ccurate's per-machine cache (weight digests): the tests' own, never the user's
os.environ["CCURATE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ccurate-test-cache-")
# removed when the test process ends (204 empty ones had piled up in /tmp on a dev box)
atexit.register(shutil.rmtree, os.environ["CCURATE_CACHE_DIR"], ignore_errors=True)

REPO = Path(__file__).resolve().parent.parent
REAL = Path(os.environ.get("CCURATE_REAL_FIXTURES", REPO.parent / "shared" / "fixtures" / "real"))


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    """The real-data fixtures beside the repo (../shared/fixtures/real). A clone without them
    skips these tests with the reason shown; CCURATE_REQUIRE_FIXTURES=1 makes that a failure."""
    if not REAL.exists():
        msg = f"real fixtures missing at {REAL} (they ship beside the repo in ../shared)"
        if os.environ.get("CCURATE_REQUIRE_FIXTURES") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return REAL


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand-in sbatch/squeue/scancel first on the PATH; returns their state folder."""
    from tests import fake_slurm

    state = tmp_path / "slurm-state"
    fake_slurm.install(tmp_path / "slurm-bin", state)
    monkeypatch.setenv("PATH", f"{tmp_path / 'slurm-bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_STATE", str(state))
    return state


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    """A local Ray with 2 CPUs for the module's tests (loopback, shut down after)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for the test: tiny tensor ops on a shared 2-core box only contend with
    more. Modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
