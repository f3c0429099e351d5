"""The trainer's loader: slot streams run in DataLoader workers, batches handed out resumably.

Workers cut and decode batches themselves (`batch_size=None`) into a ring of reused
shared-memory buffers (`BatchRing`). Positions come from the batches the trainer
actually consumed, never from what workers prefetched; on resume the DataLoader's
round-robin over workers is preserved by rotating worker ids by the number of
worker batches consumed (trained, or skipped by the loader's `finish`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ccurate.train.decode import BadBatch, Decoder, batch_buffer, bucket_reader, shared_uint8
from ccurate.train.stream import (
    DataError,
    MemberReader,
    Position,
    RawSample,
    StreamSpec,
    bucket_batches,
    countable,
    fixed_batches,
    shard_counts,
)


def _as_is(batch: Any) -> Any:
    """The workers' batches are final (tensors in their ring buffers): the DataLoader's
    default `default_convert` only walks every caption and key of each batch again."""
    return batch


STAT_KEYS = (
    "bad_samples",
    "empty_captions",
    "skipped_batches",
    "skipped_samples",
    "bucket_padding",
)


class RingRef(NamedTuple):
    """A batch tensor sent by reference: where it lies in a ring buffer the trainer's
    process already maps. Pickling the tensor itself shares its storage again on every
    batch (a socket connection with an HMAC handshake to pass the file descriptor, then a
    lookup of the mapping): ~1 ms of the trainer's CPU and as much of the worker's per batch."""

    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: torch.Tensor) -> RingRef:
        return cls(t.dtype, int(t.storage_offset()), tuple(t.shape), tuple(t.stride()))

    def view_of(self, storage: torch.UntypedStorage) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype).set_(storage, self.offset, self.shape, self.stride)


class BatchRing:
    """A loader worker's `depth` shared-memory batch buffers, reused in turn.

    A fresh shared segment per batch costs the kernel its page faults: 3,072 zeroed
    4-KiB pages per 64 x 256 x 256 batch, ~13 ms, about 0.2 ms per sample, a quarter
    of the worker's time per sample (`bench/shard_read.py`). Reuse is safe because of a
    handshake with `TrainLoader`: it copies each batch out (or the DataLoader's pinning
    thread already did) before the trainer sees it, then counts it in `released`, a
    counter per worker in shared memory; the worker refills a buffer only once the
    batch that last used it is counted. Batch `seq` goes to buffer `seq % depth`.
    With `by_reference`, a buffer's storage is sent once; later batches in it carry
    `RingRef`s that the trainer resolves against its mapping of that buffer.
    """

    CLOSED = 1 << 62  # `released` value that TrainLoader.close() sets: stop waiting

    def __init__(
        self, released: torch.Tensor, worker: int, depth: int, by_reference: bool = False
    ) -> None:
        self.released = released
        self.worker = worker
        self.depth = max(1, depth)
        self.by_reference = by_reference
        self.seq = 0
        self.issued: int | None = None
        self._slots: list[torch.Tensor | None] = [None] * self.depth
        self._sent = [False] * self.depth  # the trainer maps this buffer's storage
        self._parent = os.getppid()

    def buffer(self, nbytes: int) -> torch.Tensor:
        """The next batch's buffer, flat uint8 (`Decoder.decode` fills every byte it uses)."""
        seq, slot = self.seq, self.seq % self.depth
        self._wait_released(seq - self.depth + 1)
        flat = self._slots[slot]
        if flat is None or flat.numel() < nbytes:  # first use, or a bigger bucket
            flat = self._slots[slot] = shared_uint8(nbytes)
            self._sent[slot] = False
        self.seq, self.issued = seq + 1, seq
        return flat[:nbytes]

    def cancel(self) -> None:
        """The buffer last taken was not sent (its batch was skipped): the next batch takes it."""
        if self.issued is not None:
            self.seq, self.issued = self.issued, None

    def tag(self, batch: dict[str, Any]) -> None:
        """Mark `batch` with its buffer and the entries that live in it, for the trainer to
        copy out and release; no-op when no buffer was taken."""
        if self.issued is None:
            return
        index = self.issued % self.depth
        slot = self._slots[index]
        assert slot is not None
        ptr = slot.untyped_storage().data_ptr()
        views = [
            k
            for k, v in batch.items()
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() == ptr
        ]
        if self.by_reference:
            if self._sent[index]:
                for k in views:
                    batch[k] = RingRef.of(batch[k])
            self._sent[index] = True
        batch["ring"] = [self.worker, self.issued, views]
        self.issued = None

    def _wait_released(self, count: int) -> None:
        while int(self.released[self.worker]) < count:
            if os.getppid() != self._parent:
                raise DataError("the training process is gone")
            time.sleep(0.0005)


