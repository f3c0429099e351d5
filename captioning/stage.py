"""CaptionStage: adds a BLIP-2 synthetic caption to every kept sample (alt text is kept).

Each captioned sample gets `caption` (the best caption), `caption_model`
("<model id>@<revision>|<decoding settings>", see `blip2.caption_model_tag`) and,
when `num_captions > 1`, `extra["captions"]`: the list of all captions, best
first (so `captions[0] == caption`). Dropped samples pass through untouched.

Failures, counted in the log at teardown (`counts`):
- an image that cannot be decoded keeps `caption = None` (`failed`): decoding it again
  gives the same result;
- a caption that decodes to empty text is no caption (`empty`): the sample keeps
  `caption = None` and nothing is cached, so a later run (another model or settings, or
  an image captioned again) tries anew. Its shard still finishes: decoding is
  deterministic, so a rerun with the same model and settings would only decode the same
  empty text again, and leaving the shard unfinished would fail every rerun;
- an image that does not fit in GPU memory even alone (`out_of_memory`) fails the shard
  (`CaptionOutOfMemoryError`) once the captions made in the same call are cached: the
  shard gets no completion marker, so a rerun redoes it, reusing those captions.

With no model configured the stage says so once, at construction, and passes every
sample through unchanged.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any, ClassVar

from ccurate.captioning.config import DEFAULT_MODEL, CaptionConfig
from ccurate.record import Sample
from ccurate.stage import Resources, Stage

log = logging.getLogger("ccurate.captioning")


class CaptionOutOfMemoryError(RuntimeError):
    """Images did not fit in memory even one at a time: the shard is left unfinished
    (retried by a rerun) rather than finished with samples silently uncaptioned."""


SKIP_MESSAGE = (
    "captioning skipped: [caption] model is not set, so no BLIP-2 weights are loaded and "
    "samples pass through with caption = None. To caption, set [caption] model = "
    f'"{DEFAULT_MODEL}" (or a local directory) after fetching the weights with '
    f"`hf download {DEFAULT_MODEL}`."
)


class CaptionStage(Stage):
    """BLIP-2 captions for kept samples; batched on one GPU per worker, cached by image hash."""

    name: ClassVar[str] = "caption"
    preserves_keys: ClassVar[bool] = True

    def __init__(self, cfg: CaptionConfig | None = None) -> None:
        self.cfg = cfg or CaptionConfig()
        self._captioner: Any = None
        self._cache: Any = None
        self._attached = False
        self.counts = {
            "captioned": 0,
            "cache_hits": 0,
            "failed": 0,
            "no_image": 0,
            "empty": 0,
            "out_of_memory": 0,
        }
        if self.cfg.model is None:
            log.warning(SKIP_MESSAGE)

    @property
    def skipped(self) -> bool:
        return self.cfg.model is None

    @property
    def resources(self) -> Resources:
        if self.skipped:
            return Resources()
        cpus = float(self.cfg.decode_workers or 4)
        if self.cfg.device == "cpu":
            return Resources(cpus=cpus, memory_gb=8.0)
        import torch

        if self.cfg.device.startswith("cuda") or torch.cuda.is_available():
            return Resources(cpus=cpus, gpus=1.0, memory_gb=16.0)
        return Resources(cpus=cpus, memory_gb=8.0)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_captioner"] = None
        state["_cache"] = None
        state["_attached"] = False
        return state

    def attach(self, captioner: Any) -> None:
        """Use an already loaded `Blip2Captioner` (benchmarks, tests) instead of loading one."""
        self._captioner = captioner
        self._attached = True

    def setup(self) -> None:
        if self.skipped:
            return
        if self._captioner is None:
            from ccurate.captioning.blip2 import Blip2Captioner

            self._captioner = Blip2Captioner.load(self.cfg)
        # read enough samples per call that decode of the first GPU batch is a small share
        self.batch_size = max(256, 4 * int(self._captioner.batch_size))
        if self.cfg.cache_dir and self._cache is None:
            from ccurate.captioning.cache import CaptionCache

            self._cache = CaptionCache(
                self.cfg.cache_dir, self._captioner.tag, self.cfg.cache_flush_rows
            )
            self._cache.load()

    def teardown(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        if self._captioner is not None:
            log.info("caption: %s", self.counts)
            if not self._attached:
                self._captioner.close()
                self._captioner = None

    def prepare(self, inputs: list[str], scratch_dir: str) -> None:
        """Merge the cache's part files (one per captioned shard) before workers load it."""
        if self.cfg.cache_dir and not self.skipped:
            from ccurate.captioning.cache import clear_stale_temporaries, compact

            clear_stale_temporaries(self.cfg.cache_dir)
            n = compact(self.cfg.cache_dir)
            if n:
                log.info("caption cache: merged %d part files", n)

    def checkpoint(self) -> None:
        """Captions of a finished shard reach the cache before its marker does."""
        if self._cache is not None:
            self._cache.flush()

    def process(self, batch: list[Sample]) -> list[Sample]:
        if self.skipped:
            return batch
        if self._captioner is None:
            raise RuntimeError("CaptionStage.setup() must run before process()")
        tag = self._captioner.tag
        todo: list[tuple[Sample, str | None]] = []
        for s in batch:
            if not s.kept:
                continue
            if s.image is None:
                self.counts["no_image"] += 1
                continue
            sha = hashlib.sha256(s.image).hexdigest() if self._cache is not None else None
            hit = self._cache.get(sha) if sha is not None else None
            if hit is not None:
                self._apply(s, hit, tag)
                self.counts["cache_hits"] += 1
            else:
                todo.append((s, sha))
        if todo:
            results = self._captioner.caption([s.image for s, _ in todo])
            lost = set(getattr(self._captioner, "oom_lost", ()))  # attached stand-ins lack it
            for i, ((s, sha), caps) in enumerate(zip(todo, results, strict=True)):
                if i in lost:
                    self.counts["out_of_memory"] += 1
                    continue
                if caps is None:
                    self.counts["failed"] += 1
                    continue
                caps = [c for c in caps if c]
                if not caps:  # empty text is no caption: not applied, not cached
                    self.counts["empty"] += 1
                    continue
                self._apply(s, caps, tag)
                self.counts["captioned"] += 1
                if sha is not None:
                    self._cache.put(sha, caps)
            if lost:
                self._out_of_memory(len(lost))
        return batch

    def _out_of_memory(self, n: int) -> None:
        """Fail the shard: its marker would vouch for samples a rerun should caption."""
        if self._cache is not None:
            self._cache.flush()
        made = (
            "the captions made so far are cached, so the rerun captions only the rest"
            if self._cache is not None
            else "with no [caption] cache_dir, the rerun captions the whole shard again"
        )
        raise CaptionOutOfMemoryError(
            f"caption: {n} image(s) did not fit in GPU memory even one at a time (another "
            f"process holding the GPU? a fragmented allocator?). The shard is left "
            f"unfinished: rerun the step when memory is free; {made} (counts: {self.counts})"
        )

    def _apply(self, sample: Sample, captions: list[str], tag: str) -> None:
        sample.caption = captions[0]
        sample.caption_model = tag
        if self.cfg.num_captions > 1:
            sample.extra["captions"] = list(captions)

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        if self.skipped:
            return {"skipped": True, "reason": "no [caption] model configured"}
        from ccurate.captioning.blip2 import decoding_tag

        return {
            "model": c.model,
            "caption_model": self._captioner.tag if self._captioner is not None else None,
            "decoding": decoding_tag(c),
            "num_beams": c.num_beams,
            "do_sample": c.do_sample,
            "max_new_tokens": c.max_new_tokens,
            "min_new_tokens": c.min_new_tokens,
            "repetition_penalty": c.repetition_penalty,
            "num_captions": c.num_captions,
            "prompt": c.prompt,
            "cache_dir": c.cache_dir,
        }
