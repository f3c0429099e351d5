"""`ccurate licenses explain`: one JSON line per argument."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from ccurate.filters.cli import register

KEYS = ["evidence", "license", "reason", "commercial", "derivatives", "attribution"]


def app() -> typer.Typer:
    a = typer.Typer()
    register(a)
    return a


def test_explain_prints_one_json_line_per_argument() -> None:
    args = [
        "cc-by-sa-3.0-de",
        "https://creativecommons.org/publicdomain/zero/1.0/",
        "flickr:2",
        "© 2020 Jane Doe",
        "https://example.com/by-sa/photo.jpg",
    ]
    result = CliRunner().invoke(app(), ["licenses", "explain", *args])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(args)
    rows = [json.loads(line) for line in lines]
    assert all(list(r) == KEYS for r in rows)
    assert [r["evidence"] for r in rows] == args
    assert [r["license"] for r in rows] == [
        "CC-BY-SA-3.0-DE",
        "CC0-1.0",
        "CC-BY-NC-2.0",
        "LicenseRef-All-Rights-Reserved",
        None,
    ]
    assert [r["reason"] for r in rows] == [
        None,
        None,
        "license_not_allowed",
        "license_not_allowed",
        "license_unknown",
    ]
    assert rows[0]["commercial"] is True and rows[1]["attribution"] is False
    assert rows[4]["commercial"] is None


def test_explain_needs_evidence_and_is_listed() -> None:
    runner = CliRunner()
    assert runner.invoke(app(), ["licenses", "explain"]).exit_code != 0
    out = runner.invoke(app(), ["licenses", "--help"])
    assert out.exit_code == 0 and "explain" in out.output