class ShardDataset(IterableDataset[dict[str, Any]]):
    """One rank's endless batch stream; batching happens in the workers (`batch_size=None`)."""

    def __init__(
        self,
        spec: StreamSpec,
        decoder: Decoder,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        buckets: Sequence[tuple[int, int]] | None = None,
        vae_factor: int = 1,
        start: dict[int, Position] | None = None,
        rotate: int = 0,
    ) -> None:
        self.spec = spec
        self.decoder = decoder
        self.batch_size = batch_size
        self.rank = rank
        self.world = world
        self.num_workers = num_workers
        self.buckets = list(buckets) if buckets else None
        self.vae_factor = vae_factor
        self.start = dict(start or {})
        self.rotate = rotate
        # counted once here: every worker splits each data epoch by them (`slot_raw`); a
        # stream with URL or `pipe:` shards is not counted (that would download them all)
        self.counts = shard_counts(spec.shards) if countable(spec.shards) else None
        # set by TrainLoader: worker batch buffers are then reused (`BatchRing`)
        self.ring_released: torch.Tensor | None = None
        self.ring_depth = 0
        self.ring_by_reference = False

    @property
    def n_logical(self) -> int:
        return max(1, self.num_workers)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        nw = self.n_logical
        lw = (physical + self.rotate) % nw
        slot, n_slots = self.rank * nw + lw, self.world * nw
        if self.counts is not None:
            shard_counts(self.spec.shards, self.counts)  # a spawned worker: no recount
        start = self.start.get(lw, (0, 0))
        reader = MemberReader()
        ring = None
        if info is not None and self.ring_released is not None:
            ring = BatchRing(self.ring_released, physical, self.ring_depth, self.ring_by_reference)
        alloc = ring.buffer if ring is not None else batch_buffer
        errors: list[str] = []  # broken shards met since the last batch: handed out with it
        groups: Iterator[tuple[list[RawSample], Position, tuple[int, int] | None, int]]
        if self.buckets is None:
            groups = (
                (group, pos, None, 0)
                for group, pos in fixed_batches(
                    self.spec, slot, n_slots, self.batch_size, start, errors
                )
            )
        else:
            of = bucket_reader(self.decoder.mode, self.buckets, self.vae_factor)
            groups = bucket_batches(
                self.spec, slot, n_slots, self.batch_size, lambda r: of(r, reader), start, errors
            )
        skipped: list[str] = []  # keys of the batches skipped since the last batch
        # where the current run of skipped batches began: a wholly bad shard (or several) is
        # skipped whatever its size; only a whole data epoch of the slot without one usable
        # batch (the same position one epoch later) is fatal, as no later epoch can do better
        run_start: Position | None = None
        try:
            for group, pos, hw, padded in groups:
                try:
                    batch = self.decoder.decode(group, pos[0], reader, hw, alloc)
                except BadBatch as exc:  # not one usable sample: skipped, counted
                    skipped.extend(exc.keys)
                    if run_start is None:
                        run_start = pos
                    elif (pos[0], pos[1]) >= (run_start[0] + 1, run_start[1]):
                        raise DataError(
                            f"loader slot {slot}/{n_slots}: a whole data epoch without a "
                            f"usable sample ({len(skipped)} skipped); last: {exc}"
                        ) from exc
                    if ring is not None:
                        ring.cancel()
                    continue
                run_start = None
                batch["pos"] = [lw, pos[0], pos[1]]
                batch["bad_shards"], errors[:] = list(errors), []
                batch["skipped"], skipped = skipped, []
                batch["padded"] = padded
                if ring is not None:
                    ring.tag(batch)
                yield batch
        finally:
            reader.close()


