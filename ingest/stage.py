"""IngestStage: planned records in, downloaded + normalised image samples (or drops) out.

Input records come from `ingest.sources`:
- image records (`mime` is not HTML): fetch the URL, check opt-outs, decode,
  validate, resize, hash. An image with a `page_url` is also held to the page
  origin's robots.txt / tdmrep.json for the page's path (cached per origin),
  as the opt-out re-check holds it when it fetches the page: an opt-out on the
  page must not be published until a re-check runs. A record that already
  carries `image` bytes (e.g. from a WARC capture) skips the fetch and is only
  decoded and resized.
- page records (`mime == "text/html"`): fetch the page, honour its header and
  meta opt-outs, extract its images with `ingest.html.extract_images`, then
  fetch those images in the same batch. A page that fails, opts out or holds
  no image is returned dropped with its reason; a good page is replaced by its
  images (which inherit the page record's input evidence and extra columns).

Every input ends in exactly one status: its sample (or its page's samples)
kept, or dropped with one of `REASONS`. Fetches run on a per-worker thread pool
(`threads`), hosts interleaved so per-host limits do not idle the pool; each
body is then decoded on a small pool (`decode_threads`, default the worker's
share of the cores), as many CPU-bound threads as cores rather than all fetch
threads fighting over the GIL. At most one batch of bodies is in memory, each
bounded by `max_bytes`.

`plan_retry(out_dir)` re-plans the transient failures of a finished run
(`timeout`, `connection_error`, `http_408`, `http_429`, `http_5xx`) that
have not succeeded since, without touching what was downloaded, and the drops
of other reasons the user names (`retry_reasons`: e.g. `decode_error` after an
upgrade that fixed how images are decoded).
"""

from __future__ import annotations

import queue
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from PIL import Image

from ccurate.executor import worker_cpus
from ccurate.ingest.config import IngestConfig
from ccurate.ingest.fetch import HttpClient
from ccurate.ingest.guard import Blocked, Target, split_url
from ccurate.ingest.images import (
    ImageDrop,
    ImageOptions,
    PixelBudget,
    configure_pillow,
    process_image,
)
from ccurate.ingest.optout import (
    OriginPolicies,
    header_optout,
    open_client,
)
from ccurate.record import KEEP, LicenseEvidence, Sample, make_key
from ccurate.shardio import read_dropped, read_index, shards_in_completion_order
from ccurate.stage import Resources, Stage

if TYPE_CHECKING:
    from ccurate.takedown_match import Blocklist

STAGE = "ingest"
HTML_MIMES = ("text/html", "application/xhtml+xml")
IMAGE_ACCEPT = "image/avif,image/webp,image/png,image/jpeg,image/*;q=0.8,*/*;q=0.5"
PAGE_ACCEPT = "text/html,application/xhtml+xml;q=0.9,*/*;q=0.5"

REASONS: dict[str, str] = {
    "http_<code>": "the server answered with this non-2xx status (after retries for 408/429/5xx)",
    "timeout": "connect/read/total timeout, after retries",
    "connection_error": "DNS failure, refused or reset connection, TLS or protocol error, a "
    "body cut short of its Content-Length, or the origin's robots.txt/tdmrep.json could not "
    "be processed",
    "too_many_redirects": "more than max_redirects hops, or a redirect loop",
    "too_large": "body (or decompressed body) above max_bytes / max_page_bytes",
    "not_an_image": "the bytes are no raster image (HTML, SVG, text, empty), whatever the "
    "content type said; also an image URL answered with text/html",
    "decode_error": "an image signature but truncated or corrupt data; also an image that "
    "decodes but cannot be converted, hashed or re-encoded (e.g. a side over JPEG's 65500)",
    "decompression_bomb": "width x height above max_pixels (checked before decoding), or a "
    "resize that would produce that many pixels (a thin strip scaled up by its short side)",
    "optout_x_robots_tag": "X-Robots-Tag noai/noimageai for all bots or for our token",
    "optout_meta_robots": "the page's <meta name=robots|ccurate> says noai/noimageai",
    "optout_tdmrep": "TDMRep: tdm-reservation header or meta, or /.well-known/tdmrep.json rule",
    "optout_robots_txt": "robots.txt disallows our token (or answered 429/5xx: disallow all)",
    "ssrf_blocked": "the host resolves to a private/loopback/link-local/multicast/reserved "
    "address (first URL or any redirect hop)",
    "bad_scheme": "not http(s), or no parsable host",
    "page_error": "the page is not HTML, or its HTML could not be parsed",
    "page_no_images": "the page was fetched and allowed but holds no usable image",
    "image_too_small": "smaller side below min_image_size (off by default)",
    "image_too_large": "larger side above max_image_size (off by default)",
    "image_bad_aspect": "aspect ratio above max_aspect_ratio (off by default)",
}
TRANSIENT_REASONS = frozenset({"timeout", "connection_error", "http_408", "http_429"})


