"""The rebuild's settings digest changes with what judges a record, not with how it runs:
thread counts and batch sizes set off the "judged under earlier settings" warning."""

from __future__ import annotations

import pytest

from ccurate.config import parse_config
from ccurate.rebuild import settings_digest

BASE = settings_digest(parse_config({}))


@pytest.mark.parametrize(
    "change",
    [
        {"filters": {"watermark": {"threads": 2, "batch_size": 8, "device": "cpu"}}},
        {"filters": {"safety": {"threads": 2}}, "caption": {"max_batch_size": 64}},
        {"caption": {"cache_flush_rows": 16, "cuda_graphs": False}},
    ],
)
def test_operational_settings_leave_the_digest(change: dict) -> None:
    assert settings_digest(parse_config(change)) == BASE


@pytest.mark.parametrize(
    "change",
    [
        {"filters": {"license": {"policy": "noncommercial"}}},
        {"filters": {"quality": {"min_side": 128}}},
        {"filters": {"watermark": {"enabled": False}}},
        {"caption": {"prompt": "a picture of"}},
    ],
)
def test_judging_settings_change_the_digest(change: dict) -> None:
    assert settings_digest(parse_config(change)) != BASE


def test_a_disabled_filters_thresholds_do_not_count() -> None:
    off = {"filters": {"watermark": {"enabled": False}}}
    off_other = {"filters": {"watermark": {"enabled": False, "ocr_threshold": 0.9}}}
    assert settings_digest(parse_config(off)) == settings_digest(parse_config(off_other))