class TrainLoader:
    """A rank's loader: endless, with a fixed epoch length and a resumable position.

    `state()` is what a checkpoint stores; `TrainLoader(..., state=...)` resumes
    from it. Positions are taken from the batches actually handed out, never from
    what the workers prefetched. Its workers fill a ring of reused shared-memory
    buffers (`BatchRing`); each batch is copied out of its buffer (by the pinning
    thread with `pin_memory`, else here) before it is handed out, so a batch the
    consumer keeps never changes; or, with `copy_out=False`, handed out in place and
    released at the next `next()`.
    """

    def __init__(
        self,
        dataset: ShardDataset,
        epoch_batches: int,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
        state: dict[str, Any] | None = None,
        reuse_buffers: bool = True,
        copy_out: bool = True,
        finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """`reuse_buffers=False`: workers put every batch in a new shared-memory segment,
        the design before `BatchRing` (for comparisons). `copy_out=False`: a batch is
        handed out in its ring buffer, valid until the next `next()` (its buffer is
        released then), saving the copy (12.6 MB per 64 images at 256 px) in this
        process: for a consumer done with each batch when it asks for the next, as the
        trainer is (it moves batches to the GPU, or steps on CPU, before asking again).
        `finish(batch)` completes each batch in this process before it is handed out (the
        device JPEG decode, `ccurate.train.device_decode`); a `BadBatch` it raises skips
        the batch, counted with the next one."""
        self.epoch_batches = max(1, epoch_batches)
        self.reuse_buffers = reuse_buffers
        self.copy_out = copy_out
        self._held: tuple[int, int] | None = None  # (worker, seq) handed out uncopied
        self.batches = 0
        # worker batches consumed: the trained ones and those `finish` skipped (each took its
        # worker's round-robin turn); what the resumed DataLoader's worker order follows
        self.turns = 0
        self.positions: dict[int, Position] = {}
        if state:
            self.batches = int(state["batches"])
            self.turns = int(state.get("turns", self.batches))
            self.positions = {int(k): (int(v[0]), int(v[1])) for k, v in state["workers"].items()}
        dataset.start = dict(self.positions)
        dataset.rotate = self.turns % dataset.n_logical
        self.dataset = dataset
        nw = dataset.num_workers
        # a worker is at most prefetch_factor batches ahead of what was handed out here;
        # two more buffers and it never waits for a release
        dataset.ring_depth = prefetch_factor + 2
        # the pinning thread copies each batch out of its buffer and drops the mapping:
        # references would then find nothing to resolve against
        dataset.ring_by_reference = not pin_memory
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=nw,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if nw > 0 else None,
            persistent_workers=False,
            collate_fn=_as_is,
        )
        self._it: Iterator[dict[str, Any]] | None = None
        # the received ring buffers, kept mapped: torch then maps each buffer once instead of
        # on every batch (and its page faults with it)
        self._mapped: dict[tuple[int, int], torch.UntypedStorage] = {}
        self.by_reference = 0  # batches whose arrays came as `RingRef`s
        # what the batches consumed (`mark`) since this loader started, for the trainer's logs:
        # bad_samples: rows whose image did not decode, trained as a stand-in (a good sample
        #   of the batch, pixels and caption); empty_captions: rows trained on the empty
        #   caption because the sample has none; skipped_batches/skipped_samples: batches
        #   with no usable sample, not trained; bucket_padding: rows repeating a sample to
        #   fill an aspect bucket's last batch of a data epoch (`bucket_batches`)
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.finish = finish
        # what batches that `finish` skipped carried, handed out with the next batch
        self._skipped: list[str] = []
        self._bad_shards: list[str] = []
        self._skipped_pos: list[list[int]] = []

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        """The next batch; it counts as consumed only once passed to `mark`."""
        if self.finish is None:
            return self._receive()
        # as the workers' rule: only a whole data epoch without a usable batch is fatal
        for _ in range(self.epoch_batches + 1):
            batch = self._receive()
            try:
                batch = self.finish(batch)
            except BadBatch as exc:  # not one usable sample: skipped, reported with the next
                self._skipped.extend([*batch.get("skipped", ()), *exc.keys])
                self._bad_shards.extend(batch.get("bad_shards", ()))
                # consumed with the next batch handed out (`mark`): a checkpoint before that
                # resumes before this batch, and skips it again in the same turn
                self._skipped_pos.append(batch["pos"])
                continue
            if self._skipped_pos:
                batch["skipped"] = [*self._skipped, *batch.get("skipped", ())]
                batch["bad_shards"] = [*self._bad_shards, *batch.get("bad_shards", ())]
                batch["skipped_pos"] = self._skipped_pos
                self._skipped, self._bad_shards, self._skipped_pos = [], [], []
            return batch
        raise DataError(
            f"{self.epoch_batches + 1} batches in a row without a usable sample, a whole data "
            f"epoch ({len(self._skipped)} samples skipped)"
        )

    def _receive(self) -> dict[str, Any]:
        if self._it is None:
            if self.reuse_buffers and self.dataset.num_workers > 0:
                counters = torch.zeros(self.dataset.num_workers, dtype=torch.int64)
                self.dataset.ring_released = counters.share_memory_()
            self._it = iter(self.loader)
        released = self.dataset.ring_released
        if self._held is not None:  # the consumer is done with the batch handed out last
            assert released is not None
            released[self._held[0]] = self._held[1] + 1
            self._held = None
        batch = next(self._it)
        ring = batch.pop("ring", None)
        if ring is not None:
            worker, seq, views = int(ring[0]), int(ring[1]), ring[2]
            held = False
            mapped = (worker, seq % self.dataset.ring_depth)
            for k in views:
                t = batch[k]
                if isinstance(t, RingRef):  # a buffer this process maps already
                    storage = self._mapped.get(mapped)
                    if storage is None:
                        raise DataError(f"loader worker {worker} referred to an unmapped buffer")
                    t = batch[k] = t.view_of(storage)
                    self.by_reference += k == views[0]
                elif t.is_pinned():  # pinning already copied it out of the shared buffer
                    continue
                else:
                    self._mapped[mapped] = t.untyped_storage()
                if self.copy_out:
                    batch[k] = t.clone()  # keeps the strides (channels-last pixels)
                else:
                    held = True
            assert released is not None
            if held:
                self._held = (worker, seq)
            else:
                released[worker] = seq + 1
        return batch

    def mark(self, batch: dict[str, Any]) -> None:
        """Record `batch` as consumed (the trainer calls this when the step uses it)."""
        for slw, sepoch, sn in batch.pop("skipped_pos", ()):  # skipped by `finish` before it
            self.positions[int(slw)] = (int(sepoch), int(sn))
            self.turns += 1
        lw, epoch, n = batch.pop("pos")
        self.positions[int(lw)] = (int(epoch), int(n))
        self.batches += 1
        self.turns += 1
        stats = self.stats
        stats["bad_samples"] += len(batch.get("bad", ()))
        stats["empty_captions"] += int(batch.get("empty", 0))
        skipped = batch.get("skipped", ())
        if skipped:
            stats["skipped_batches"] += -(-len(skipped) // self.dataset.batch_size)
            stats["skipped_samples"] += len(skipped)
        stats["bucket_padding"] += int(batch.get("padded", 0))

    def epoch(self) -> Iterator[dict[str, Any]]:
        """Exactly `epoch_batches` batches: the same count on every rank."""
        for _ in range(self.epoch_batches):
            batch = next(self)
            self.mark(batch)
            yield batch

    @property
    def epoch_index(self) -> int:
        return self.batches // self.epoch_batches

    def state(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "turns": self.turns,
            "workers": {str(k): list(v) for k, v in sorted(self.positions.items())},
            "num_workers": self.dataset.num_workers,
            "batch_size": self.dataset.batch_size,
        }

    def close(self) -> None:
        self._held = None
        if self.dataset.ring_released is not None:
            self.dataset.ring_released.fill_(BatchRing.CLOSED)  # no worker waits on a release
            self.dataset.ring_released = None
        self._mapped.clear()
        self._it = None  # the DataLoader iterator shuts its workers down when collected
