"""Watermark detection: OCR cues (always available) plus LAION's classifier (user weights).

OCR path. rapidocr (PP-OCR detection + recognition; the models ship in the
wheel, so it works offline) reads overlaid text from a copy whose long side is
`ocr_side`. Recognition runs only when detection found boxes, and only on the
`ocr_max_boxes` largest lines (a "line" thicker than `ocr_max_line_frac` of the short
side is a ridge or sky band, not text, and is not read). Each box's text is turned
into cues, and the cues are combined by noisy-OR into `pwatermark_ocr` =
1 - prod(1 - w_cue):

============  =====  ==========================================================
cue           w      fires when
============  =====  ==========================================================
brand         0.95   a stock-photo brand (shutterstock, getty images, istock,
                     alamy, dreamstime, 123rf, depositphotos, adobe stock, ...),
                     fuzzy for long names (OCR misreads and drops letters of faint
                     text: 1 edit from 8 letters, 2 from 11, or any 8-letter run);
                     names under 8 letters only as whole words ('Gettysburg'); a word
                     that is a start or an end of a name, 70%+ of it and 5+ letters,
                     counts ('IStOC', 'amstime': tiles cut at the border, faint ends lost),
                     unless it is a word of its own ('stock'); so do two words reading a
                     cut two-word name ('Adobe Sto', not the address 'Adobe St') and a name
                     with a digit read with one OCR confusion ('123RE': F as E; 'PONDS' has
                     no digit, so it is no pond5); accents are dropped first
                     (faint letters are read as 'iStóck')
copyright     0.70   a © mark, "(c)" or (part of) "copyright"; "@ Name" (a faint © read as @)
credit        0.40   a year then a name ("2015 John Smith", "2009 P. Dubois": a © line
                     whose © was lost; below 0.5 as a shop's "1925 Grand Cafe" reads the
                     same); 0.55 in the top or bottom 15% band, where photographers put
                     credits (a sign there that reads like one drops too); not with a
                     street word ("2011 Main St" is an address)
strong word   0.80   "watermark", "stock photo", "do not copy", "preview only", ...
                     (fuzzy like the brands)
url           0.50   www., http or a domain ending: photographers' sites; a URL on a
                     sign drops too, by design (a model should not learn to write URLs).
                     Also 'www.' misread as 'v.'/'vv.', and a lower-case host name whose
                     ending the OCR cut ('leekimphoto.ne'); 'w.'/'ww.' only before a
                     lower-case host ('W.Am' off a station sign is none)
stamp         0.60   a line that reads one stamp word ("PREVIEW", "SAMPLE") and no more,
                     or 70%+ of its start or end ('PREVIE'; not a word of its own, 'AMPLE')
weak word     0.40   "preview", "sample", "proof", "photography", "photo by", ...
near miss     0.40   a term read a little off (`near_term`): a stamp word of 7+ letters
                     with its ends kept and 1 edit per 3.5 letters ('PREAEW'), a word of
                     8+ letters 1 edit from a piece of a one-word brand ('ittersto',
                     'dreamstir'), 60%+ of such a name's start or end ('ERMARK'). Real
                     words sit as close ('waterman', 'thinks'), so it needs a second cue
handle        0.30   an @handle
repeated      0.85   the same word-like text in >= 3 boxes (tiled watermark; boxes sharing
                     a 5-letter run count as the same); 0.35 for 2. Word-like: 3+ letters,
                     2+ distinct besides 'o' (a lit window grid reads '000', 'DOOOOS')
central       <=0.3  word-like or confident text over the central region, growing with
                     its area
pieces        0.60   2+ boxes that each read a piece of one brand or strong word (3+
                     characters with a letter, 60%+ of it: '23R' and '3RF' of 123RF): a
                     tiled watermark on busy ground, read a different piece per tile
============  =====  ==========================================================

So one brand, ©, URL or strong word drops at the default threshold 0.5, while a
single word on a shop sign does not; weak cues need a second cue (placement,
repetition). Detection runs with lowered thresholds (pixel 0.2, box 0.3,
recognition 0.3): faint semi-transparent text scores low, and the cues, not the
detector, decide (measured: no false positive gained on the bench's negatives).

Misread terms (the cut two-word name, the OCR confusion, the cut stamp word and the near
miss above) were measured on bench/watermark_eval.py seeds 0/1/2 with every pass's reads
cached: recall 0.800/0.800/0.825 -> 0.850/0.812/0.850, false-positive rate 0.000/0.000/
0.006 -> 0.000 on all three (the seed-2 false positive was the 'W.Am' URL). The rest of
the misses are read by no pass, or only as garble or as a bare name ('Maria Rossi', '©'
lost), which reads the same as a shop sign: cue rules cannot reach them.

Second pass. White semi-transparent text over a colourful background (foliage, sky,
terrain) often has little luminance contrast: the first pass sees nothing. When it
scores below `ocr_threshold` on an image with colour, the OCR reruns on the
achromatic-brightness map (light *and* grey pixels bright: `achromatic_map`), and the
higher-scoring pass is kept (`ocr_pass` = 1 or 2). Measured on bench/watermark_eval.py
(n_pos=80, n_neg=160): recall 0.650 -> 0.800 at false-positive rate 0.000 (0.838 with the
brand-fragment and edge-credit cues); it costs a
second detection on every colour image the first pass does not flag (about 2.2x the
time per image on the bench; `ocr_achromatic_pass = false` turns it off). That pass sees
the map at a long side of `ocr_achromatic_side` (480): recall and false positives on the
bench unchanged from 640, and 2.19 -> 2.89 images per CPU-second on 575-px demo photos.
An image whose own long side is at most that keeps the first pass's upscaled copy: its
text is small in pixels, and shrinking the upscale again loses reads ('istock', 'alamy'
on 200-500 px photos); small images are cheap, so this costs little.

Third pass. Text over relief, rock or foliage can be plain to the eye and still unboxed
on both: its strokes are no brighter than the lit slopes beside them. Still below
`ocr_threshold` after the second pass, the OCR reruns on that map's white top-hat
(`tophat_map`: what is narrower than a disc of `ocr_tophat_frac` of the short side, so
strokes on flattened ground; `ocr_pass` = 3). Measured on the bench (seeds 0/1/2):
recall 0.850/0.812/0.787 -> 0.863/0.838/0.800, false-positive rate 0.000 on all three,
at a third detection on every image no pass flags (2.30 -> 1.81 images per CPU-second
on seed 0, run back to back; `ocr_tophat_pass = false` turns it off). Tried on the same
44 misses and not kept: luminance minus a large blur, CLAHE, log-luminance high-pass,
inverted luminance, a dark-and-grey map, rotating by 15/30/40 degrees, lower box/pixel
thresholds, a larger unclip ratio, wider dilation (each read 0-5 of them, at most one on
seed 0); a black-hat (dark strokes) fourth pass after this one: +0/+0/+3, not kept.
Its map is brought down to `ocr_tophat_side` (384) long side, small images' upscaled maps
included (strokes bright on black need no upscale): the pass's detection 77 -> 30 CPU ms per
image on the bench; recall 69/67/64 of 80 -> 69/66/64 on seeds 0/1/2 (one faint pass-3 read
lost on seed 1), false-positive rate 0.000 on all three (at 480: 67 on seed 1, but one false
positive).

Fourth and fifth passes. Dark overlays were the weakest (recall 0.58 on seed 1 against 0.89
for light ones): the white top-hat brings out light strokes only, and dark text at 0.3-0.7
opacity over mid-grey or dark ground has little linear contrast. Still below `ocr_threshold`
after the third pass, the OCR reruns on `ratio_map`: the black-hat of log(luminance)
("dark", `ocr_pass` = 4) and then, still below, of log(255 - luminance) ("light", 5). An
overlay of grey f at opacity a scales each pixel's distance to f by (1 - a): in the log of
that distance it is one dip of log(1 - a) whatever the ground's brightness, so the black-hat
shows it at the same contrast on bright and dark patches (`ocr_ratio_passes`, [] turns them
off). Measured on the bench: recall 0.850/0.812/0.850 -> 0.863/0.812/0.887 on seeds 0/1/2,
held-out seeds 3/4 0.700/0.825 -> 0.762/0.875, false-positive rate 0.000 on all five; CPU
per image 773 -> 891 ms (dark only, +15%) / 1007 ms (both, +30%), interleaved on the same 75
images of seed 1. Tried on the 39 misses of seeds 0/1/2 and not kept (each its own pass): a
linear black-hat of the luminance (+2), a black-hat of the achromatic map (+0), a top-hat of
a dark-and-grey map (+1), a black-hat of the chroma (+0), CLAHE of the luminance (+2),
inverted RGB (+0), the image at 320 px (+0), median/bilateral/Gaussian/open/close texture
smoothing (0 of 3 textured misses), both log maps packed into one pass (as channels or their
max: 1 and 2 of the 4 the two passes read). A larger detection side reads clear dark text on
grass only at 1280 px (4x the pixels). 7 of the 39 have their only box dropped as thicker
than `ocr_max_line_frac`: the detector's probability map swells around the text into one
blob (a 376-px-thick box around 'preview' on a bokeh photo), which no map above undoes.

What bounds recall. The bench reruns every pass on each missed positive (`pass_maps`, none
skipped) and counts the misses in which no pass reads a word of 2+ letters (garble counted
as a word): 4/9/6/9/5 of the 11/15/9/19/10 misses on seeds 0-4, so even cue rules that
flagged every other miss would stop at recall 0.950/0.887/0.925/0.887/0.938 (`read_ceiling`).
Seeds 1 and 3 stay below 0.9 whatever the cues do: the rest is the text detector's (the
shipped PP-OCRv6 small model) on faint text over grass, gravel, lit windows and terrain,
and overlays no eye sees (a dark overlay on the Hubble deep field changes its strokes by 4-7
grey levels: recall 0.00-0.67 below a stroke contrast of 20, 0.94-1.00 above 80).

Speed. CPU seconds per image on the bench's seed 0, one thread: 0.546 -> 0.404 (1.83 -> 2.47
images per CPU-second); what is left is the two models (detection ~55%, recognition ~40%).
Besides the smaller third pass, all with the same outputs bit for bit: onnxruntime's CPU
memory arena (`ocr_mem_arena`; rapidocr turns it off: detection ~10% less CPU), detection
preprocessing read from a per-byte table (`LutDetPreProcess`: 20 -> 4 ms per pass), and the
maps' channel max/min by OpenCV (numpy's reductions over an axis of 3: 45 ms per image).
Measured and not kept: recognising crops padded to less than rapidocr's 320 px (to 48 px:
recognition 2x cheaper but 3 positives lost on seed 0; to 160 px: 2 lost; the model reads
a crop differently with less padding). int8 quantisation (onnxruntime.quantization) needs
the `onnx` package, which is not installed; this CPU has AVX2 but no VNNI.
Scores recorded: `ocr_boxes`, `ocr_text_area` (fraction of the image),
`ocr_brand`, `ocr_copyright`, `ocr_repeat` (max repeats of one text),
`ocr_central`, `ocr_pass`, `pwatermark_ocr`.

Model path. LAION-5B's watermark detector: timm ``efficientnet_b3a`` (now
``efficientnet_b3``) whose classifier is Linear(1536, 625)-ReLU-Dropout(0.3)-
Linear(625, 256)-ReLU-Linear(256, 2), on 256x256 ImageNet-normalised input;
softmax index 0 is "watermark" -> `pwatermark`. The state dict of
``watermark_model_v1.pt`` loads as is (same timm key names). Off without weights.
"""

