"""Shared test set-up: offline model hubs, the real fixtures folder, small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "fixtures" / "real"


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    if not REAL.exists():
        pytest.fail(f"real fixtures missing at {REAL} (they ship beside the repo in ../shared)")
    return REAL
