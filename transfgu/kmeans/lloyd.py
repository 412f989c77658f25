"""The Lloyd driver of every sharded k-means: faiss's ``Clustering::train`` over points held in files.

The driver (:func:`lloyd_kmeans`) needs three calls from a *shard set* (:class:`ShardSet`): ``counts()`` (points per
file, in file order), ``rows(file, local_rows)`` (gather initial centroids or a subsample) and ``stats(centroids,
normalize)`` (per file, the :data:`~transfgu.kmeans.rules.Stats` of one assignment step). :class:`ArrayShards`
answers them for arrays in memory; Leopart's :class:`~transfgu.leopart.shards.DenseShards` for dense files; the
Ray executors with actors that each hold a group of files (:class:`transfgu.distributed.executor.RayHolders`).
Per-file statistics are reduced in file order, so every executor computes the same centroids bit for bit.

Each step follows faiss (:mod:`transfgu.kmeans.rules`): the training set (all points, or faiss's subsample of at
most ``k * max_points_per_centroid`` of them), ``nredo`` restarts from faiss's sample initialisations, ``niter``
iterations of assign -> means -> empty-cluster split (-> centroid normalisation when ``spherical``), the restart with
the best final-iteration objective kept. Sums are float64 where faiss's are float32: centroids agree to about 1e-6
relative. ``normalize`` L2-normalises the points themselves (before subsampling's training set is formed), which
faiss does not do; ``means_step`` adds what TransFGU's reference does after faiss: one more assignment of every
point and the plain means of the members.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from transfgu.kmeans.rules import (
    KMeansResult,
    Stats,
    check_options,
    init_rows,
    l2_normalize,
    shard_stats,
    split_empty_clusters,
    subsample_rows,
)

log = logging.getLogger(__name__)


class ShardSet(Protocol):
    """Points held per file, in file order."""

    def counts(self) -> list[int]: ...

    def rows(self, file: int, local_rows: Sequence[int]) -> np.ndarray: ...

    def stats(self, centroids: np.ndarray, normalize: bool) -> list[Stats]: ...


class ArrayShards:
    """The shard set of arrays in memory (one per 'file')."""

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = [np.asarray(p, dtype=np.float32) for p in parts]

    def counts(self) -> list[int]:
        return [int(p.shape[0]) for p in self.parts]

    def rows(self, file: int, local_rows: Sequence[int]) -> np.ndarray:
        return self.parts[file][np.asarray(local_rows, dtype=np.int64)]

    def stats(self, centroids: np.ndarray, normalize: bool) -> list[Stats]:
        return [shard_stats(p, centroids, normalize) for p in self.parts]


def reduce_stats(parts: Sequence[Stats]) -> Stats:
    """Sum per-file statistics in the given (file) order."""
    sums = counts = None
    inertia = sqnorm = 0.0
    for s, c, i, q in parts:
        sums = s.copy() if sums is None else sums + s
        counts = c.copy() if counts is None else counts + c
        inertia += float(i)
        sqnorm += float(q)
    if sums is None or counts is None:
        raise ValueError("no shard returned k-means statistics")
    return sums, counts, inertia, sqnorm


def gather(shards: ShardSet, counts: Sequence[int], rows: np.ndarray) -> np.ndarray:
    """The points at global ``rows`` (file order, then row order within a file), in the order of ``rows``."""
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    file_of = np.searchsorted(starts, rows, side="right") - 1
    out: np.ndarray | None = None
    for f in np.unique(file_of):
        sel = np.nonzero(file_of == f)[0]
        got = shards.rows(int(f), (rows[sel] - starts[f]).tolist())
        if out is None:
            out = np.zeros((len(rows), got.shape[1]), dtype=np.float32)
        out[sel] = got
    if out is None:
        raise ValueError("no rows to gather")
    return out


def _means(c: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    new = c.copy()
    nonempty = counts > 0
    new[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
    return new


def lloyd_kmeans(
    shards: ShardSet,
    k: int,
    niter: int,
    seed: int = 0,
    *,
    spherical: bool = False,
    normalize: bool = False,
    nredo: int = 1,
    max_points_per_centroid: int | None = None,
    init_centroids: np.ndarray | None = None,
    means_step: bool = False,
    name: str = "kmeans",
) -> KMeansResult:
    """k-means of every point the shard set holds (see the module docstring).

    Args:
        shards: the points, per file.
        k: clusters (``1 <= k <= n``).
        niter: Lloyd iterations per restart.
        seed: faiss's seed (initialisation ``seed + 1 + redo * 15486557``, subsample ``seed``).
        spherical: L2-normalise the centroids after every update (faiss ``spherical``).
        normalize: cluster the L2-normalised points instead of the points.
        nredo: restarts; the one with the lowest last-iteration objective is kept (faiss ``nredo``).
        max_points_per_centroid: faiss's subsampling (faiss's default: 256); None = every point.
        init_centroids: ``(k, D)`` initial centroids instead of faiss's sample (every restart starts from them).
        means_step: after faiss, centroids = plain means of the members of every point (TransFGU's reference);
            ``inertia`` is then the sum of squared distances to those means.
    Returns:
        :class:`KMeansResult` (``inertia`` without ``means_step``: faiss's last-iteration objective).
    """
    check_options(niter, nredo, max_points_per_centroid, f"{name}: ")
    counts = shards.counts()
    n = int(sum(counts))
    if n < k:
        raise ValueError(f"{name} has {n} points, fewer than its k={k} clusters; lower k or use more images")
    train: ShardSet = shards
    train_norm = normalize
    sub = subsample_rows(n, k, seed, max_points_per_centroid)
    if sub is not None:  # faiss trains on its subsample: held here, it is at most k * max_points_per_centroid rows
        x = gather(shards, counts, sub)
        train, train_norm = ArrayShards([l2_normalize(x) if normalize else x]), False
        log.info("[%s] training on faiss's subsample of %d of %d points", name, len(sub), n)
    train_counts = train.counts()
    n_train = int(sum(train_counts))

    def start(rows: np.ndarray) -> np.ndarray:
        c = gather(train, train_counts, rows)
        return l2_normalize(c) if train_norm else c

    if init_centroids is not None:
        c_init = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if c_init.shape[0] != k or c_init.ndim != 2:
            raise ValueError(f"{name}: init_centroids must have k={k} rows, got shape {c_init.shape}")
    iters = niter
    if n_train == k and init_centroids is None:  # faiss copies the training set and does not iterate
        c_init, iters, nredo = start(np.arange(k, dtype=np.int64)), 0, 1
    best: KMeansResult | None = None
    t0 = time.time()
    for redo in range(nredo):
        c = c_init if (init_centroids is not None or iters == 0) else start(init_rows(n_train, k, seed, redo))
        if spherical:
            c = l2_normalize(c)
        obj: list[float] = []
        for it in range(iters):
            sums, cnt, inertia, _ = reduce_stats(train.stats(c, train_norm))
            obj.append(inertia)
            c = _means(c, sums, cnt)
            nsplit = split_empty_clusters(c, cnt.astype(np.float32), n_train)
            if nsplit:
                log.info("[%s] iteration %d: %d empty clusters re-seeded", name, it, nsplit)
            if spherical:
                c = l2_normalize(c)
            if it == 0 or (it + 1) % 10 == 0 or it + 1 == iters:
                log.debug("[%s] redo %d iteration %d/%d objective %.6g (%.1fs)", name, redo, it + 1, iters,
                          inertia, time.time() - t0)
        final = obj[-1] if obj else float("inf")
        log.info("[%s] k=%d redo %d: objective %.6g after %d iterations on %d points", name, k, redo, final, iters,
                 n_train)
        if best is None or final < best.inertia:  # faiss: strictly better replaces
            best = KMeansResult(centroids=c, inertia=final, n_points=n, objective=obj, redo=redo)
    assert best is not None
    if means_step:
        sums, cnt, _, sq = reduce_stats(shards.stats(best.centroids, normalize))
        means = best.centroids.astype(np.float64)
        nonempty = cnt > 0
        means[nonempty] = sums[nonempty] / cnt[nonempty, None]
        # sum ||x - mean||^2 over members = sum ||x||^2 - sum_c ||S_c||^2 / n_c (empty clusters add nothing)
        inertia = sq - float((np.einsum("ij,ij->i", sums[nonempty], sums[nonempty]) / cnt[nonempty]).sum())
        best.centroids, best.inertia = means.astype(np.float32), max(inertia, 0.0)
        best.objective = [*best.objective, best.inertia]
    return best