from __future__ import annotations

import itertools
import logging
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import Field

from ccurate.configbase import Section
from ccurate.filters.images import DecodeError, decode_rgb
from ccurate.record import Decision, Sample
from ccurate.stage import Filter, Resources

if TYPE_CHECKING:
    import torch

log = logging.getLogger("ccurate.filters")

REASONS: dict[str, str] = {
    "decode_error": "the image bytes could not be decoded",
    "watermark": "pwatermark_ocr >= watermark.ocr_threshold (stock brand, ©, tiled text, ...) "
    "or the model's pwatermark >= watermark.model_threshold",
}

DEFAULT_BRANDS: list[str] = [
    "shutterstock", "getty images", "getty", "gettyimages", "istock", "istockphoto", "alamy",
    "dreamstime", "123rf", "depositphotos", "adobe stock", "stock.adobe", "fotolia", "bigstock",
    "bigstockphoto", "can stock photo", "canstockphoto", "fotosearch", "pond5", "stocksy",
    "agefotostock", "superstock", "vectorstock", "thinkstock", "colourbox", "masterfile",
    "stockfresh", "crushpixel", "photodune", "envato", "freepik", "pixta", "mostphotos",
    "featurepics", "megapixl", "wavebreak", "storyblocks", "yayimages", "photaki", "imago",
]  # fmt: skip
STRONG_WORDS: list[str] = [
    "watermark", "watermarked", "stock photo", "stock image", "stock photography", "do not copy",
    "preview only", "not for use", "unlicensed", "proof only", "all rights reserved",
    "for preview", "not for resale", "comp image",
]  # fmt: skip
# words stamped over proofs on their own; inside a longer line ('free sample', 'proof of
# purchase') they stay weak words
STAMP_WORDS: list[str] = ["preview", "sample", "proof", "specimen"]
WEAK_WORDS: list[str] = [
    "preview", "sample", "proof", "photograph", "photo by", "image by",
    "licensed", "photos", "images", "studio",
]  # fmt: skip

W_BRAND, W_COPYRIGHT, W_STRONG, W_URL, W_WEAK, W_HANDLE = 0.95, 0.70, 0.80, 0.50, 0.40, 0.30
W_REPEAT3, W_REPEAT2, W_CENTRAL, W_CREDIT, W_CREDIT_EDGE = 0.85, 0.35, 0.30, 0.40, 0.55
W_PIECES = 0.60  # 2+ boxes reading pieces of one brand or strong word (`fragment_repeats`)
# a near miss of a brand, strong or stamp word (`near_term`): weighted like a weak word, so
# it drops only with a second cue (central placement, an edge band, repetition)
W_NEAR = 0.40
W_STAMP = 0.60  # a text line that reads exactly one stamp word ('PREVIEW', 'SAMPLE') and no more
EDGE_BAND = 0.15  # a credit whose centre lies this close to the top or bottom edge
CENTRAL_MIN_SCORE = 0.8  # central text counts when word-like or read with this confidence