def is_transient(reason: str | None) -> bool:
    """Failures worth retrying later: the same request may succeed another time."""
    if not reason:
        return False
    if reason in TRANSIENT_REASONS:
        return True
    return len(reason) == 8 and reason.startswith("http_5") and reason[5:].isdigit()


def retry_reasons(chosen: list[str]) -> frozenset[str]:
    """Ingest drop reasons the user asks to fetch again besides the transient ones
    (`--retry-reason`), checked against `REASONS` (`http_<code>` as e.g. `http_404`).

    Opt-outs are refused: the publisher's refusal is re-checked by rebuilds, never retried
    on request. Raises ValueError naming the reasons that can be chosen."""
    optouts = sorted(r for r in REASONS if r.startswith("optout_"))
    allowed = sorted(r for r in REASONS if r not in optouts and r != "http_<code>")
    out: set[str] = set()
    for reason in chosen:
        is_http = len(reason) == 8 and reason.startswith("http_") and reason[5:].isdigit()
        if reason in optouts:
            raise ValueError(
                f"--retry-reason {reason}: an opt-out is the publisher's refusal and is not "
                "fetched again on request"
            )
        if reason not in allowed and not is_http:
            raise ValueError(
                f"--retry-reason {reason!r}: not an ingest drop reason; expected one of "
                f"{', '.join(allowed)}, or http_<code> (e.g. http_404)"
            )
        out.add(reason)
    return frozenset(out)


def _host(url: str) -> str:
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def _interleave(items: list[tuple[int, Sample]]) -> list[tuple[int, Sample]]:
    """Round-robin over hosts so a batch dominated by one host does not queue on its limit."""
    by_host: OrderedDict[str, list[tuple[int, Sample]]] = OrderedDict()
    for item in items:
        by_host.setdefault(_host(item[1].url), []).append(item)
    if len(by_host) <= 1:
        return items
    queues = [list(reversed(v)) for v in by_host.values()]
    out: list[tuple[int, Sample]] = []
    while queues:
        nxt = []
        for q in queues:
            out.append(q.pop())
            if q:
                nxt.append(q)
        queues = nxt
    return out


HashFn = Callable[[Image.Image], tuple[str, str, str]]


def _load_hasher() -> HashFn:
    """`ccurate.filters.hashing.image_hashes`, imported lazily (the driver never hashes)."""
    from ccurate.filters.hashing import image_hashes

    fn: HashFn = image_hashes
    return fn


