"""Config values are taken as TOML types them: a quoted or mistyped value is an error naming
the key, never a silent conversion (`allow_private = "yes"` turned the private-address guard
off; `respect_robots_txt = "off"` turned robots.txt off)."""

from __future__ import annotations

import pytest

from ccurate.config import ConfigError, load_config, parse_config


@pytest.mark.parametrize(
    ("section", "key", "value", "says"),
    [
        ("run", "workers", True, "valid integer"),
        ("run", "workers", "8", "valid integer"),
        ("run", "workers", 2.0, "valid integer"),
        ("ingest", "allow_private", "yes", "valid boolean"),
        ("ingest", "allow_private", 1, "valid boolean"),
        ("ingest", "respect_robots_txt", "off", "valid boolean"),
        ("ingest", "respect_robots_txt", 0, "valid boolean"),
        ("shards", "samples_per_shard", "1000", "valid integer"),
        ("ingest", "per_host_rate", "2", "valid number"),
    ],
)
def test_a_value_of_the_wrong_type_is_an_error_naming_the_key(
    section: str, key: str, value: object, says: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({section: {key: value}})
    assert f"{section}.{key}" in str(err.value) and says in str(err.value)


def test_toml_types_still_load(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An integer for a float field is a number (TOML writes 2 for 2.0), arrays are lists."""
    p = tmp_path / "c.toml"
    p.write_text(
        "[run]\nworkers = 3\n[ingest]\nper_host_rate = 2\nallow_private = true\n"
        'allow_networks = ["10.0.0.0/8"]\nmax_aspect_ratio = 3\n'
    )
    cfg = load_config(p)
    assert cfg.run.workers == 3 and cfg.ingest.per_host_rate == 2.0
    assert cfg.ingest.allow_private is True and cfg.ingest.allow_networks == ["10.0.0.0/8"]
    assert cfg.ingest.max_aspect_ratio == 3.0


@pytest.mark.parametrize("ratio", [0.5, 0.25, 0.999])
def test_an_aspect_ratio_below_one_is_refused(ratio: float) -> None:
    """Long side / short side is never below 1: such a bound dropped every image after the
    whole corpus was downloaded."""
    with pytest.raises(ConfigError, match=r"ingest\.max_aspect_ratio.*every image"):
        parse_config({"ingest": {"max_aspect_ratio": ratio}})


@pytest.mark.parametrize("ratio", [0, 1, 2.5])
def test_an_aspect_ratio_of_zero_or_at_least_one_is_taken(ratio: float) -> None:
    assert parse_config({"ingest": {"max_aspect_ratio": ratio}}).ingest.max_aspect_ratio == ratio