_COPYRIGHT_RE = re.compile(
    r"[©ⓒ℗]|\(c\)|copyr|opyrig|pyright|\bcopr\.?\b|all rights", re.IGNORECASE
)
# "@ John Smith": the OCR's usual misreading of a faint © (an @handle has no space after @)
_AT_NAME_RE = re.compile(r"^\W*@\s+[A-Z][a-z]")
# "2015 John Smith": a credit line whose © the OCR lost
_CREDIT_RE = re.compile(r"(?:^|\s)(?:19|20)\d\d\s*(?:[A-Z]\.?\s+)?[A-Z][a-z]+(?:\s+[A-Za-z]|$)")
# "2011 Main St": a house number on a sign, not a credit
_ADDRESS_RE = re.compile(
    r"\b(?:st|street|ave|avenue|rd|road|blvd|boulevard|ln|lane|dr|drive|hwy|highway|pl|place|"
    r"ct|court|sq|square|pkwy|way)\b\.?",
    re.IGNORECASE,
)
_TLDS = "com|net|org|co|de|uk|fr|it|es|nl|ru|jp|cn|io|me|info|biz|pl|au|ca"
# 'wwwww.' (4+ w's) is texture garble (the top-hat pass read it off a bench negative), no URL.
# 'w.'/'ww.' (a 'www.' that lost letters) only before a lower-case host: 'W.Am' is a sign's
# garble (a bench negative), like the capitalised 'V.LE' of `_MISREAD_WWW_RE`
_URL_RE = re.compile(
    rf"(?<!w)www\.|^(?-i:[wW]{{1,2}}\.[a-z]{{2}})|https?:"
    rf"|\.(?:{_TLDS}|photo|photos|photography|studio)\b",
    re.IGNORECASE,
)
# 'www.' read as 'v.'/'vv.' before a lower-case name ('v.anovak.'); case-sensitive, so an
# Italian street sign's 'V.LE EUROPA' / 'V.Roma' or 'v.Chr.' is none
_MISREAD_WWW_RE = re.compile(r"^\W*[vw]{1,3}\.[a-z]{3,}")
# 'leekimphoto.ne': a lower-case host name whose domain ending the OCR cut short ('.net'
# read as '.ne'), at the end of a line; the ending must start a domain ending, so a file
# name ('photo.jpg', 'readme.txt') or two words glued by a missed space ('world.the') is none
_HOST_RE = re.compile(r"(?<![\w.])[a-z][a-z0-9-]{4,}\.([a-z]{2,3})$")
_TLD_STARTS = frozenset(t[:n] for t in _TLDS.split("|") for n in range(2, len(t) + 1))
_WORD_RE = re.compile(r"[^\W_]+")
_HANDLE_RE = re.compile(r"(?:^|\s)@[a-z0-9_.]{3,}", re.IGNORECASE)


RatioPolarity = Literal["dark", "light"]


def _default_ratio() -> list[RatioPolarity]:
    return ["dark", "light"]


class WatermarkConfig(Section):
    """[filters.watermark]: the OCR detector (on) and LAION's classifier (off without weights)."""

    enabled: bool = True
    ocr: bool = True
    ocr_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # on pwatermark_ocr
    ocr_side: Annotated[int, Field(ge=64, le=4096)] = 640  # long side the OCR sees
    # smaller images are brought up towards ocr_side, by at most this factor (1 = never):
    # small text reads better, at a cost that grows with the square of the factor
    ocr_max_upscale: Annotated[float, Field(ge=1.0, le=8.0)] = 2.5
    ocr_max_boxes: Annotated[int, Field(ge=1)] = 16  # recognise only the largest boxes
    ocr_text_score: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3  # min recognition confidence
    ocr_det_thresh: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2  # detector pixel threshold
    ocr_box_thresh: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3  # detector box threshold
    # box score over the polygon ("slow") or its axis-aligned rectangle ("fast", which
    # dilutes rotated text with background)
    ocr_score_mode: Literal["fast", "slow"] = "slow"
    ocr_use_cls: bool = False  # 180-degree text classifier: watermarks are rarely upside down
    # a "line" thicker than this fraction of the short side is a ridge or a sky band the
    # detector took for text (its garble, 'W.W', would read as a URL): not recognised
    ocr_max_line_frac: Annotated[float, Field(gt=0.0, le=1.0)] = 0.3
    # second pass on the achromatic-brightness map (bright where the image is light *and*
    # grey, as white semi-transparent text is: it lifts a colourful background towards grey),
    # run only when the first pass scores below ocr_threshold and the image has colour
    ocr_achromatic_pass: bool = True
    # mean chroma (max - min channel, 0-255) below which the image counts as grey: the map
    # would then equal the luminance the first pass read, and the pass is skipped
    ocr_achromatic_min_chroma: Annotated[float, Field(ge=0.0, le=255.0)] = 12.0
    # long side of the second pass's map (at most the first pass's): its detection costs
    # in proportion to the pixels. An image whose own long side is at most this keeps the
    # first pass's upscaled copy (small text must stay upscaled to be read)
    ocr_achromatic_side: Annotated[int, Field(ge=64, le=4096)] = 480
    # third pass, on the white top-hat of that map (`tophat_map`): still below ocr_threshold
    # after the second, bright strokes are read with the ground under them flattened. Off
    # with ocr_achromatic_pass (that flag means "first pass only")
    ocr_tophat_pass: bool = True
    # the top-hat's disc, as a fraction of the map's short side: wider than a stroke,
    # narrower than the ground's relief (0.05 of 480 px = 24 px)
    ocr_tophat_frac: Annotated[float, Field(gt=0.0, le=0.5)] = 0.05
    # long side of the third pass's map, small images included (unlike the second pass,
    # whose map they keep at their upscaled size): the top-hat's strokes, bright on black,
    # need no upscale. Its detection costs in proportion to the pixels: 384 cut the pass's
    # detection 77 -> 30 ms per image on the bench; recall 69/67/64 of 80 -> 69/66/64 on
    # seeds 0/1/2, no false positive (480: 67/80 on seed 1 but one false positive)
    ocr_tophat_side: Annotated[int, Field(ge=64, le=4096)] = 384
    # fourth (and fifth) pass, still below ocr_threshold after the third: the OCR reads the
    # black-hat of the log-luminance's distance from an overlay's grey (`ratio_map`). An
    # overlay of grey f at opacity a scales every pixel's distance to f by (1 - a), so in
    # log(|p - f|) it is one step of log(1 - a) whatever the ground's brightness: faint text
    # comes out on dark and bright ground alike. "dark" (f = black: dark overlays, which no
    # other pass brings out) and "light" (f = white), in this order, the second only while
    # the first scores below ocr_threshold; an empty list turns the pass off. Its map has
    # the third pass's size (`ocr_tophat_side`) and disc (`ocr_tophat_frac`). Off with
    # ocr_achromatic_pass ("first pass only"); independent of ocr_tophat_pass
    ocr_ratio_passes: list[RatioPolarity] = Field(default_factory=_default_ratio, max_length=2)
    threads: Annotated[int, Field(ge=0)] = 1  # onnxruntime intra-op threads; 0 = all cores
    # onnxruntime's CPU memory arena for the OCR models (rapidocr turns it off): buffers are
    # reused from image to image instead of allocated per run. Same outputs, about 8% less
    # detection CPU on the bench, for ~40 MB more resident memory (the peak run's buffers)
    ocr_mem_arena: bool = True
    brands: list[str] = Field(default_factory=lambda: list(DEFAULT_BRANDS))
    strong_words: list[str] = Field(default_factory=lambda: list(STRONG_WORDS))
    weak_words: list[str] = Field(default_factory=lambda: list(WEAK_WORDS))
    stamp_words: list[str] = Field(default_factory=lambda: list(STAMP_WORDS))
    # LAION watermark classifier (watermark_model_v1.pt): a local path or hf-hub:org/repo/file
    model_weights: str | None = None
    model_arch: str = "efficientnet_b3"  # timm name; efficientnet_b3a is its old alias
    model_threshold: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # SD v1 kept pwatermark < 0.5
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")] = "auto"
    batch_size: Annotated[int, Field(ge=1)] = 32