class IngestStage(Stage):
    """Fetch + decode + resize planned records (see module doc); a source stage."""

    name: ClassVar[str] = STAGE
    preserves_keys: ClassVar[bool] = False

    def __init__(self, config: IngestConfig | None = None, skip: Blocklist | None = None) -> None:
        self.config = config or IngestConfig()
        # URLs, pages, domains and keys never to fetch (rebuilds: takedowns and removals): an
        # image found on a page that matches is dropped with the match's reason before its GET
        self.skip = skip if skip is not None and len(skip) else None
        self.batch_size = self.config.batch_size
        self._client: HttpClient | None = None
        self._policies: OriginPolicies | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._decoders: ThreadPoolExecutor | None = None  # None: fetch threads decode
        self._budget: PixelBudget | None = None
        self._hasher: HashFn | None = None
        self._image_opt = ImageOptions.from_config(self.config)

    # -- lifecycle ----------------------------------------------------------
    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, memory_gb=2.0)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for k in ("_client", "_policies", "_pool", "_decoders", "_budget", "_hasher"):
            state[k] = None
        return state

    def setup(self) -> None:
        if self._client is not None:
            return
        c = self.config
        configure_pillow(c.max_pixels)
        self._client, self._policies = open_client(c, c.threads)
        self._pool = ThreadPoolExecutor(c.threads, thread_name_prefix="ingest")
        decoders = min(c.threads, c.decode_threads or worker_cpus())
        if decoders < c.threads:
            self._decoders = ThreadPoolExecutor(decoders, thread_name_prefix="decode")
        self._budget = PixelBudget(c.decode_pixel_budget, decoders)
        self._hasher = _load_hasher()

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._decoders is not None:
            self._decoders.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
        self._client = self._policies = self._pool = self._decoders = self._budget = None

    def describe(self) -> dict[str, Any]:
        d = self.config.model_dump()
        d["hashes"] = self._hasher is not None if self._client is not None else None
        return d

    # -- batch ----------------------------------------------------------------
    def process(self, batch: list[Sample]) -> list[Sample]:
        if self._pool is None:
            self.setup()
        pool = self._pool
        assert pool is not None
        results: list[list[Sample]] = [[] for _ in batch]
        page_images: dict[int, list[Sample]] = {}
        # completions arrive on a queue: O(1) per finished job (futures.wait is O(pending))
        done: queue.SimpleQueue[tuple[str, int, int, Future[Any]]] = queue.SimpleQueue()
        outstanding = 0

        def submit(fn: Callable[[Sample], Any], s: Sample, kind: str, i: int, j: int) -> None:
            nonlocal outstanding
            outstanding += 1
            fut = pool.submit(fn, s)
            fut.add_done_callback(lambda f: done.put((kind, i, j, f)))

        images: list[tuple[int, Sample]] = []
        for i, s in enumerate(batch):
            if (s.mime or "").split(";")[0].strip().lower() in HTML_MIMES:
                submit(self._page, s, "page", i, 0)
            else:
                images.append((i, s))
        for i, s in _interleave(images):
            submit(self._image, s, "image", i, 0)
        while outstanding:
            kind, i, j, fut = done.get()
            outstanding -= 1
            value = fut.result()
            if kind == "image":
                results[i] = [value]
            elif kind == "page_image":
                page_images[i][j] = value
            elif isinstance(value, Sample):  # page dropped
                results[i] = [value]
            else:
                page_images[i] = list(value)
                for j2, img in _interleave(list(enumerate(value))):
                    submit(self._image, img, "page_image", i, j2)
        for i, imgs in page_images.items():
            results[i] = imgs
        return [s for group in results for s in group]

    # -- one image ----------------------------------------------------------
    def _image(self, s: Sample) -> Sample:
        assert self._client is not None
        c = self.config
        body = s.image
        if not s.kept:  # dropped on its page (`skip`): not fetched
            return s
        if body is None:
            reason = self._page_policy(s)
            if reason is not None:
                s.drop(reason, STAGE)
                return s
            hops, hit = self._hops(s.page_url)
            res = self._client.get(
                s.url,
                accept=IMAGE_ACCEPT,
                max_bytes=c.max_bytes,
                hop_check=hops,
                header_check=self._image_headers,
            )
            if not res.ok:
                assert res.reason is not None
                _drop_failed(s, res.reason, hit)
                return s
            body = res.body
        if self._decoders is None:
            return self._decode(s, body)
        # a few decode threads, not all fetch threads at once: 32 threads decoding on 2 cores
        # cost 10-15 % more CPU per image in GIL and lock contention than 2-3 (measured)
        return self._decoders.submit(self._decode, s, body).result()

    def _decode(self, s: Sample, body: bytes) -> Sample:
        try:
            out = process_image(body, self._image_opt, self._budget)
            hashes = self._hasher(out.image) if self._hasher is not None else None
        except ImageDrop as e:
            s.image = None
            s.drop(e.reason, STAGE)
            return s
        except Exception:
            # an encoder or hasher failure on one image (Pillow raises OSError for a JPEG
            # side over 65500) must drop that image, not abort the batch and lose the others
            s.image = None
            s.drop("decode_error", STAGE)
            return s
        s.image = out.data
        s.mime = out.mime
        s.width, s.height = out.width, out.height
        s.original_width, s.original_height = out.original_width, out.original_height
        s.sha256 = out.sha256
        if hashes is not None:
            s.pixel_sha256, s.phash, s.dhash = hashes
        return s

    def _page_policy(self, s: Sample) -> str | None:
        """The page origin's robots.txt / tdmrep.json verdict for the page's path: the opt-out
        re-check fetches the page (and so applies them), so ingest must too. Cached per
        origin; fetched through the same client (SSRF guard); an unparsable page URL has no
        policy, as the re-check's fetch of it ends in `gone`."""
        if not s.page_url or s.page_url == s.url:
            return None
        try:
            page = Target(s.page_url, *split_url(s.page_url), addresses=())
        except Blocked:
            return None
        return self._hop_check(page)

    def _hop_check(self, target: Target) -> str | None:
        # set with the client in setup: a fetch without policies must fail, never skip them
        assert self._policies is not None
        return self._policies.check(target.origin, target.path)

    def _hops(
        self, page_url: str | None
    ) -> tuple[Callable[[Target], str | None], list[tuple[str, str]]]:
        """The hop check of one GET and the list where it puts a `skip` match
        (`skipping_hops`); without `skip`, the origin's policies alone."""
        if self.skip is None:
            return self._hop_check, []
        return skipping_hops(self.skip, self._hop_check, page_url)

    def _image_headers(self, status: int, headers: dict[str, list[str]]) -> str | None:
        reason = header_optout(headers, self.config)
        if reason is not None:
            return reason
        ctype = (headers.get("content-type") or [""])[-1].split(";")[0].strip().lower()
        if ctype in HTML_MIMES:
            return "not_an_image"  # a soft-404 page: not worth downloading
        return None

    # -- one page -------------------------------------------------------------
    def _page(self, page: Sample) -> Sample | list[Sample]:
        assert self._client is not None
        c = self.config
        hops, hit = self._hops(None)
        res = self._client.get(
            page.url,
            accept=PAGE_ACCEPT,
            max_bytes=c.max_page_bytes,
            hop_check=hops,
            header_check=lambda status, headers: header_optout(headers, self.config),
            gzip_ok=True,
        )
        if not res.ok:
            assert res.reason is not None
            _drop_failed(page, res.reason, hit)
            return page
        head = res.body[:512].lstrip().lower()
        if res.content_type not in HTML_MIMES and not (
            head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<!--"))
        ):
            page.drop("page_error", STAGE)
            return page
        from ccurate.ingest.html import extract_images  # written alongside; imported lazily

        charset = None
        for part in (res.header("content-type") or "").split(";")[1:]:
            k, _, v = part.partition("=")
            if k.strip().lower() == "charset" and v.strip():
                charset = v.strip().strip('"')
        # never raises: a page it cannot parse comes back with `error` set
        extract = extract_images(
            res.body, res.url, user_agent_token=c.robots_token, encoding=charset
        )
        if extract.error:
            page.drop("page_error", STAGE)
            return page
        # every opt-out the page declares, not only the first-ranked one: with meta robots
        # not honoured, a TDM reservation on the same page must still count
        if "optout_meta_robots" in extract.optouts and c.respect_meta_robots:
            page.drop("optout_meta_robots", STAGE)
            return page
        if "optout_tdmrep" in extract.optouts and c.respect_tdmrep:
            page.drop("optout_tdmrep", STAGE)
            return page
        images: list[Sample] = []
        seen: set[str] = set()
        page_evidence = list(extract.page_license_evidence)
        for img in extract.images:
            if img.key in seen or img.key == page.key:
                continue
            seen.add(img.key)
            _inherit(img, page, page_evidence)
            images.append(img)
        if not images:
            page.drop("page_no_images", STAGE)
            return page
        if self.skip is not None:
            _drop_skipped(images, self.skip)
        return images


