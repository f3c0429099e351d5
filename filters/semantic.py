"""Semantic dedup in the style of SemDeDup (Abbas et al. 2023), written from the paper.

Near-identical images that pHash misses (crops, rotations, overlays, re-shoots)
sit close together in CLIP embedding space. Embeddings are L2-normalised and
clustered with faiss k-means; within each cluster, pairs with cosine
>= 1 - eps are duplicates. Clustering keeps the pairwise work to
sum(cluster size^2) instead of n^2; a pair split across clusters is missed,
which is the method's accepted trade-off.

Like the perceptual-hash step, groups are formed by leader clustering in the
caller's priority order (index order): the first unassigned item keeps and
takes every unassigned item similar to *itself*, so groups do not chain.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from ccurate.pixels import upright_rgb
from ccurate.shardio import iter_samples


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def semantic_groups(
    embeddings: np.ndarray, n_clusters: int, eps: float, seed: int = 0, block: int = 4096
) -> list[list[int]]:
    """Groups (size >= 2) of rows whose cosine to the group's first row is >= 1 - eps.

    Rows are visited in index order, so pass them best-first (keep policy); the
    first index of each group is its keeper. Deterministic for a given input.
    Rows with a NaN/inf value (a model that overflowed on one image) join no group:
    faiss refuses non-finite input, and one bad row must not abort the whole dedup.
    """
    emb = np.asarray(embeddings)
    finite = np.isfinite(emb).all(axis=1) if emb.ndim == 2 else np.zeros(len(emb), bool)
    if not finite.all():
        idx = np.flatnonzero(finite)
        sub = semantic_groups(emb[idx], n_clusters, eps, seed, block) if len(idx) else []
        return [[int(idx[i]) for i in g] for g in sub]
    x = _normalise(emb)
    n = len(x)
    if n < 2:
        return []
    k = int(max(1, min(n_clusters, n // 2 if n >= 4 else 1)))
    if k > 1:
        import faiss

        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False)
        km.train(x)
        _, assign = km.index.search(x, 1)
        labels = assign.ravel()
    else:
        labels = np.zeros(n, np.int64)
    thr = np.float32(1.0 - eps)
    groups: list[list[int]] = []
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        members = np.sort(members)
        xm = x[members]
        taken = np.zeros(len(members), bool)
        for a in range(len(members)):
            if taken[a]:
                continue
            taken[a] = True
            found: list[int] = []
            for b0 in range(a + 1, len(members), block):
                sims = xm[b0 : b0 + block] @ xm[a]
                hit = np.flatnonzero((sims >= thr) & ~taken[b0 : b0 + block]) + b0
                taken[hit] = True
                found.extend(hit.tolist())
            if found:
                groups.append([int(members[a]), *(int(members[h]) for h in found)])
    groups.sort(key=lambda g: g[0])
    return groups


class ClipImageEmbedder:
    """Image embeddings for semantic dedup, from `ccurate.filters.clip_models.load_clip`: the
    same weight sources (checkpoint file, open_clip export folder, `hf-hub:` repo or tag from
    the local cache), errors and per-process model cache as the CLIP-score filter.

    `model_config` is an optional open_clip model-config JSON for architectures not in
    open_clip's registry (tests use a tiny random-init one); it is registered before loading.
    """

    def __init__(
        self,
        model_name: str,
        weights: str | None,
        model_config: str | None = None,
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        self.model_name = model_name
        self.weights = weights
        self.model_config = model_config
        self.device = device
        self.batch_size = batch_size
        self._clip: Any = None

    def load(self) -> None:
        import open_clip

        from ccurate.filters.clip_models import load_clip

        if self.model_config:
            open_clip.add_model_config(self.model_config)
        if self.weights is None:
            raise ValueError("semantic dedup needs CLIP weights (dedup.semantic_weights)")
        self._clip = load_clip(
            self.model_name, self.weights, self.device, key="dedup.semantic_weights"
        )

    def embed(self, images: list[Any]) -> np.ndarray:
        """L2-normalised float32 embeddings of PIL images, a batch at a time."""
        if self._clip is None:
            self.load()
        out = [
            self._clip.encode_images(images[b0 : b0 + self.batch_size])
            for b0 in range(0, len(images), self.batch_size)
        ]
        if not out:
            return np.zeros((0, 0), np.float32)
        return _normalise(np.concatenate(out))


def embed_rows(
    embedder: ClipImageEmbedder, inputs: list[str], shard: np.ndarray, row: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the given (shard, row) samples, read from the shards' tars.

    Returns (embeddings of the decodable ones, in the given order; mask of which
    rows have one). Images are decoded and embedded a batch at a time.
    """
    from PIL import Image

    want: dict[int, dict[int, int]] = {}
    for pos, (s, r) in enumerate(zip(shard.tolist(), row.tolist(), strict=True)):
        want.setdefault(s, {})[r] = pos
    have = np.zeros(len(shard), bool)
    vecs: dict[int, np.ndarray] = {}
    pending: list[tuple[int, Any]] = []

    def flush() -> None:
        if not pending:
            return
        emb = embedder.embed([im for _, im in pending])
        for (pos, _), v in zip(pending, emb, strict=True):
            vecs[pos] = v
            have[pos] = True
        pending.clear()

    for s in sorted(want):
        rows = want[s]
        r = 0
        for batch in iter_samples(inputs[s], batch_size=64):
            for sample in batch:
                at = rows.get(r)
                r += 1
                if at is None or sample.image is None:
                    continue
                try:
                    with Image.open(io.BytesIO(sample.image)) as im:
                        im.load()
                        pending.append((at, upright_rgb(im)))  # as the CLIP filter sees it
                except Exception:  # undecodable: no embedding, stays out of semantic dedup
                    continue
                if len(pending) >= embedder.batch_size:
                    flush()
    flush()
    if not vecs:
        return np.zeros((0, 1), np.float32), have
    emb = np.stack([vecs[p] for p in sorted(vecs)])
    return emb, have