# ---- text cues ---------------------------------------------------------------------------


def fold_text(s: str) -> str:
    """NFKC, lower case, accents dropped: the OCR puts stray accents on faint letters
    ('iStóck'), and a brand read with one must still match."""
    s = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", s).lower())
    return "".join(ch for ch in s if not unicodedata.combining(ch))


def norm_text(s: str) -> str:
    """Lower-case alphanumerics only, accents dropped: 'Getty Images®' -> 'gettyimages'."""
    return "".join(ch for ch in fold_text(s) if ch.isalnum())


def substring_distance(pattern: str, text: str) -> int:
    """Fewest edits turning `pattern` into some substring of `text` (semi-global alignment)."""
    prev = [0] * (len(text) + 1)
    for i, pc in enumerate(pattern, 1):
        cur = [i] + [0] * len(text)
        for j, tc in enumerate(text, 1):
            cur[j] = min(prev[j - 1] + (pc != tc), prev[j] + 1, cur[j - 1] + 1)
        prev = cur
    return min(prev)


def allowed_edits(n: int) -> int:
    """Short names must match exactly ('in stock' must not read as 'istock')."""
    return 0 if n < 8 else 1 if n < 11 else 2


PARTIAL_MIN_BRAND, PARTIAL_MIN_RUN = 11, 8


def fuzzy_contains(needle: str, text: str, own: Sequence[tuple[int, int]] = ()) -> bool:
    """`needle` (normalised) in `text`: exact, within `allowed_edits`, or - for names of 11+
    letters - any 8-letter run of it (faint text often loses its first or last letters:
    'ettyimag' is Getty Images). A run lying inside one of the spans `own` of `text` (its
    words of their own, `own_word_spans`) does not count: 'SHUTTERS' over a shop is no
    Shutterstock and 'RESERVED' over a parking bay no 'all rights reserved'."""
    if not needle or not text:
        return False
    if needle in text:
        return True
    k = allowed_edits(len(needle))
    if k and len(text) >= len(needle) - k and substring_distance(needle, text) <= k:
        return True
    if len(needle) < PARTIAL_MIN_BRAND or len(text) < PARTIAL_MIN_RUN:
        return False
    n = PARTIAL_MIN_RUN
    for run in {needle[i : i + n] for i in range(len(needle) - n + 1)}:
        j = text.find(run)
        while j >= 0:
            if not any(a <= j and j + n <= b for a, b in own):
                return True
            j = text.find(run, j + 1)
    return False


def own_word_spans(text: str, phrase: str) -> list[tuple[int, int]]:
    """Spans, in `norm_text(text)`, of its words that are words of their own
    (`FRAGMENT_STOP`) or words of `phrase`, the name looked for (see `fuzzy_contains`)."""
    own = {norm_text(w) for w in _WORD_RE.findall(fold_text(phrase))}
    t = norm_text(text)
    spans, pos = [], 0
    for w in _WORD_RE.findall(fold_text(text)):
        nw = norm_text(w)
        at = t.find(nw, pos) if nw else -1
        if at < 0:
            continue
        pos = at + len(nw)
        if nw in FRAGMENT_STOP or nw in own:
            spans.append((at, pos))
    return spans


FRAGMENT_MIN_LEN, FRAGMENT_MIN_FRAC = 5, 0.7
# starts and ends of brand names that are words of their own ('stock' ends 'istock')
# words of their own inside brand names or strong words: never a piece of a watermark
FRAGMENT_STOP = frozenset({
    "stock", "stocks", "photos", "images", "dreams", "shutter", "shutters", "search", "master",
    "colour", "feature", "review", "license", "licensed", "photography", "photo", "image",
    "preview", "sample", "copy", "only", "watermark", "ample",
})  # fmt: skip


def is_brand_fragment(word: str, brand_norm: str) -> bool:
    """Is `word` (a whole normalised word) a start or an end of the brand name, at least
    70% of it and 5 letters? Tiles cut by the image border and faint text losing its
    first or last letters read that way ('IStOC', 'amstime')."""
    n = len(word)
    return (
        FRAGMENT_MIN_LEN <= n < len(brand_norm)
        and n >= FRAGMENT_MIN_FRAC * len(brand_norm)
        and word not in FRAGMENT_STOP
        and (brand_norm.startswith(word) or brand_norm.endswith(word))
    )


# Letters and digits the OCR swaps on faint text, both ways: F read as E (its faint foot bar
# taken for a stroke), O/0, I/l/1, S/5, B/8, Z/2 (case-folded; see `confusable_equal`)
OCR_CONFUSIONS: frozenset[frozenset[str]] = frozenset(
    frozenset(p) for p in ("ef", "o0", "i1", "l1", "il", "s5", "b8", "z2")
)


def confusable_equal(word: str, term: str) -> bool:
    """Is `word` the name `term` (both normalised) with one character swapped for one the
    OCR confuses it with ('123re' for 123RF)? Only for names with a digit, read with their
    digits: such a token is no dictionary word, so 'ponds' is not pond5 nor '123rd' 123RF."""
    if len(word) != len(term) or word == term or not any(ch.isdigit() for ch in term):
        return False
    if not any(ch.isdigit() for ch in word):
        return False
    diff = [(a, b) for a, b in zip(word, term, strict=True) if a != b]
    return len(diff) == 1 and frozenset(diff[0]) in OCR_CONFUSIONS


def is_phrase_fragment(words: Sequence[str], brand: str) -> bool:
    """Do two adjacent words read a cut multi-word name: its first word whole and a start
    of the next ('Adobe Sto'), or an end of a word and the last word whole ('tty Images')?
    The cut word has 3+ letters and the pair 70%+ of the name (as `is_brand_fragment`), so
    'Adobe St' (an address) is none; a word of its own is not a cut word."""
    bwords = [norm_text(w) for w in _WORD_RE.findall(fold_text(brand))]
    b = "".join(bwords)
    if len(bwords) < 2:
        return False
    for a, c in itertools.pairwise(words):
        cat = a + c
        if not (FRAGMENT_MIN_FRAC * len(b) <= len(cat) < len(b)):
            continue
        if a == bwords[0] and len(c) >= 3 and c not in FRAGMENT_STOP and b.startswith(cat):
            return True
        if c == bwords[-1] and len(a) >= 3 and a not in FRAGMENT_STOP and b.endswith(cat):
            return True
    return False


