"""Lloyd k-means over points held in shards, with one driver for both executors.

The driver (:func:`lloyd_kmeans`) only needs three calls from a *shard set*: ``counts()`` (points per file, in file
order), ``rows(file, local_rows)`` (gather initial centroids) and ``stats(centroids, spherical)`` (per file: sums,
counts, inertia of one assignment step, from :func:`transfgu.concepts.lloyd_step_stats`). :class:`DenseShards`
answers them in one process; the Ray executor answers them with actors that each hold a group of files
(``transfgu.distributed.executor.RayHolders``). Per-file statistics are reduced in file order in both cases, so
both executors compute the same centroids bit for bit.

It follows ``faiss.Kmeans.train`` (``nredo`` restarts from ``faiss.rand_perm(n, seed + 1)`` samples, the lowest
final objective kept). ``spherical=True`` (CBFE) L2-normalises the points and re-normalises the centroids after
every update, as faiss's ``spherical`` option does; nearest-L2 on unit vectors is the largest cosine. An empty
cluster is re-seeded from the largest one (both copies perturbed by +-1/1024), deterministically.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import faiss
import numpy as np

from transfgu.concepts import assign, lloyd_step_stats

log = logging.getLogger(__name__)

_EPS = 1.0 / 1024.0

Stats = tuple[np.ndarray, np.ndarray, float]


class ShardSet(Protocol):
    def counts(self) -> list[int]: ...

    def rows(self, file: int, local_rows: Sequence[int]) -> np.ndarray: ...

    def stats(self, centroids: np.ndarray, spherical: bool) -> list[Stats]: ...


@dataclass
class KMeansFit:
    centroids: np.ndarray  # (k, d) float32 (unit rows when spherical)
    objective: list[float] = field(default_factory=list)  # per iteration, sum of squared distances before the update
    n_points: int = 0
    redo: int = 0


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


def init_rows(n: int, k: int, seed: int) -> np.ndarray:
    """faiss's random-sample initialisation: ``rand_perm(n, seed + 1)[:k]``."""
    perm = np.zeros(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed + 1)
    return perm[:k].astype(np.int64)


def reduce_stats(parts: Sequence[Stats]) -> Stats:
    """Sum per-file statistics in the given (file) order."""
    sums = counts = None
    inertia = 0.0
    for s, c, i in parts:
        sums = s.copy() if sums is None else sums + s
        counts = c.copy() if counts is None else counts + c
        inertia += float(i)
    if sums is None or counts is None:
        raise ValueError("no shard returned k-means statistics")
    return sums, counts, inertia


def split_empty(centroids: np.ndarray, counts: np.ndarray) -> int:
    """Re-seed every empty cluster in place from the currently largest one; returns how many."""
    counts = counts.astype(np.float64).copy()
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
    n = 0
    for ci in np.nonzero(counts == 0)[0]:
        cj = int(np.argmax(counts))
        base = centroids[cj].copy()
        centroids[ci] = base * (1 + _EPS * sign)
        centroids[cj] = base * (1 - _EPS * sign)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
        n += 1
    return n


def gather(shards: ShardSet, counts: Sequence[int], rows: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(counts)])
    file_of = np.searchsorted(starts, rows, side="right") - 1
    out: np.ndarray | None = None
    for f in np.unique(file_of):
        sel = np.nonzero(file_of == f)[0]
        got = shards.rows(int(f), (rows[sel] - starts[f]).tolist())
        if out is None:
            out = np.zeros((len(rows), got.shape[1]), dtype=np.float32)
        out[sel] = got
    assert out is not None
    return out


def lloyd_kmeans(
    shards: ShardSet, k: int, niter: int, seed: int = 0, spherical: bool = False, nredo: int = 1, name: str = "kmeans"
) -> KMeansFit:
    """k-means of every point the shard set holds (see the module docstring)."""
    counts = shards.counts()
    n = int(sum(counts))
    if n < k:
        raise ValueError(f"{name}: cannot make k={k} clusters from {n} points; lower k or use more images")
    best: KMeansFit | None = None
    for redo in range(nredo):
        c = gather(shards, counts, init_rows(n, k, seed + redo))
        if spherical:
            c = l2_normalize(c)
        obj: list[float] = []
        for _ in range(niter):
            sums, cnt, inertia = reduce_stats(shards.stats(c, spherical))
            obj.append(inertia)
            new = c.astype(np.float64)
            nonempty = cnt > 0
            new[nonempty] = sums[nonempty] / cnt[nonempty, None]
            n_split = split_empty(new, cnt)
            if n_split:
                log.info("[%s] %d empty clusters re-seeded", name, n_split)
            c = new.astype(np.float32)
            if spherical:
                c = l2_normalize(c)
        final = reduce_stats(shards.stats(c, spherical))[2] if niter else float("inf")
        log.info("[%s] k=%d redo %d: objective %.6g after %d iterations on %d points", name, k, redo, final, niter, n)
        if best is None or final < best.objective[-1]:
            best = KMeansFit(c, obj + [final], n, redo)
    assert best is not None
    return best


def shard_stats(points: np.ndarray, centroids: np.ndarray, spherical: bool) -> Stats:
    """One file's statistics of one Lloyd step (empty files add zeros)."""
    x = l2_normalize(points) if spherical else np.asarray(points, dtype=np.float32)
    if x.shape[0] == 0:
        k, d = centroids.shape
        return np.zeros((k, d)), np.zeros(k, dtype=np.int64), 0.0
    return lloyd_step_stats(x, centroids, use_gpu=False)


def nearest(points: np.ndarray, centroids: np.ndarray, spherical: bool) -> np.ndarray:
    """Index of the nearest centroid of every point (largest cosine when spherical)."""
    x = l2_normalize(points) if spherical else np.asarray(points, dtype=np.float32)
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return assign(x, centroids, use_gpu=False)[0]
