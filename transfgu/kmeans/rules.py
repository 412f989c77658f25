"""faiss's k-means rules (faiss/Clustering.cpp), stated once.

* initialisation: the points ``rand_perm(n, seed + 1 + redo * 15486557)[:k]`` of the training set (restart ``redo``);
* subsampling: with ``max_points_per_centroid`` set and ``n > k * max_points_per_centroid``, the training set is the
  points ``rand_perm(n, seed)[:k * max_points_per_centroid]``, in that order (faiss's default is 256);
* an empty cluster is re-seeded like ``split_clusters``: copy a cluster chosen with ``RandomGenerator(1234)`` with
  probability proportional to its size, then perturb both copies by ``+-EPS`` (``1/1024``) on alternate dimensions;
* ``spherical``: centroids are L2-normalised after the initialisation and after every update.

Assignments are nearest-L2 (faiss ``IndexFlatL2``), and the distances of the assigned pairs are recomputed exactly
(faiss's BLAS path expands the square and can go slightly negative).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import faiss
import numpy as np
import scipy.sparse as sp

#: faiss Clustering.cpp: "a bit above machine epsilon for float16"
EPS = 1.0 / 1024.0
#: faiss Clustering.cpp: the seed offset between two restarts
REDO_SEED_STRIDE = 15486557

_CHUNK = 1 << 16  # rows per chunk for the exact distance recomputation

#: per-file statistics of one Lloyd step: sums (k, D) float64, counts (k,) int64, sum of squared distances to the
#: given centroids, sum of squared norms of the points
Stats = tuple[np.ndarray, np.ndarray, float, float]


@dataclass
class KMeansResult:
    """The one result of every k-means here."""

    centroids: np.ndarray  # (k, D) float32
    inertia: float  # sum of squared L2 distances of the points to their centroid
    n_points: int  # points clustered (before any subsampling)
    assignments: np.ndarray | None = None  # (n,) int64 nearest centroid per point, where the points are in memory
    objective: list[float] = field(default_factory=list)  # per Lloyd iteration (faiss's obj), then the final one
    redo: int = 0  # the restart that was kept


def check_points(x: np.ndarray, k: int | None = None) -> np.ndarray:
    """float32 contiguous ``(n, D)`` finite points; with ``k``: ``1 <= k <= n``."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array (n, D), got shape {x.shape}")
    if k is not None:
        if k < 1:
            raise ValueError(f"the number of clusters k must be >= 1, got {k}")
        if x.shape[0] < k:
            raise ValueError(f"cannot make k={k} clusters from {x.shape[0]} points (need at least k points)")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x


