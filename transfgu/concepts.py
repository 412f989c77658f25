"""Stage 2: semantic concepts by k-means over crop CLS features (paper §3.1; reference_method.md §4).

The reference clusters the raw (not L2-normalised) CLS features of all training crops with faiss k-means (L2
metric, 100 iterations, seed 1, ``max_points_per_centroid`` = 10^7 so nothing is subsampled, random-sample
initialisation, one redo), keeps foreground and background crops in separate pools, then assigns every point
to its nearest centroid and replaces each centroid by the plain mean of its members. Concepts are ordered
foreground first, then background.

:func:`lloyd_step_stats` exposes one Lloyd step as per-shard sufficient statistics (sums, counts, inertia) so
that a distributed driver can stream feature shards and reduce the statistics instead of loading every feature
into one process (docs/architecture.md, "concepts").
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import scipy.sparse as sp

from transfgu.store import atomic_write_bytes, atomic_write_json

__all__ = [
    "ConceptBank",
    "KMeansResult",
    "assign",
    "fit_concepts",
    "kmeans",
    "lloyd_step_stats",
    "order_pools",
]

#: Pools that come first, in this order (fg concepts occupy the first channels, reference_method.md §4).
POOL_ORDER = ("fg", "bg", "all")

_CHUNK = 1 << 16  # rows per chunk for the exact distance recomputation


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, D) float32: means of the members (faiss centroid for an empty cluster)
    assignments: np.ndarray  # (n,) int64: nearest faiss centroid of every point (the members of each mean)
    inertia: float  # sum of squared L2 distances of the points to their cluster mean


def _check_points(x: np.ndarray, k: int | None = None) -> np.ndarray:
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


def _want_gpu(use_gpu: bool | None) -> bool:
    n_gpu = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is None:
        return n_gpu > 0
    if use_gpu and n_gpu == 0:
        raise RuntimeError(
            "use_gpu=True but faiss sees no GPU (install faiss-gpu and check CUDA_VISIBLE_DEVICES)"
        )
    return bool(use_gpu)


def _exact_sq_dists(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """||x_i - c_{l_i}||^2 computed directly (faiss's BLAS path expands the square and can go negative)."""
    out = np.empty(x.shape[0], dtype=np.float64)
    for s in range(0, x.shape[0], _CHUNK):
        d = x[s : s + _CHUNK].astype(np.float64) - centroids[labels[s : s + _CHUNK]].astype(np.float64)
        out[s : s + _CHUNK] = np.einsum("ij,ij->i", d, d)
    return out


def assign(
    x: np.ndarray, centroids: np.ndarray, use_gpu: bool | None = False
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (faiss ``IndexFlatL2``) of every row: ``(labels int64, squared dists float32)``."""
    x = _check_points(x)
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
    return labels, _exact_sq_dists(x, c, labels).astype(np.float32)


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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
    x = _check_points(x)
    labels, d2 = assign(x, c, use_gpu=use_gpu)
    sums, counts = _cluster_sums(x, labels, c.shape[0])
    return sums, counts, float(d2.astype(np.float64).sum())


def kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 100,
    seed: int = 1,
    init_centroids: np.ndarray | None = None,
    use_gpu: bool | None = None,
    nredo: int = 1,
    init: Literal["random", "kmeans++"] = "random",
) -> KMeansResult:
    """faiss k-means as in the reference (reference_method.md §4), followed by the means recomputation.

    Args:
        x: ``(n, D)`` raw features (cast to float32).
        k: number of clusters (``1 <= k <= n``).
        niter: Lloyd iterations inside faiss (reference: 100).
        seed: faiss seed (reference: 1).
        init_centroids: optional ``(k, D)`` initial centroids instead of faiss's random sample.
        use_gpu: ``None`` = GPU when faiss sees one, ``False`` = CPU, ``True`` = GPU or raise.
        nredo: faiss restarts, the run with the lowest objective is kept (reference: 1).
        init: ``"random"`` sample of k points (reference, faiss default) or ``"kmeans++"`` (faiss >= 1.13).
    """
    x = _check_points(x, k)
    n, d = x.shape
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    if nredo < 1:
        raise ValueError(f"nredo must be >= 1, got {nredo}")
    gpu = _want_gpu(use_gpu)
    extra: dict[str, int] = {}
    if init == "kmeans++":
        if not hasattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS"):
            raise ValueError("init='kmeans++' needs a faiss build with ClusteringInitMethod (faiss >= 1.13)")
        extra["init_method"] = faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS
    elif init != "random":
        raise ValueError(f"init must be 'random' or 'kmeans++', got {init!r}")
    km = faiss.Kmeans(
        d,
        int(k),
        niter=int(niter),
        seed=int(seed),
        # the reference's 10^7 disables subsampling for its data sizes; never subsample whatever n is
        max_points_per_centroid=max(10**7, math.ceil(n / k) + 1),
        nredo=int(nredo),
        verbose=False,
        gpu=gpu,
        **extra,
    )
    init = None
    if init_centroids is not None:
        init = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if init.shape != (k, d):
            raise ValueError(f"init_centroids must have shape {(k, d)}, got {init.shape}")
    km.train(x, init_centroids=init)
    faiss_centroids = np.asarray(km.centroids, dtype=np.float32).reshape(k, d)
    labels, _ = assign(x, faiss_centroids, use_gpu=gpu)
    sums, counts = _cluster_sums(x, labels, k)
    centroids = faiss_centroids.astype(np.float64)
    nonempty = counts > 0
    centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
    centroids = centroids.astype(np.float32)
    inertia = float(_exact_sq_dists(x, centroids, labels).sum())
    return KMeansResult(centroids=centroids, assignments=labels, inertia=inertia)


def order_pools(names: list[str] | tuple[str, ...]) -> list[str]:
    """fg, bg, all first (in that order), then any other pool in the given order."""
    first = [p for p in POOL_ORDER if p in names]
    return first + [p for p in names if p not in POOL_ORDER]


@dataclass
class ConceptBank:
    """K concept vectors (cluster means), fg concepts first, with the metadata stored next to them."""

    centroids: np.ndarray  # (K, D) float32
    pools: list[str]  # pool name of every concept (len K)
    k_per_pool: dict[str, int]  # in channel order
    seed: int
    niter: int
    inertia: dict[str, float] = field(default_factory=dict)
    n_points: dict[str, int] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    CENTROIDS_FILE = "centroids.npy"
    META_FILE = "concepts.json"

    def __post_init__(self) -> None:
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.centroids.ndim != 2:
            raise ValueError(f"centroids must be (K, D), got shape {self.centroids.shape}")
        if len(self.pools) != self.centroids.shape[0] or sum(self.k_per_pool.values()) != len(self.pools):
            raise ValueError("pools, k_per_pool and centroids disagree on K")

    @property
    def num_concepts(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.centroids.shape[1])

    def pool_slice(self, pool: str) -> slice:
        """Channel range of one pool's concepts."""
        start = 0
        for name, k in self.k_per_pool.items():
            if name == pool:
                return slice(start, start + k)
            start += k
        raise KeyError(f"no pool {pool!r} in the concept bank (pools: {list(self.k_per_pool)})")

    def save(self, directory: str | Path) -> None:
        """Write ``centroids.npy`` then ``concepts.json``, each atomically (the JSON marks completion)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.save(buf, self.centroids, allow_pickle=False)
        atomic_write_bytes(d / self.CENTROIDS_FILE, buf.getvalue())
        meta = {
            "format": "transfgu.concepts/1",
            "num_concepts": self.num_concepts,
            "dim": self.dim,
            "pools": list(self.pools),
            "k_per_pool": dict(self.k_per_pool),
            "seed": int(self.seed),
            "niter": int(self.niter),
            "inertia": {k: float(v) for k, v in self.inertia.items()},
            "n_points": {k: int(v) for k, v in self.n_points.items()},
            "extra": self.extra,
        }
        atomic_write_json(d / self.META_FILE, meta)

    @classmethod
    def load(cls, directory: str | Path) -> ConceptBank:
        d = Path(directory)
        from transfgu.schemas import ConceptsMeta, check_finite, read_json

        meta = read_json(d / cls.META_FILE, ConceptsMeta)
        centroids = np.load(d / cls.CENTROIDS_FILE, allow_pickle=False)
        check_finite(d / cls.CENTROIDS_FILE, {"centroids": centroids})
        if centroids.shape != (meta["num_concepts"], meta["dim"]):
            raise ValueError(
                f"{d}: centroids.npy has shape {centroids.shape}, concepts.json says "
                f"{(meta['num_concepts'], meta['dim'])}"
            )
        return cls(
            centroids=centroids,
            pools=list(meta["pools"]),
            k_per_pool={str(k): int(v) for k, v in meta["k_per_pool"].items()},
            seed=int(meta["seed"]),
            niter=int(meta["niter"]),
            inertia={str(k): float(v) for k, v in meta["inertia"].items()},
            n_points={str(k): int(v) for k, v in meta["n_points"].items()},
            extra=dict(meta.get("extra", {})),
        )


def fit_concepts(
    pools: Mapping[str, np.ndarray],
    k_per_pool: Mapping[str, int],
    niter: int = 100,
    seed: int = 1,
    use_gpu: bool | None = None,
    nredo: int = 1,
    init: Literal["random", "kmeans++"] = "random",
    algorithm: Literal["faiss", "minibatch_kmeans"] = "faiss",
) -> ConceptBank:
    """Cluster every pool named in ``k_per_pool`` separately and stack the concepts fg first, then bg.

    COCO-Stuff-27: ``{"fg": 12, "bg": 15}``; VOC: ``{"fg": 20}``; Cityscapes/LIP: ``{"all": K}``
    (reference_method.md §4). Pools present in ``pools`` but not in ``k_per_pool`` are ignored (COCO-80 uses
    only the fg pool). Every pool is clustered with the same seed, as in the reference. ``nredo``/``init`` are
    passed to :func:`kmeans` (reference: 1 / ``"random"``) and recorded in ``extra``. ``algorithm=
    "minibatch_kmeans"`` uses sklearn's MiniBatchKMeans as the reference does for Cityscapes/LIP
    (:mod:`transfgu.kmeans_sklearn`; ``niter`` is its ``max_iter``, ``seed`` its ``random_state``).
    """
    if not k_per_pool:
        raise ValueError("k_per_pool names no pool to cluster")
    names = order_pools(list(k_per_pool))
    for name in names:
        k = int(k_per_pool[name])
        if k < 1:
            raise ValueError(f"pool {name!r}: the number of concepts must be >= 1, got {k}")
        if name not in pools:
            raise ValueError(f"pool {name!r} has no features (available pools: {sorted(pools)})")
        n = int(np.shape(pools[name])[0])
        if n < k:
            raise ValueError(f"pool {name!r} has {n} crops, fewer than its k={k} concepts")
    fits = {}
    for name in names:
        k = int(k_per_pool[name])
        if algorithm == "minibatch_kmeans":
            from transfgu.kmeans_sklearn import minibatch_kmeans

            res = minibatch_kmeans(pools[name], k, max_iter=niter, random_state=seed)
        else:
            res = kmeans(pools[name], k, niter=niter, seed=seed, use_gpu=use_gpu, nredo=nredo, init=init)
        fits[name] = PoolFit(res.centroids, res.inertia, int(np.shape(pools[name])[0]))
    extra = {"nredo": int(nredo), "init": init, "algorithm": algorithm}
    return assemble_bank(fits, k_per_pool, seed=seed, niter=niter, extra=extra)


@dataclass
class PoolFit:
    """The k-means result of one pool, as the concept bank records it."""

    centroids: np.ndarray  # (k, D) float32, means of the members
    inertia: float  # sum of squared distances to the means
    n_points: int


def assemble_bank(
    fits: Mapping[str, PoolFit], k_per_pool: Mapping[str, int], seed: int, niter: int, extra: dict | None = None
) -> ConceptBank:
    """Stack per-pool k-means results into the concept bank: fg first, then bg (:func:`order_pools`).

    The one assembly of both executors: :func:`fit_concepts` (faiss in one process) and the Ray executor's
    distributed k-means (:mod:`transfgu.distributed.kmeans`) give it their per-pool results.
    """
    names = order_pools(list(k_per_pool))
    return ConceptBank(
        centroids=np.concatenate([fits[p].centroids for p in names], axis=0),
        pools=[p for p in names for _ in range(int(k_per_pool[p]))],
        k_per_pool={p: int(k_per_pool[p]) for p in names},
        seed=int(seed),
        niter=int(niter),
        inertia={p: fits[p].inertia for p in names},
        n_points={p: int(fits[p].n_points) for p in names},
        extra=dict(extra or {}),
    )
