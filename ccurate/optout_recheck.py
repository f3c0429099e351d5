"""Re-check of released samples' opt-out signals, exactly as ingest checks them.

A licence granted at crawl time can be withdrawn later by an opt-out (X-Robots-Tag,
robots.txt, TDMRep, the page's meta robots); a rebuild runs this stage over
released samples checked too long ago, and the gate removes those that now opt out.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from ccurate.record import Sample
from ccurate.stage import Resources, Stage

if TYPE_CHECKING:
    from ccurate.ingest.config import IngestConfig
    from ccurate.takedown_match import Blocklist

_STOP = "_headers_seen"  # header_check verdict that ends a re-check GET before the body
_TAKEDOWN = "takedown"  # a redirect hop `skip` matches: not requested, the sample withdrawn


class OptoutRecheckStage(Stage):
    """Re-checks the opt-out signals of released samples: a GET of the image stopped after
    its headers, the origin's robots.txt / tdmrep.json, and the page (headers and meta).

    Uses the ingest fetcher (`HttpClient`: SSRF guard, per-host limits, retries,
    politeness) and opt-out checkers (`ccurate.ingest.optout`) with the same
    `IngestConfig`, so a re-check honours exactly what ingest honours (the page
    origin's robots.txt / tdmrep.json for the page's path included: ingest checks
    them for an image with a `page_url`, the re-check as it fetches the page). Each
    sample gets `extra["optout_recheck"]`: `ok`, the opt-out reason (the sample
    is dropped with it), `gone:<reason>` (404 and friends: a CC licence is not
    withdrawn by a dead link, the sample stays) or `transient:<reason>` (stays,
    checked again next time). A robots.txt answering 429/5xx means "come back
    later" here, not an opt-out. A redirect hop that `skip` (the rebuild's `never_fetch`
    list) matches is not requested: `takedown`, and the sample is withdrawn (its bytes came
    through that redirect), as a refetch would withdraw it.
    """

    name: ClassVar[str] = "optout_recheck"
    preserves_keys: ClassVar[bool] = True
    batch_size: int = 256

    def __init__(
        self, config: IngestConfig | None = None, threads: int = 16, skip: Blocklist | None = None
    ) -> None:
        from ccurate.ingest.config import IngestConfig

        self.config = config or IngestConfig()
        self.threads = threads
        self.skip = skip if skip is not None and len(skip) else None
        self._client: Any = None
        self._policies: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pages: dict[str, Future[str]] = {}
        self._lock = threading.Lock()
        self._policy_status: dict[str, int | None] = {}

    @property
    def resources(self) -> Resources:
        return Resources(cpus=1.0, memory_gb=1.0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("_client", "_policies", "_pool", "_lock"):
            state[k] = None
        state["_pages"] = {}
        state["_policy_status"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def setup(self) -> None:
        if self._client is not None:
            return
        from ccurate.ingest.optout import open_client

        self._client, self._policies = open_client(self.config, self.threads, self._saw_policy)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="recheck")

    def teardown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
        self._client = self._policies = self._pool = None
        self._pages = {}

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self._pool is None:
            self.setup()
        assert self._pool is not None
        futures = {self._pool.submit(self.check, s.url, s.page_url): s for s in batch if s.kept}
        for fut, s in futures.items():
            outcome = fut.result()
            s.extra["optout_recheck"] = outcome
            if outcome.startswith("optout_") or outcome == _TAKEDOWN:
                s.drop(outcome, "takedown")
        for s in batch:
            s.extra.setdefault("optout_recheck", None)
        return batch

    # -- checks ------------------------------------------------------------------
    def check(self, url: str, page_url: str | None) -> str:
        """`ok`, an opt-out reason, `gone:<reason>` or `transient:<reason>` for one sample."""
        outcome = self._check_image(url, page_url)
        if outcome == "ok" and page_url and page_url != url:
            with self._lock:
                fut = self._pages.get(page_url)
                mine = fut is None
                if fut is None:
                    fut = self._pages[page_url] = Future()
            if mine:
                try:
                    fut.set_result(self._check_page(page_url))
                except BaseException as e:
                    fut.set_exception(e)
                    raise
            outcome = fut.result()
        return outcome

    def _classify(self, reason: str | None, url: str) -> str:
        from ccurate.ingest.stage import is_transient

        if reason is None or reason == _STOP:
            return "ok"
        if reason == "optout_robots_txt":
            origin = _origin(url)
            status = self._policy_status.get(origin)
            if status is not None and (status == 429 or status >= 500):
                return f"transient:robots_http_{status}"
        if reason.startswith("optout_"):
            return reason
        if is_transient(reason):
            return f"transient:{reason}"
        return f"gone:{reason}"

    def _check_image(self, url: str, page_url: str | None) -> str:
        hops, hit = self._hops(page_url)
        res = self._client.get(
            url,
            accept="image/*,*/*;q=0.5",
            max_bytes=self.config.max_bytes,
            hop_check=hops,
            header_check=lambda status, headers: self._header_optout(headers) or _STOP,
        )
        return _TAKEDOWN if hit else self._classify(res.reason, url)

    def _check_page(self, url: str) -> str:
        from ccurate.ingest.html import extract_images

        c = self.config
        hops, hit = self._hops(None)
        res = self._client.get(
            url,
            accept="text/html,application/xhtml+xml;q=0.9,*/*;q=0.5",
            max_bytes=c.max_page_bytes,
            hop_check=hops,
            header_check=lambda status, headers: self._header_optout(headers),
            gzip_ok=True,
        )
        if hit:
            return _TAKEDOWN
        if not res.ok:
            return self._classify(res.reason, url)
        try:
            optouts = extract_images(res.body, res.url, user_agent_token=c.robots_token).optouts
        except Exception:  # an unparsable page says nothing new about opting out
            return "ok"
        # every signal on its own, as ingest reads them: `optout` is only the first-ranked
        # one, so meta robots not honoured would hide a TDM reservation on the same page
        if "optout_meta_robots" in optouts and c.respect_meta_robots:
            return "optout_meta_robots"
        if "optout_tdmrep" in optouts and c.respect_tdmrep:
            return "optout_tdmrep"
        return "ok"

    def _header_optout(self, headers: dict[str, list[str]]) -> str | None:
        from ccurate.ingest.optout import header_optout

        return header_optout(headers, self.config)

    def _hop_check(self, target: Any) -> str | None:
        # only called by self._client.get: setup/teardown set and clear client and policies together
        result: str | None = self._policies.check(target.origin, target.path)
        return result

    def _hops(self, page_url: str | None) -> tuple[Any, list[tuple[str, str]]]:
        """The hop check of one GET and the list where it puts a `skip` match: a redirect
        hop to a taken-down URL is not requested, as in ingest (`skipping_hops`)."""
        if self.skip is None:
            return self._hop_check, []
        from ccurate.ingest.stage import skipping_hops

        return skipping_hops(self.skip, self._hop_check, page_url)

    def _saw_policy(self, url: str, got: Any) -> None:
        if url.endswith("/robots.txt"):
            self._policy_status[_origin(url)] = got.status


def _origin(url: str) -> str:
    p = urlsplit(url)
    return f"{p.scheme.lower()}://{(p.netloc or '').lower()}"
