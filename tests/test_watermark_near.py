"""Misread-term cues of the OCR watermark detector (pure: no OCR): OCR confusions in names
with digits, cut multi-word names, cut stamp words, and near misses (a weak cue that drops
only with a second one). Each rule has its keep side: scene text that must not match."""

from __future__ import annotations

import numpy as np
import pytest

from ccurate.filters.watermark import (
    OcrBox,
    WatermarkConfig,
    brand_match,
    confusable_equal,
    edit_distance,
    is_phrase_fragment,
    near_term,
    norm_text,
    ocr_cues,
)

CFG = WatermarkConfig()
TERMS = [*CFG.brands, *CFG.strong_words]
STAMPS = sorted(norm_text(w) for w in CFG.stamp_words)


def box(x: float, y: float, w: float, h: float, text: str, score: float = 0.9) -> OcrBox:
    return OcrBox(
        np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float32), text, score
    )


def p(*boxes: OcrBox) -> float:
    return ocr_cues(list(boxes), 640, 480, CFG)["pwatermark_ocr"]


def corner(text: str) -> OcrBox:
    """A small line in the top-left corner: no placement cue."""
    return box(10, 10, 100, 20, text)


def centre(text: str) -> OcrBox:
    """A large line over the centre (5.9% of the frame): the full central cue, 0.3."""
    return box(200, 200, 240, 75, text)


def test_edit_distance() -> None:
    assert edit_distance("preview", "preaew") == 2
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert edit_distance("kitten", "sitting") == 3


def test_names_with_digits_match_through_one_ocr_confusion() -> None:
    assert confusable_equal("123re", "123rf")  # F read as E
    assert confusable_equal("i23rf", "123rf") and confusable_equal("p0nd5", "pond5")
    assert brand_match("123RE", CFG.brands) == "123rf"
    assert p(corner("123RE")) >= 0.9
    # keep: no digit read, a non-confusable swap, two swaps, a dictionary word
    for text in ("PONDS", "123RD", "123rd St", "I23RE", "Ponds"):
        assert brand_match(text, CFG.brands) is None, text
        assert p(centre(text)) < 0.5, text
    assert not confusable_equal("alamy", "alamy")  # equal is the exact rule's, not this one's


def test_cut_multi_word_names() -> None:
    assert is_phrase_fragment(["adobe", "sto"], "adobe stock")
    assert brand_match("Adobe Sto", CFG.brands) == "adobe stock"
    assert brand_match("tty Images", CFG.brands) == "getty images"
    assert brand_match("dobe Stock", CFG.brands) == "adobe stock"  # its first letter lost
    # the two words read as two boxes: the joined text of the image
    assert p(corner("Adobe"), box(300, 300, 40, 20, "Sto")) >= 0.9
    # keep: an address (cut word under 3 letters), a different word, a word of its own
    for text in ("Adobe St", "Adobe Street", "Adobe Store", "Adobe Stone", "Adobe", "Sto",
                 "Adobe House", "Toby Stock", "Fresh Stock"):  # fmt: skip
        assert p(centre(text)) < 0.5, text


def test_cut_stamp_word_on_its_own_line() -> None:
    assert p(corner("PREVIE")) >= 0.5  # its last letter lost
    assert p(corner("SAMPL")) >= 0.5
    # keep: words of their own that start or end a stamp word, and stamps inside a line
    for text in ("AMPLE", "REVIEW", "Review", "Proof of purchase", "PREVIEWS"):
        assert p(corner(text)) < 0.5, text


def test_near_misses_are_weak_and_need_a_second_cue() -> None:
    for text in ("PREAEW", "PREVALEW", "ittersto", "dreamstir", "ERMARK"):
        assert near_term(text, TERMS, STAMPS), text
        assert p(corner(text)) < 0.5, text  # alone (a small corner line): kept
        assert p(centre(text)) >= 0.5, text  # large over the centre: dropped
        assert p(corner(text), box(400, 300, 100, 20, text)) >= 0.5, text  # read twice
    # not near misses: words of their own, inflections of one, other ends and middles
    for text in ("SUPERSTORE", "SHUTTERS", "RESERVED", "RESERVES", "FEATURES", "FEATURED",
                 "REVIEW", "PREMIER", "PRESERVE",
                 "Watermelon", "Deposit", "Storybook", "Shutterbug", "DREAMSCAPE", "SIMPLE",
                 "EXAMPLE", "Stockholm", "Shopping Center", "Gettysburg"):  # fmt: skip
        assert not near_term(text, TERMS, STAMPS), text
        assert p(centre(text)) < 0.5, text
    # lines with a weak word ('photograph', 'preview') are no near miss on top of that
    for text in ("Wedding Photography", "PREVIEWS"):
        assert not near_term(text, TERMS, STAMPS), text
        assert p(corner(text)) < 0.5, text


@pytest.mark.parametrize("text", ["W.Am", "W.Ab", "WW.EXIT"])
def test_capital_w_dot_garble_is_no_url(text: str) -> None:
    """'W.Am' (a sign's garble) is no 'www.' that lost letters; a lower-case host still is."""
    assert p(corner(text)) < 0.5
    assert p(corner("w.anovak")) >= 0.5 and p(corner("ww.janedoe")) >= 0.5