def brand_match(text: str, brands: Sequence[str]) -> str | None:
    """The first brand found in `text`, else None.

    Names of 8+ letters match inside the normalised text, fuzzily; shorter ones only
    as a whole word, so 'Gettysburg' is not Getty and 'in stock' is not iStock. A whole
    word that is most of a name's start or end matches too (`is_brand_fragment`), and so
    do two words reading a cut multi-word name (`is_phrase_fragment`) and a name with a
    digit read with one OCR confusion (`confusable_equal`: '123RE').
    """
    t = norm_text(text)
    seq = [norm_text(w) for w in _WORD_RE.findall(fold_text(text))]
    words = set(_WORD_RE.findall(fold_text(text)))
    for brand in brands:
        b = norm_text(brand)
        if len(b) < 8:
            if b in words or (b == t and b):
                return brand
        elif fuzzy_contains(b, t, own_word_spans(text, brand)):
            return brand
        if any(is_brand_fragment(w, b) or confusable_equal(w, b) for w in words):
            return brand
        if is_phrase_fragment(seq, brand):
            return brand
    return None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance between `a` and `b`."""
    prev = list(range(len(b) + 1))
    for i, ac in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, bc in enumerate(b, 1):
            cur[j] = min(prev[j - 1] + (ac != bc), prev[j] + 1, cur[j - 1] + 1)
        prev = cur
    return prev[-1]


NEAR_MIN_RUN, NEAR_MIN_END, NEAR_END_FRAC, NEAR_STAMP_MIN = 8, 6, 0.6, 7


def near_term(text: str, terms: Sequence[str], stamps_norm: Sequence[str]) -> bool:
    """A near miss of a watermark term in one box's `text` (weak evidence, `W_NEAR`):

    - a whole line within 1 edit per 3.5 letters of a stamp word of 7+ letters, its first
      and last letters kept ('PREAEW', 'PREVALEW' for 'preview': faint middle letters
      misread; 'PREMIER', 'PREVIEWS', 'REVIEW' are none; shorter stamps have real
      neighbours, 'simple');
    - a word of 8+ letters within 1 edit of a piece of a one-word brand or strong word
      ('ittersto', 'dreamstir': the same 1 edit per 8 letters as `allowed_edits`);
    - a word of 6+ letters that is 60%+ of such a term's start or end ('ERMARK'; the
      strong cut-name rule, `is_brand_fragment`, wants 70%).

    Phrases ('all rights reserved') are left out: their pieces are mostly their words,
    each a word of its own ('PRESERVE' is 1 edit from 'sreserve'). A word of its own
    (`FRAGMENT_STOP`) or 1 edit from one ('features' from 'feature') is no near miss."""
    t = norm_text(text)
    for st in stamps_norm:
        if (
            len(st) >= NEAR_STAMP_MIN
            and len(t) >= 3
            and t not in FRAGMENT_STOP
            and (t[0], t[-1]) == (st[0], st[-1])
            and edit_distance(t, st) <= round(len(st) / 3.5)
        ):
            return True
    single = [norm_text(x) for x in terms if len(_WORD_RE.findall(fold_text(x))) == 1]
    for w in (norm_text(x) for x in _WORD_RE.findall(fold_text(text))):
        if len(w) < NEAR_MIN_END or not any(ch.isalpha() for ch in w):
            continue
        if any(abs(len(o) - len(w)) <= 1 and edit_distance(o, w) <= 1 for o in FRAGMENT_STOP):
            continue
        for term in single:
            if len(w) < len(term) and (
                (len(w) >= NEAR_MIN_RUN and substring_distance(w, term) <= 1)
                or (
                    len(w) >= NEAR_END_FRAC * len(term) and (term.startswith(w) or term.endswith(w))
                )
            ):
                return True
    return False


def _common_run(a: str, b: str, n: int) -> bool:
    """Do `a` and `b` share a substring of length n with 2+ distinct characters besides
    'o' and '0' ('ooooo' is shared by any two readings of a window grid)?"""
    runs = {a[i : i + n] for i in range(len(a) - n + 1)}
    return any(
        b[i : i + n] in runs and len(set(b[i : i + n]) - {"o", "0"}) >= 2
        for i in range(len(b) - n + 1)
    )


def is_wordlike(text_norm: str) -> bool:
    """At least 3 Latin letters, 2 of them distinct and not 'o': what the OCR reads off a
    grid of lit windows or a fence ('000', 'OOO', '日口日', '0OO') repeats too, and is not a
    tiled watermark."""
    letters = [ch for ch in text_norm if "a" <= ch <= "z"]
    return len(letters) >= 3 and len(set(letters) - {"o"}) >= 2


def repeat_count(texts_norm: Sequence[str]) -> int:
    """Largest group of boxes showing the same word-like text (tiled watermark): boxes are
    grouped when equal or sharing a 5-letter run, since tiles at the border are cut."""
    items = [t for t in texts_norm if is_wordlike(t)]
    best = 0
    for a in items:
        n = sum(1 for b in items if a == b or _common_run(a, b, min(5, len(a), len(b))))
        best = max(best, n)
    return best


FRAG_MIN_CHARS, FRAG_MIN_SHARE, FRAG_MIN_TERM = 3, 0.6, 5


def fragment_repeats(texts_norm: Sequence[str], terms_norm: Sequence[str]) -> int:
    """Most boxes reading pieces of one watermark term (a brand or strong word of 5+
    characters): each box's whole text a run of the term, 3+ characters with a letter and
    60%+ of it ('23R' and '3RF' of 123RF), or the term itself. A tiled watermark on busy
    ground is read in pieces, a different piece in each tile, so `repeat_count` (same
    text) misses it. Pieces that are words of their own ('stock') do not count."""
    best = 0
    for term in terms_norm:
        if len(term) < FRAG_MIN_TERM:
            continue
        need = max(FRAG_MIN_CHARS, FRAG_MIN_SHARE * len(term))
        pieces = {
            t
            for t in texts_norm
            if len(t) >= need
            and t in term
            and t not in FRAGMENT_STOP
            and any(ch.isalpha() for ch in t)
        }
        best = max(best, len(pieces))  # distinct: the same word twice is `repeat_count`'s
    return best


def _cut_host(text: str) -> bool:
    """A host name whose domain ending was cut ('leekimphoto.ne'; see `_HOST_RE`)."""
    m = _HOST_RE.search(text.strip())
    return m is not None and m.group(1) in _TLD_STARTS


def _contains_word(text_norm: str, words_norm: Sequence[str]) -> bool:
    return any(w and w in text_norm for w in words_norm)


def _contains_phrase(text: str, phrases: Sequence[str]) -> bool:
    """A strong phrase in one box's `text`, fuzzily (`fuzzy_contains`)."""
    t = norm_text(text)
    return any(fuzzy_contains(norm_text(p), t, own_word_spans(text, p)) for p in phrases)


@dataclass
class OcrBox:
    """One detected text line: quadrilateral (4x2, image pixels), text, recognition score."""

    box: np.ndarray
    text: str = ""
    score: float = 0.0


def _thickness(box: np.ndarray) -> float:
    """The shorter side of a detected quadrilateral: a text line's height."""
    b = box.astype(np.float32)
    return float(min(np.linalg.norm(b[1] - b[0]), np.linalg.norm(b[2] - b[1])))


def _poly_area(box: np.ndarray) -> float:
    return float(abs(cv2.contourArea(box.astype(np.float32).reshape(-1, 1, 2))))