def check_options(niter: int, nredo: int, max_points_per_centroid: int | None, prefix: str = "") -> None:
    """Raise a one-line ``ValueError`` for an iteration count, restart count or subsampling limit out of range."""
    if niter < 0:
        raise ValueError(f"{prefix}niter must be >= 0, got {niter}")
    if nredo < 1:
        raise ValueError(f"{prefix}nredo must be >= 1, got {nredo}")
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise ValueError(f"{prefix}max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(n > 0, n, 1.0)).astype(np.float32)


def _rand_perm(n: int, seed: int) -> np.ndarray:
    perm = np.zeros(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, int(seed))
    return perm.astype(np.int64)


def init_rows(n: int, k: int, seed: int, redo: int = 0) -> np.ndarray:
    """Row indices of faiss's random-sample initialisation of restart ``redo``."""
    return _rand_perm(n, seed + 1 + redo * REDO_SEED_STRIDE)[:k]


def subsample_rows(n: int, k: int, seed: int, max_points_per_centroid: int | None) -> np.ndarray | None:
    """faiss's training-set subsample (rows in faiss's order), or None when every point is used."""
    if max_points_per_centroid is None or n <= k * max_points_per_centroid:
        return None
    return _rand_perm(n, seed)[: k * max_points_per_centroid]


def split_empty_clusters(centroids: np.ndarray, hassign: np.ndarray, n: int) -> int:
    """faiss ``split_clusters`` in place on float32 ``centroids`` and float32 cluster sizes ``hassign``; returns the
    number of clusters re-seeded."""
    k, d = centroids.shape
    rng = faiss.RandomGenerator(1234)
    even = np.arange(d) % 2 == 0
    nsplit = 0
    for ci in range(k):
        if hassign[ci] != 0:
            continue
        cj = 0
        while True:
            # float arithmetic as in C++: (float - 1.0) / (float)(n - k) evaluated in double, stored as float
            p = np.float32((np.float64(hassign[cj]) - 1.0) / np.float64(np.float32(n - k)))
            if np.float32(rng.rand_float()) < p:
                break
            cj = (cj + 1) % k
        centroids[ci] = centroids[cj]
        up, down = np.float64(1 + EPS), np.float64(1 - EPS)
        ci_row = centroids[ci].astype(np.float64)
        cj_row = centroids[cj].astype(np.float64)
        centroids[ci] = np.where(even, ci_row * up, ci_row * down).astype(np.float32)
        centroids[cj] = np.where(even, cj_row * down, cj_row * up).astype(np.float32)
        hassign[ci] = np.float32(hassign[cj] / np.float32(2))
        hassign[cj] = np.float32(hassign[cj] - hassign[ci])
        nsplit += 1
    return nsplit


def _want_gpu(use_gpu: bool | None) -> bool:
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is None:
        return n_gpu > 0
    if use_gpu and n_gpu == 0:
        raise RuntimeError(
            "use_gpu=True but faiss sees no GPU (install faiss-gpu and check CUDA_VISIBLE_DEVICES)"
        )
    return bool(use_gpu)


def exact_sq_dists(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``||x_i - c_{l_i}||^2`` computed directly, in float64."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], _CHUNK):
        d = x[s : s + _CHUNK].astype(np.float64) - centroids[labels[s : s + _CHUNK]].astype(np.float64)
        out[s : s + _CHUNK] = np.einsum("ij,ij->i", d, d)
    return out


def assign(
    x: np.ndarray, centroids: np.ndarray, use_gpu: bool | None = False
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (faiss ``IndexFlatL2``) of every row: ``(labels int64, squared dists float32)``."""
    x = check_points(x)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    if c.ndim != 2 or c.shape[1] != x.shape[1] or c.shape[0] < 1:
        raise ValueError(f"centroids must be (k >= 1, {x.shape[1]}), got shape {c.shape}")
    index = faiss.IndexFlatL2(c.shape[1])
    if _want_gpu(use_gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    _, labels = index.search(x, 1)
    labels = labels[:, 0].astype(np.int64)
    return labels, exact_sq_dists(x, c, labels).astype(np.float32)


def nearest(points: np.ndarray, centroids: np.ndarray, normalize: bool) -> np.ndarray:
    """Index of the nearest centroid of every point (of its L2-normalised copy with ``normalize``). For unit
    centroids both give the largest inner product, i.e. the largest cosine."""
    x = l2_normalize(points) if normalize else np.asarray(points, dtype=np.float32)
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return assign(x, centroids, use_gpu=False)[0]


def cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster float64 sums and int64 counts of the points."""
    n = x.shape[0]
    onehot = sp.csr_matrix((np.ones(n, dtype=np.float64), (labels, np.arange(n))), shape=(k, n))
    sums = np.asarray(onehot @ x.astype(np.float64))
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return sums, counts


def lloyd_step_stats(
    x: np.ndarray, centroids: np.ndarray, use_gpu: bool | None = False
) -> tuple[np.ndarray, np.ndarray, float]:
    """Sufficient statistics of one Lloyd step on one shard.

    Returns ``(sums (k, D) float64, counts (k,) int64, inertia)`` where ``inertia`` is the sum of squared
    distances to the *given* centroids. Summing these over shards and dividing gives the next centroids (keep
    the old centroid where the total count is zero).
    """
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    x = check_points(x)
    labels, d2 = assign(x, c, use_gpu=use_gpu)
    sums, counts = cluster_sums(x, labels, c.shape[0])
    return sums, counts, float(d2.astype(np.float64).sum())


def shard_stats(points: np.ndarray, centroids: np.ndarray, normalize: bool = False,
                use_gpu: bool | None = False) -> Stats:
    """One file's :data:`Stats` (of its L2-normalised points with ``normalize``); an empty file adds zeros."""
    x = l2_normalize(points) if normalize else np.asarray(points, dtype=np.float32)
    if x.shape[0] == 0:
        k, d = centroids.shape
        return np.zeros((k, d)), np.zeros(k, dtype=np.int64), 0.0, 0.0
    sums, counts, inertia = lloyd_step_stats(x, centroids, use_gpu=use_gpu)
    x64 = x.astype(np.float64)
    return sums, counts, inertia, float(np.einsum("ij,ij->", x64, x64))