def _skip_hits(
    skip: Blocklist, rows: list[tuple[str, str, str | None]]
) -> dict[str, tuple[str, str]]:
    """key -> (reason, detail) of the (key, url, page_url) rows `skip` matches by key, URL,
    host or page (`ccurate.takedown_match.match_index`, the gate's own matcher)."""
    import pyarrow as pa

    from ccurate.takedown_match import match_index

    keys, urls, pages = zip(*rows, strict=True) if rows else ((), (), ())
    index = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "url": pa.array(urls, pa.string()),
            "page_url": pa.array(pages, pa.string()),
        }
    )
    hits = match_index(index, skip)
    return {
        k: (reason or "takedown", detail)
        for k, reason, detail in zip(
            hits.column("key").to_pylist(),
            hits.column("reason").to_pylist(),
            hits.column("detail").to_pylist(),
            strict=True,
        )
    }


def skip_match(skip: Blocklist, url: str, page_url: str | None) -> tuple[str, str] | None:
    """(reason, detail) if `skip` matches a redirect hop to `url`: by its URL, its host, the
    page (`page_url`; a page's own hop is its page), or the key it would have."""
    key = make_key(url, page_url)
    got = _skip_hits(skip, [(key, url, page_url or url)]).get(key)
    return None if got is None else (got[0], f"redirect to {url}: {got[1]}")