def ocr_cues(
    boxes: Sequence[OcrBox],
    width: int,
    height: int,
    cfg: WatermarkConfig,
    n_detected: int | None = None,
) -> dict[str, float]:
    """Watermark cues and `pwatermark_ocr` from OCR results (pure: testable without OCR)."""
    area = float(max(1, width * height))
    texts = [b for b in boxes if b.text.strip()]
    norm = [norm_text(b.text) for b in texts]
    weak = [norm_text(w) for w in cfg.weak_words]
    joined = " ".join(b.text for b in texts)

    brand = any(brand_match(b.text, cfg.brands) for b in texts) or (
        len(texts) > 1 and brand_match(joined, cfg.brands) is not None
    )
    copyright_ = any(_COPYRIGHT_RE.search(b.text) or _AT_NAME_RE.search(b.text) for b in texts)
    credits = [b for b in texts if _CREDIT_RE.search(b.text) and not _ADDRESS_RE.search(b.text)]
    credit_edge = any(
        not EDGE_BAND <= b.box[:, 1].mean() / max(1, height) <= 1 - EDGE_BAND for b in credits
    )
    url = any(
        _URL_RE.search(b.text) or _MISREAD_WWW_RE.search(b.text) or _cut_host(b.text) for b in texts
    )
    handle = any(_HANDLE_RE.search(b.text) for b in texts)
    strong_hit = any(_contains_phrase(b.text, cfg.strong_words) for b in texts)
    weak_hit = any(_contains_word(t, weak) for t in norm)
    stamps = {norm_text(w) for w in cfg.stamp_words} - {""}
    # the whole line a stamp word, or most of its start or end ('PREVIE': its last letter lost)
    stamp_hit = any(t in stamps or any(is_brand_fragment(t, st) for st in stamps) for t in norm)
    near = any(near_term(b.text, [*cfg.brands, *cfg.strong_words], sorted(stamps)) for b in texts)

    repeat = repeat_count(norm)
    pieces = fragment_repeats(norm, [norm_text(w) for w in [*cfg.brands, *cfg.strong_words]])

    all_boxes = list(boxes)
    text_area = min(1.0, sum(_poly_area(b.box) for b in all_boxes) / area)
    central = 0.0
    for b, t in zip(texts, norm, strict=True):
        if not (is_wordlike(t) or b.score >= CENTRAL_MIN_SCORE):
            continue  # low-confidence garble ('DOOOOS' off a window grid) is no overlay
        cx, cy = b.box[:, 0].mean() / max(1, width), b.box[:, 1].mean() / max(1, height)
        if 0.25 <= cx <= 0.75 and 0.25 <= cy <= 0.75:
            central += _poly_area(b.box) / area
    central = min(1.0, central)

    weights = [
        W_BRAND if brand else 0.0,
        W_COPYRIGHT
        if copyright_
        else W_CREDIT_EDGE
        if credit_edge
        else W_CREDIT
        if credits
        else 0.0,
        W_STRONG if strong_hit else 0.0,
        W_URL if url else 0.0,
        W_WEAK if weak_hit else 0.0,
        W_STAMP if stamp_hit else 0.0,
        W_HANDLE if handle else 0.0,
        W_REPEAT3 if repeat >= 3 else W_REPEAT2 if repeat == 2 else 0.0,
        W_CENTRAL * min(1.0, central / 0.04),
        W_PIECES if pieces >= 2 else 0.0,
        W_NEAR if near else 0.0,
    ]
    p_clear = 1.0
    for w in weights:
        p_clear *= 1.0 - w
    return {
        "ocr_boxes": float(n_detected if n_detected is not None else len(all_boxes)),
        "ocr_text_area": text_area,
        "ocr_brand": float(brand),
        "ocr_copyright": float(copyright_),
        "ocr_repeat": float(repeat),
        "ocr_central": central,
        "pwatermark_ocr": 1.0 - p_clear,
    }


# ---- OCR engine --------------------------------------------------------------------------


class LutDetPreProcess:
    """rapidocr's detection preprocessing (resize to multiples of 32, normalise, CHW float32)
    with the normalisation read from a 256-entry table per channel.

    rapidocr computes (x/255 - mean) / std in float64 over the whole image and casts to
    float32: 20 ms of a 640x480 image's ~170 ms detection. The table holds exactly those
    values for each of the 256 bytes, so the input, hence every box, is the same bit for bit
    (tests/test_watermark_speed.py), at 3-4 ms. Anything but a 3-channel uint8 image (never
    seen here) takes rapidocr's own path."""

    def __init__(self, stock: Any) -> None:
        self.stock = stock  # rapidocr's DetPreProcess: its resize and its fallback
        scale = np.arange(256, dtype=np.float32)[None, :] * stock.scale  # float32, as theirs
        mean = np.asarray(stock.mean).reshape(-1, 1)
        std = np.asarray(stock.std).reshape(-1, 1)
        self.lut = ((scale - mean) / std).astype(np.float32)  # (channels, 256)

    @classmethod
    def like(cls, det: Any) -> LutDetPreProcess:
        """One for rapidocr's TextDetector `det`, with its side limit, mean and std."""
        return cls(det.__class__.get_preprocess(det))

    def __call__(self, img: np.ndarray) -> np.ndarray | None:
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != self.lut.shape[0]:
            out: np.ndarray | None = self.stock(img)
            return out
        resized = self.stock.resize(img)
        if resized is None:
            return None
        out = np.empty((1, resized.shape[2], *resized.shape[:2]), np.float32)
        for c in range(resized.shape[2]):
            np.take(self.lut[c], resized[:, :, c], out=out[0, c])
        return out


