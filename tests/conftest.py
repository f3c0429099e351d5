"""Shared test set-up: offline model hubs, the real fixtures folder, small helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# ccurate's per-machine cache (weight digests): the tests' own, never the user's
os.environ["CCURATE_CACHE_DIR"] = tempfile.mkdtemp(prefix="ccurate-test-cache-")

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