def skipping_hops(
    skip: Blocklist, hop_check: Callable[[Target], str | None], page_url: str | None
) -> tuple[Callable[[Target], str | None], list[tuple[str, str]]]:
    """A hop check for one GET that refuses a redirect hop `skip` matches (a taken-down URL,
    page or host, a removed key: not requested, nor its origin's robots.txt), putting the
    match in the returned list; then `hop_check` (the origin's policies), as for every hop.
    The first URL was matched before the GET. Ingest and the opt-out re-check both use it,
    so neither requests a taken-down URL behind a redirect."""
    hit: list[tuple[str, str]] = []
    first = True

    def check(target: Target) -> str | None:
        nonlocal first
        if not first:
            got = skip_match(skip, target.url, page_url)
            if got is not None:
                hit.append(got)
                return got[0]
        first = False
        return hop_check(target)

    return check, hit


def _drop_taken_down(s: Sample, reason: str, detail: str) -> None:
    """Dropped by `skip` before its GET: never fetched again, the match recorded."""
    s.extra["removed_because"] = detail
    s.drop(reason, "takedown")


def _drop_failed(s: Sample, reason: str, hit: list[tuple[str, str]]) -> None:
    """A failed GET: dropped as a takedown when a redirect hop matched `skip`, else with the
    fetch's reason."""
    if hit:
        _drop_taken_down(s, *hit[0])
    else:
        s.drop(reason, STAGE)


def _drop_skipped(images: list[Sample], skip: Blocklist) -> None:
    """Drop the images of a page that `skip` matches by key, URL, page or domain."""
    why = _skip_hits(skip, [(s.key, s.url, s.page_url) for s in images])
    for s in images:
        got = why.get(s.key)
        if got is not None:
            _drop_taken_down(s, *got)


def _inherit(img: Sample, page: Sample, page_evidence: list[LicenseEvidence]) -> None:
    """Give an extracted image the page's evidence and the page record's input columns."""
    have = {(e.scope, e.kind, e.value) for e in img.license_evidence}
    for e in [*page_evidence, *page.license_evidence]:
        if (e.scope, e.kind, e.value) not in have:
            img.license_evidence.append(e)
            have.add((e.scope, e.kind, e.value))
    for k, v in page.extra.items():
        img.extra.setdefault(k, v)


def _resolve_page(last: dict[str, Sample | None], url: str, page_url: str | None) -> None:
    """An image extracted from a page means the page itself got through (its key is the page's)."""
    if page_url and url != page_url:
        last[make_key(page_url)] = None


def plan_retry(ingest_out_dir: str | Path, reasons: frozenset[str] = frozenset()) -> list[Sample]:
    """Records of a finished ingest output whose last outcome was a transient drop, or a
    drop for one of `reasons` (`retry_reasons`).

    Walks the finished shards oldest first (by completion marker time), so a
    key that failed, was retried and then succeeded or failed permanently is
    not planned again; successes are never re-planned. A page counts as
    done once any image extracted from it is recorded (pages are keyed by
    `make_key(page_url)`; a page whose redirect changed its URL is not
    recognised and is fetched again). The records come back
    as planned input (kept, no image; page records keep `mime="text/html"`),
    ready to be written with `shardio.write_partition` and ingested again.
    """
    shards = shards_in_completion_order(ingest_out_dir)
    last: dict[str, Sample | None] = {}
    for prefix in shards:
        for row in read_index(prefix, columns=["key", "url", "page_url"]).to_pylist():
            last[row["key"]] = None
            _resolve_page(last, row["url"], row["page_url"])
        for rb in read_dropped(prefix).to_batches(max_chunksize=1024):
            for row in rb.to_pylist():
                s = Sample.from_row(row)
                if s.dropped_by == STAGE and (
                    is_transient(s.drop_reason) or s.drop_reason in reasons
                ):
                    last[s.key] = s
                else:
                    last[s.key] = None
                _resolve_page(last, s.url, s.page_url)
    out: list[Sample] = []
    for rec in last.values():
        if rec is None:
            continue
        s = rec
        s.status = KEEP
        s.drop_reason = s.dropped_by = None
        s.image = None
        if (s.mime or "").split(";")[0] not in HTML_MIMES:
            s.mime = None
        out.append(s)
    return out