class OcrReader:
    """rapidocr with detection-first, capped recognition on a resized copy."""

    def __init__(self, cfg: WatermarkConfig) -> None:
        self.cfg = cfg
        self._engine: Any = None

    def setup(self) -> None:
        if self._engine is not None:
            return
        from rapidocr import RapidOCR

        self._engine = RapidOCR(
            params={
                "Global.log_level": "error",
                "Global.use_cls": self.cfg.ocr_use_cls,
                "Det.limit_type": "max",
                "Det.limit_side_len": self.cfg.ocr_side,
                "Det.thresh": self.cfg.ocr_det_thresh,
                "Det.box_thresh": self.cfg.ocr_box_thresh,
                "Det.score_mode": self.cfg.ocr_score_mode,
                "EngineConfig.onnxruntime.intra_op_num_threads": self.cfg.threads or -1,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1 if self.cfg.threads else -1,
                "EngineConfig.onnxruntime.enable_cpu_mem_arena": self.cfg.ocr_mem_arena,
            }
        )
        # rapidocr loads its models on first use: load them now, so a worker pays (and a
        # broken install fails) in setup, not on its first image
        loaders = ["_load_det_model", "_load_rec_model"]
        if self.cfg.ocr_use_cls:
            loaders.append("_load_cls_model")
        for loader in loaders:
            getattr(self._engine, loader, lambda: None)()
        det = getattr(self._engine, "text_det", None)
        if det is not None and callable(getattr(det, "get_preprocess", None)):
            # rapidocr builds a new preprocessor per image; one table-driven instance serves
            det.get_preprocess = (lambda pre: lambda: pre)(LutDetPreProcess.like(det))

    def resized(self, img: Image.Image) -> Image.Image:
        """The copy the OCR sees: long side `ocr_side`, upscaled by at most `ocr_max_upscale`."""
        w, h = img.size
        scale = min(self.cfg.ocr_side / max(w, h), self.cfg.ocr_max_upscale)
        if abs(scale - 1.0) > 0.02:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR if scale > 1 else Image.Resampling.BOX)
        return img

    def read_bgr(self, bgr: np.ndarray) -> tuple[list[OcrBox], int]:
        """Detection, then recognition of the `ocr_max_boxes` largest boxes, on a BGR array."""
        self.setup()
        eng = self._engine
        det = eng(bgr, use_det=True, use_cls=False, use_rec=False)
        det_boxes = getattr(det, "boxes", None)
        if det_boxes is None or len(det_boxes) == 0:
            return [], 0
        det_boxes = np.asarray(det_boxes, dtype=np.float32)
        limit = self.cfg.ocr_max_line_frac * min(bgr.shape[:2])
        lines = [i for i in range(len(det_boxes)) if _thickness(det_boxes[i]) <= limit]
        if not lines:
            return [], len(det_boxes)
        order = sorted(lines, key=lambda i: -_poly_area(det_boxes[i]))
        keep = order[: self.cfg.ocr_max_boxes]
        chosen = det_boxes[keep]
        crops = eng.crop_text_regions(bgr, chosen)
        if self.cfg.ocr_use_cls:
            crops, _ = eng.cls_and_rotate(crops)
        rec = eng.recognize_txt(crops)
        out: list[OcrBox] = []
        for box, text, score in zip(chosen, rec.txts or (), rec.scores or (), strict=False):
            if float(score) >= self.cfg.ocr_text_score and str(text).strip():
                out.append(OcrBox(box, str(text), float(score)))
        return out, len(det_boxes)

    def achromatic_copy(
        self, rgb: np.ndarray, src_size: tuple[int, int]
    ) -> tuple[np.ndarray, int, int]:
        """`achromatic_map` of the OCR copy `rgb` at `ocr_achromatic_side`, width, height.

        The cap saves time on large images; a small one (`src_size`, its own size) keeps
        its upscaled copy: its text is small in pixels, and shrinking the upscale loses it."""
        h, w = rgb.shape[:2]
        side = self.cfg.ocr_achromatic_side
        amap = achromatic_map(rgb)
        if max(src_size) > side and max(w, h) > side:
            f = side / max(w, h)
            w, h = max(1, round(w * f)), max(1, round(h * f))
            amap = cv2.resize(amap, (w, h), interpolation=cv2.INTER_AREA)
        return amap, w, h

    def tophat_copy(self, amap: np.ndarray, w: int, h: int) -> tuple[np.ndarray, int, int]:
        """The achromatic map `amap` (`w` x `h`) brought down to `ocr_tophat_side`, for the
        third pass: a small image's upscaled map too (strokes on black need no upscale)."""
        return _at_most(amap, w, h, self.cfg.ocr_tophat_side)

    def pass_maps(self, img: Image.Image) -> Iterator[tuple[float, np.ndarray, int, int]]:
        """The OCR passes' inputs in order, built lazily: (`ocr_pass`, BGR map, width, height).

        1: the resized image; 2: its achromatic map (a colourful image only); 3: that map's
        top-hat; 4, 5: the `ocr_ratio_passes` (`ratio_map`: dark, then light). A consumer that
        stops early (`scores`, once a pass reaches `ocr_threshold`) builds no further map."""
        cfg = self.cfg
        img_in, img = img, self.resized(img)
        rgb = np.asarray(img)
        yield 1.0, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), img.width, img.height
        if not cfg.ocr_achromatic_pass:
            return
        amap: tuple[np.ndarray, int, int] | None = None
        if chroma(rgb) >= cfg.ocr_achromatic_min_chroma:
            amap = self.achromatic_copy(rgb, img_in.size)
            yield 2.0, *amap
        if cfg.ocr_tophat_pass:
            # on a grey image the map is (about) the luminance: its top-hat is still new
            if amap is None:
                amap = self.achromatic_copy(rgb, img_in.size)
            tmap, tw, th = self.tophat_copy(*amap)
            yield 3.0, tophat_map(tmap, cfg.ocr_tophat_frac), tw, th
        for polarity in cfg.ocr_ratio_passes:
            yield (
                RATIO_PASS[polarity],
                *ratio_map(rgb, polarity, cfg.ocr_tophat_side, cfg.ocr_tophat_frac),
            )

    def scores(self, img: Image.Image) -> dict[str, float]:
        """Cues of the pass that scores highest, over the `pass_maps` in order while the
        best so far scores below `ocr_threshold` (ties keep the earlier pass).

        An image the first pass already flags costs one pass; a clean colour photo costs five."""
        out: dict[str, float] = {}
        for pass_id, bgr, w, h in self.pass_maps(img):
            boxes, n = self.read_bgr(bgr)
            cues = ocr_cues(boxes, w, h, self.cfg, n_detected=n)
            if not out or cues["pwatermark_ocr"] > out["pwatermark_ocr"]:
                out = {**cues, "ocr_pass": pass_id}
            if out["pwatermark_ocr"] >= self.cfg.ocr_threshold:
                break
        return out


def _channel_max_min(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max and min channel of an RGB uint8 array, by OpenCV on the split planes:
    numpy's reductions over a last axis of 3 took 17-28 ms on a 640x480 image, this 0.4."""
    r, g, b = cv2.split(np.ascontiguousarray(rgb))
    return cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b)


def chroma(rgb: np.ndarray) -> float:
    """Mean chroma (max - min channel) of an RGB uint8 array, 0-255."""
    mx, mn = _channel_max_min(rgb)
    return float(cv2.subtract(mx, mn).mean())


def achromatic_map(rgb: np.ndarray) -> np.ndarray:
    """Grey BGR image, bright where a pixel is light and grey: (1 - 2*chroma) * min channel.

    White text at opacity a moves a pixel to (1-a)*bg + a*255: its min channel rises and its
    chroma falls by (1-a), so on a colourful background (foliage, sky, terrain) the text
    stands out here far more than in the luminance, where it can be as bright as the
    background it covers. Stretched to 0-255."""
    mx, mn = _channel_max_min(rgb)
    c = cv2.subtract(mx, mn)
    # 255 - 2*chroma clipped to 0-255, exact in uint8 (both saturate where it is negative)
    light_grey = cv2.subtract(np.full_like(c, 255), cv2.add(c, c)).astype(np.float32)
    g = light_grey * (mn.astype(np.float32) / 255.0)
    lo, hi = float(g.min()), float(g.max())
    g8 = np.rint((g - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    return cv2.cvtColor(g8, cv2.COLOR_GRAY2BGR)


def tophat_map(gray: np.ndarray, frac: float) -> np.ndarray:
    """Grey BGR white top-hat of a grey BGR map (disc `frac` of its short side), stretched.

    Semi-transparent text over relief, foliage or rock is bright strokes on a ground that is
    bright and dark in patches wider than a stroke: among the ground's edges the detector
    boxes nothing. The top-hat (the map minus its opening by the disc) keeps only
    what is narrower than the disc, so strokes stand out on a flat black ground (bench:
    'preview', 'Adobe Stock', 'Getty Images' over hill-shaded terrain, seen by no other
    pass). Stretched between its 0.5th and 99.5th percentiles to 0-255."""
    g = np.ascontiguousarray(gray[:, :, 0])
    th = cv2.morphologyEx(g, cv2.MORPH_TOPHAT, _disc(frac, g.shape)).astype(np.float32)
    return _stretched_bgr(th)


def _at_most(img: np.ndarray, w: int, h: int, side: int) -> tuple[np.ndarray, int, int]:
    """`img` (`w` x `h`) area-downscaled to `side` on its long side if it is longer."""
    if max(w, h) > side:
        f = side / max(w, h)
        w, h = max(1, round(w * f)), max(1, round(h * f))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return img, w, h


def _disc(frac: float, shape: tuple[int, ...]) -> np.ndarray:
    """The morphology disc of the map passes: `frac` of the short side, 5 px at least."""
    k = max(5, round(frac * min(shape[:2])))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))


def _stretched_bgr(m: np.ndarray) -> np.ndarray:
    """A float map stretched between its 0.5th and 99.5th percentiles to 0-255, grey BGR."""
    lo, hi = (float(v) for v in np.percentile(m, [0.5, 99.5]))
    m8 = np.clip((m - lo) * (255.0 / max(hi - lo, 1e-6)), 0.0, 255.0).astype(np.uint8)
    return cv2.cvtColor(m8, cv2.COLOR_GRAY2BGR)


