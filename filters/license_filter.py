"""The licence filter: which licence a sample is under, and whether a release may contain it.

Evidence levels. Ingest records raw evidence with a scope; `image`, `container`,
`metadata` and `input` are *image-level* (tied to this image), `page` is
*page-level* (a page footer or `<link rel=license>`), an unknown scope counts as
page-level. The most specific level that has any evidence decides, even when
none of it is readable: a photo with its own unreadable or "©" credit is not
rescued by the page's CC licence. Everything read at that level is resolved
together (`licenses.resolve`): all licences must be of one family, else
`license_conflict` (a CC name without version, "CC BY-NC", must agree too);
items that name nothing are ignored; a bare "©" notice yields to a CC licence
at the same level (a CC work still carries its author's notice).

Page-level evidence counts by default (`evidence_levels = ["image", "page"]`)
and is recorded as `@page` in `sample.license_rule`, so a release can be cut to
image-level only; set `evidence_levels = ["image"]` to require it up front. On
hosts where the page licence is known to cover the text only (Wikimedia
projects: each file has its own licence on its file page) page-level evidence
never counts (`page_text_only_hosts`) - the Wikipedia case - nor does it on a page
whose URL has no host we can parse (it cannot be checked against that list).

Policy. `commercial` admits CC licences and tools allowing commercial use (CC0,
PDM, PDDC, BY, BY-SA, and SA 1.0); `noncommercial` adds NC and NC-SA. ND needs
`allow_nd` (CommonCanvas left ND out of training). Non-CC public-domain claims
("Public domain", US Government Work) are jurisdiction-dependent and need
`allow_families`; all rights reserved and Flickr's "no known copyright
restrictions" (permissions unknown) are never admitted.

Attribution (licences with BY). A release must credit author, source page and
licence URL. Source page = `sample.source_url`, else `sample.page_url` (the
writer should use the same fallback). With `author_fallback = "site"` (default)
a missing author becomes "Unknown author via <host of the source page>" and the
score `author_fallback = 1` records it; with "none" it stays missing. With
`strict_attribution` (default) a missing source page, licence URL or author
(after the fallback) drops the sample as `attribution_incomplete`. Licences without
BY need no credit: their `attribution_complete` is 1 and `author_fallback` 0.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from ccurate.configbase import Section
from ccurate.filters.licenses import REASONS, LicenseInfo, normalize, read, resolve
from ccurate.record import Decision, LicenseEvidence, Sample
from ccurate.stage import Filter
from ccurate.takedown import canonical_host, url_host

__all__ = [
    "IMAGE_SCOPES",
    "REASONS",
    "LicenseConfig",
    "LicenseFilter",
    "policy_reason",
    "release_split",
]

IMAGE_SCOPES = frozenset({"image", "container", "metadata", "input"})
_SCOPE_RANK = {"image": 0, "metadata": 1, "container": 2, "input": 3, "page": 4}
Level = Literal["image", "page"]
OptInFamily = Literal["PD", "US-GOV"]
# Families admitted only when listed in `allow_families`; never: ARR, NKCR.
_OPT_IN = frozenset({"PD", "US-GOV"})

_WIKIMEDIA = [
    "wikipedia.org",
    "wikimedia.org",
    "wikibooks.org",
    "wikinews.org",
    "wikiquote.org",
    "wikisource.org",
    "wikiversity.org",
    "wikivoyage.org",
    "wiktionary.org",
    "wikidata.org",
    "mediawiki.org",
]


class LicenseConfig(Section):
    """[filters.license]: the release policy and how much evidence it needs."""

    enabled: bool = True
    policy: Literal["commercial", "noncommercial"] = Field(
        default="commercial",
        description="commercial: CC0/PDM/BY/BY-SA; noncommercial adds NC, NC-SA",
    )
    allow_nd: bool = Field(
        default=False, description="admit NoDerivatives licences (default: excluded)"
    )
    allow_families: list[OptInFamily] = Field(
        default_factory=list,
        description="non-CC public-domain claims to admit: PD (e.g. Commons 'Public domain'), "
        "US-GOV (Flickr 8); jurisdiction-dependent, so off by default",
    )
    evidence_levels: list[Level] = Field(
        default_factory=lambda: list[Level](["image", "page"]),
        description="evidence levels that count; page-level admissions are recorded as @page",
    )
    page_text_only_hosts: list[str] = Field(
        default_factory=lambda: list(_WIKIMEDIA),
        description="sites whose page licence covers text only: page-level evidence never counts",
    )
    strict_attribution: bool = Field(
        default=True,
        description="drop BY-family samples lacking author, source page or licence URL",
    )
    author_fallback: Literal["site", "none"] = Field(
        default="site", description='site: a missing author becomes "Unknown author via <host>"'
    )

    @field_validator("page_text_only_hosts")
    @classmethod
    def _canonical_hosts(cls, v: list[str]) -> list[str]:
        """In the form page hosts are compared in ('Wikipedia.org.' matched nothing)."""
        out = []
        for host in v:
            h = canonical_host(host)
            if h is None:
                raise ValueError(f"{host!r} is not a host name (e.g. 'wikipedia.org')")
            out.append(h.removeprefix("www."))  # page hosts are compared without it too
        return list(dict.fromkeys(out))

    @field_validator("evidence_levels")
    @classmethod
    def _image_level_counts(cls, v: list[Level]) -> list[Level]:
        if "image" not in v:
            raise ValueError(
                "evidence_levels must include 'image': the image's own licence always outranks "
                "the page's"
            )
        return list(dict.fromkeys(v))


def policy_reason(info: LicenseInfo, cfg: LicenseConfig) -> str | None:
    """None when the policy admits this licence, else "license_not_allowed"."""
    if info.family in _OPT_IN:
        return None if info.family in cfg.allow_families else "license_not_allowed"
    if not info.open:  # ARR, NKCR
        return "license_not_allowed"
    if cfg.policy == "commercial" and not info.commercial:
        return "license_not_allowed"
    if not info.derivatives and not cfg.allow_nd:
        return "license_not_allowed"
    return None


def release_split(license_id: str) -> str | None:
    """ "commercial" or "noncommercial": the release shard a kept sample goes to (CommonCatalog).

    Decided by the licence's own commercial permission (CC0, PDM, BY, BY-SA, and
    BY-ND if a policy admitted it -> commercial; NC, NC-SA, NC-ND -> noncommercial);
    None for ids that are no open licence (ARR, unknown).
    """
    info = normalize(license_id)
    if info is None or not info.open:
        return None
    return "commercial" if info.commercial else "noncommercial"


def _level(scope: str) -> Level:
    return "image" if scope in IMAGE_SCOPES else "page"


def _evidence_value(ev: LicenseEvidence) -> str:
    """The string to read; a bare Flickr id (kind "flickr") is read as `flickr:N`."""
    value = ev.value or ""
    if ev.kind == "flickr" and value.strip().isdigit():
        return f"flickr:{value.strip()}"
    return value


def _host(url: str | None) -> str | None:
    """The page's host as DNS resolves it (`url_host`: no trailing dot, IDNA form), so
    `en.wikipedia.org.` is a text-only host too; None when unparsable (`%` in it, say)."""
    host = url_host(url)
    return host.removeprefix("www.") if host else None


def _on_hosts(host: str | None, hosts: list[str]) -> bool:
    return host is not None and any(host == h or host.endswith("." + h) for h in hosts)


class LicenseFilter(Filter):
    """Normalises the evidence to one licence, applies the policy, checks attribution."""

    name: ClassVar[str] = "license"

    def __init__(self, cfg: LicenseConfig) -> None:
        self.cfg = cfg

    def describe(self) -> dict[str, Any]:
        return self.cfg.model_dump()

    def decide(self, sample: Sample) -> Decision:
        sample.license = sample.license_url = sample.license_rule = None
        evidence = list(sample.license_evidence)
        page_host = _host(sample.page_url)
        page_ok = (
            "page" in self.cfg.evidence_levels
            # a page URL without a parsable host cannot be cleared of being a text-only host
            and (page_host is not None or not sample.page_url)
            and not _on_hosts(page_host, self.cfg.page_text_only_hosts)
        )
        image_ev = [e for e in evidence if _level(e.scope) == "image"]
        page_ev = [e for e in evidence if _level(e.scope) == "page"]
        if image_ev:
            level: Level = "image"
            group = image_ev
        elif page_ev and page_ok:
            level, group = "page", page_ev
        else:
            return self.reject("license_unknown", n_evidence=len(evidence), n_read=0)

        readings: list[tuple[LicenseEvidence, LicenseInfo]] = []
        hints: set[str] = set()
        for ev in group:
            infos, item_hints = read(_evidence_value(ev))
            readings += [(ev, info) for info in infos]
            hints |= item_hints
        scores: dict[str, float] = {
            "n_evidence": len(evidence),
            "n_read": len({id(ev) for ev, _ in readings}),
            "page_level": float(level == "page"),
        }
        info, problem = resolve((r[1] for r in readings), hints)
        if info is None:
            return self.reject(problem or "license_unknown", **scores)
        sample.license, sample.license_url = info.spdx, info.url
        reason = policy_reason(info, self.cfg)
        if reason is not None:
            return self.reject(reason, **scores)
        # recorded for every admitted sample (a licence without BY needs nothing, so its
        # attribution is complete): a score set on some samples only is null on the rest
        # of a release, which schema-guessing readers choke on
        complete, fallback = self._attribution(sample, info) if info.attribution else (True, False)
        scores["author_fallback"] = float(fallback)
        scores["attribution_complete"] = float(complete)
        if not complete and self.cfg.strict_attribution:
            return self.reject("attribution_incomplete", **scores)
        # the scope of the most specific item that names the chosen licence
        scope = min(
            (ev.scope for ev, x in readings if x.family == info.family),
            key=lambda s: _SCOPE_RANK.get(s, len(_SCOPE_RANK)),
        )
        # any page-level scope is recorded as @page (an unknown scope counts as page-level):
        # a release cut to image-level evidence looks for exactly that
        if _level(scope) == "page":
            scope = "page"
        sample.license_rule = f"{self.cfg.policy}:{info.spdx}@{scope}"
        return self.keep(**scores)

    def _attribution(self, sample: Sample, info: LicenseInfo) -> tuple[bool, bool]:
        """(complete, author filled by the fallback)."""
        source = sample.source_url or sample.page_url
        host = _host(source)
        marker = f"Unknown author via {host}" if host else None
        if not (sample.author or "").strip() and self.cfg.author_fallback == "site" and marker:
            sample.author = marker
        fallback = marker is not None and sample.author == marker  # also on a rerun
        complete = bool((sample.author or "").strip()) and bool(source) and bool(info.url)
        return complete, fallback
