"""Upgrading under a rebuild's work directory: what decides judging released samples again,
how a judgement made again is recorded, and what the card and the command say about it."""

from __future__ import annotations

import json
from pathlib import Path

from ccurate.config import PipelineConfig
from ccurate.filters.safety import SafetyConfig
from ccurate.rebuild import (
    GEN_FMT,
    _safety_judged,
    current_safety_digest,
    rejudge_cause,
    safety_digest,
)
from ccurate.record import Decision, Sample
from ccurate.release_gate import SAFETY_STORE_REVISION, judge_again, rejudged_summary
from ccurate.shardio import ShardWriter
from ccurate.shards.config import ShardsConfig
from ccurate.shards.release import write_release


def _old_generation(work: Path, n: int, keep_original: bool) -> None:
    """A generation as the version before `safety_judged.json` left it: its filter step's
    settings only, recorded before `[filters.safety]` had its newest keys."""
    safety = SafetyConfig().model_dump(mode="json")
    safety.pop("max_pixels", None)  # a key this version added, absent from old records
    settings = {"ingest": {"keep_original": keep_original}, "filters": {"safety": safety}}
    d = work / GEN_FMT.format(n) / "20_filter"
    d.mkdir(parents=True)
    (d / "_SETTINGS").write_text(json.dumps(settings))


def _cfg(keep_original: bool) -> PipelineConfig:
    return PipelineConfig.model_validate({"ingest": {"keep_original": keep_original}})


def test_upgrade_rejudges_only_files_kept_as_downloaded(tmp_path: Path) -> None:
    """After the storing rules changed, a default configuration (ingest's own encode: no
    metadata, one frame) judges nothing again, while released files kept as downloaded
    are judged again once, for that reason; a shard whose generation is gone is unknown."""
    _old_generation(tmp_path, 1, keep_original=False)
    _old_generation(tmp_path, 2, keep_original=True)
    old = [str(tmp_path / "x" / n) for n in ("g0001-part-00000", "g0002-part-00000")]
    judged = _safety_judged(tmp_path, None, [*old, str(tmp_path / "x" / "g0003-part-00000")])
    plain, kept = current_safety_digest(_cfg(False)), current_safety_digest(_cfg(True))
    assert rejudge_cause(judged["g0001-part-00000"], plain) is None
    assert rejudge_cause(judged["g0002-part-00000"], kept) == "storing_rules"
    assert rejudge_cause(judged["g0003-part-00000"], plain) == "unknown"
    assert kept.endswith(f"/r{SAFETY_STORE_REVISION}") and "/" not in plain
    # a changed judging setting is a settings change whatever the storing rules
    stricter = safety_digest({**SafetyConfig().model_dump(mode="json"), "threshold": 0.2})
    assert rejudge_cause(judged["g0001-part-00000"], stricter) == "settings"


def test_a_judgement_made_again_replaces_the_earlier_one() -> None:
    """One safety decision per record, where the first stood, with the new scores; the
    faces an earlier judgement blurred stay counted (the stored bytes keep the blur)."""
    s = Sample(key="k", url="u")
    s.record(Decision("license", True))
    s.record(Decision("safety", True, scores={"nsfw": 0.1, "faces_blurred": 2.0}))
    s.record(Decision("dedup", True))
    judge_again(s, Decision("safety", True, scores={"nsfw": 0.3, "faces_blurred": 0.0}))
    assert [d.filter for d in s.decisions] == ["license", "safety", "dedup"]
    assert s.scores["safety.nsfw"] == 0.3 and s.scores["safety.faces_blurred"] == 2.0
    judge_again(s, Decision("safety", False, "nsfw", scores={"nsfw": 0.9}))
    assert [d.filter for d in s.decisions] == ["license", "safety", "dedup"]
    assert s.decisions[1].keep is False and s.drop_reason == "nsfw"


def _card(tmp: Path, name: str, settings: dict[str, object]) -> str:
    """The card of a one-sample release whose rebuild info is `settings`."""
    from tests.test_privacy_release import _sample

    w = ShardWriter(tmp / f"in-{name}")
    w.write(_sample(1, blurred=None, dhash=None))
    w.commit({})
    info = {"filters": {"safety": {"enabled": True}}, "rebuild": {"settings": settings}}
    rel = write_release(
        [str(tmp / f"in-{name}")], [], tmp / "out", ShardsConfig(), name=name, run_info=info
    )
    return (rel / "README.md").read_text(encoding="utf-8")


def test_card_says_what_was_judged_again_and_why(tmp_path: Path) -> None:
    """Samples judged under earlier settings that the safety filter did not judge again are
    not said to have been; a re-judgement names its cause, an unknown one as unknown (the
    judging generation was deleted), not as a settings change."""
    card = _card(
        tmp_path,
        "none",
        {
            "released_under_earlier_settings": 33,
            "safety_judged_again": {"judged": 0, "dropped": {}, "because": {}},
        },
    )
    assert "the safety filter to none of them" in card
    assert "safety filter below were applied" not in card
    assert "judged again by the safety filter" not in card
    again = {"judged": 33, "faces_blurred": 0, "dropped": {}, "because": {"unknown": 33}}
    card = _card(tmp_path, "unknown", {"safety_judged_again": again})
    assert (
        "33 released samples judged again by the safety filter (33 because the settings that "
        "judged them are unknown (the generation that judged them is gone) or changed)" in card
    )
    assert "settings changed" not in rejudged_summary(again)
    stored = rejudged_summary({"judged": 3, "dropped": {}, "because": {"storing_rules": 3}})
    assert "earlier storing rules" in stored