RATIO_PASS: dict[str, float] = {"dark": 4.0, "light": 5.0}  # `ocr_pass` of each polarity
RATIO_EPS = 4.0  # grey levels added before the log: sensor noise near the overlay's grey


def ratio_map(
    rgb: np.ndarray, polarity: str, side: int, frac: float
) -> tuple[np.ndarray, int, int]:
    """Grey BGR black-hat of log(|luminance - overlay grey|) of the RGB copy `rgb`, at `side`
    long side (width, height returned): bright strokes on black, at a contrast that does not
    depend on the ground under them.

    An overlay of grey f (0 for "dark", 255 for "light") at opacity a turns a pixel p into
    (1 - a) * p + a * f: its distance to f shrinks by (1 - a), so in the log of that distance
    the text is a dip of log(1 - a), the same over a bright patch as over a dark one. A
    linear map (the luminance, the top-hat pass's map) gives the same overlay a contrast in
    proportion to the ground's distance to f: dark text on mid-grey or light text on a pale
    ground barely shows. The black-hat (closing minus the map, disc `frac` of the short side)
    keeps the dips narrower than the disc; stretched like `tophat_map`."""
    g = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    g, w, h = _at_most(g, g.shape[1], g.shape[0], side)
    lum = g.astype(np.float32)
    dist = lum if polarity == "dark" else 255.0 - lum
    logd = np.log(dist + RATIO_EPS)
    bh = cv2.morphologyEx(logd, cv2.MORPH_BLACKHAT, _disc(frac, logd.shape))
    return _stretched_bgr(bh), w, h


# ---- LAION classifier --------------------------------------------------------------------


def build_watermark_model(arch: str = "efficientnet_b3") -> torch.nn.Module:
    """timm backbone with LAION's 3-layer 2-class head (random init)."""
    import timm
    import torch

    nn = torch.nn
    model = timm.create_model(arch, pretrained=False, num_classes=2)
    n = int(model.num_features)  # type: ignore[arg-type]
    model.classifier = nn.Sequential(
        nn.Linear(n, 625), nn.ReLU(), nn.Dropout(p=0.3),
        nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2),
    )  # fmt: skip
    return model


MODEL_HINT = (
    "LAION's detector is watermark_model_v1.pt from github.com/LAION-AI/LAION-5B-"
    "WatermarkDetection (models/); fetch it on a machine with network and put it at that path"
)


class WatermarkModel:
    """The classifier, loaded in `setup` from user-supplied weights."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self, cfg: WatermarkConfig) -> None:
        self.cfg = cfg
        self._model: Any = None
        self._device: Any = None

    def setup(self) -> None:
        if self._model is not None:
            return
        from ccurate.filters.clip_models import resolve_device
        from ccurate.weights import load_state_dict, weights_file

        assert self.cfg.model_weights is not None
        path = weights_file(self.cfg.model_weights, "filters.watermark.model_weights", MODEL_HINT)
        model = build_watermark_model(self.cfg.model_arch)
        model.load_state_dict(load_state_dict(path), strict=True)
        self._device = resolve_device(self.cfg.device)
        self._model = model.to(self._device).eval()

    def pwatermark(self, images: list[Image.Image]) -> list[float]:
        """P(watermark) = softmax index 0, on 256x256 ImageNet-normalised input."""
        import torch

        self.setup()
        mean = np.array(self.MEAN, np.float32)
        std = np.array(self.STD, np.float32)
        out: list[float] = []
        for start in range(0, len(images), self.cfg.batch_size):
            chunk = images[start : start + self.cfg.batch_size]
            arr = np.stack([
                (np.asarray(im.resize((256, 256), Image.Resampling.BILINEAR), np.float32) / 255.0
                 - mean) / std
                for im in chunk
            ])  # fmt: skip
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous().to(self._device)
            with torch.inference_mode():
                p = torch.softmax(self._model(x).float(), dim=1)[:, 0]
            out.extend(float(v) for v in p.cpu())
        return out


# ---- the filter --------------------------------------------------------------------------


class WatermarkFilter(Filter):
    """Drops `watermark` when the OCR cues or the classifier say so; records both scores."""

    name: ClassVar[str] = "watermark"

    def __init__(self, cfg: WatermarkConfig | None = None) -> None:
        self.cfg = cfg or WatermarkConfig()
        self._ocr: OcrReader | None = None
        self._model: WatermarkModel | None = None
        self.model_off_reason: str | None = None
        if self.cfg.enabled and self.cfg.model_weights is None:
            from ccurate.filters.clip_models import log_off_once

            self.model_off_reason = (
                "no weights configured (filters.watermark.model_weights). To enable, set it to "
                "LAION's watermark_model_v1.pt (e.g. models/watermark_model_v1.pt); the OCR "
                "detector stays on"
            )
            log_off_once("watermark_model", f"watermark classifier is OFF: {self.model_off_reason}")
        elif self.cfg.enabled and not str(self.cfg.model_weights).startswith("hf-hub:"):
            from ccurate.weights import weights_file

            weights_file(str(self.cfg.model_weights), "filters.watermark.model_weights", MODEL_HINT)

    @property
    def resources(self) -> Resources:
        gpu = self.cfg.model_weights is not None and self.cfg.device.startswith("cuda")
        return Resources(cpus=float(max(1, self.cfg.threads)), gpus=1.0 if gpu else 0.0,
                         memory_gb=1.5)  # fmt: skip

    def setup(self) -> None:
        if not self.cfg.enabled:
            return
        if self.cfg.ocr and self._ocr is None:
            self._ocr = OcrReader(self.cfg)
            self._ocr.setup()
        if self.cfg.model_weights is not None and self._model is None:
            self._model = WatermarkModel(self.cfg)
            self._model.setup()

    def teardown(self) -> None:
        self._ocr = None
        self._model = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_ocr": None, "_model": None}

    def decide(self, sample: Sample) -> Decision:
        return self.decide_batch([sample])[0]

    def decide_batch(self, samples: list[Sample]) -> list[Decision]:
        if not self.cfg.enabled:
            return [self.keep() for _ in samples]
        self.setup()
        images: list[Image.Image | None] = []
        for s in samples:
            try:
                images.append(decode_rgb(s.image))
            except DecodeError:
                images.append(None)
        ok = [i for i, im in enumerate(images) if im is not None]
        scores: list[dict[str, float]] = [{} for _ in samples]
        if self._ocr is not None:
            for i in ok:
                im = images[i]
                assert im is not None
                scores[i].update(self._ocr.scores(im))
        if self._model is not None and ok:
            probs = self._model.pwatermark([images[i] for i in ok])  # type: ignore[misc]
            for i, p in zip(ok, probs, strict=True):
                scores[i]["pwatermark"] = p
        out: list[Decision] = []
        for i, sc in enumerate(scores):
            if images[i] is None:
                out.append(self.reject("decode_error"))
            elif (
                sc.get("pwatermark_ocr", 0.0) >= self.cfg.ocr_threshold
                or sc.get("pwatermark", 0.0) >= self.cfg.model_threshold
            ):
                out.append(self.reject("watermark", **sc))
            else:
                out.append(self.keep(**sc))
        return out

    def describe(self) -> dict[str, Any]:
        d = self.cfg.model_dump()
        for k in ("brands", "strong_words", "weak_words"):
            d[k] = len(d[k])
        d["model_off_reason"] = self.model_off_reason
        return d
