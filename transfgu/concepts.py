"""Stage 2: semantic concepts by k-means over crop CLS features (paper §3.1; docs/fidelity.md row 11).

The reference clusters the raw (not L2-normalised) CLS features of all training crops with faiss k-means (L2
metric, 100 iterations, seed 1, ``max_points_per_centroid`` = 10^7 so nothing is subsampled, random-sample
initialisation, one redo), keeps foreground and background crops in separate pools, then assigns every point
to its nearest centroid and replaces each centroid by the plain mean of its members. Concepts are ordered
foreground first, then background. The k-means itself is :mod:`transfgu.kmeans` (one process:
:func:`transfgu.kmeans.kmeans`; Ray: the same rules over feature shards, :mod:`transfgu.distributed.kmeans`).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from transfgu.kmeans import KMeansResult, kmeans
from transfgu.kmeans.minibatch import minibatch_kmeans
from transfgu.schemas import ConceptsMeta, check_finite, read_json
from transfgu.store.atomic import atomic_write_bytes, atomic_write_json

__all__ = [
    "ConceptBank",
    "assemble_bank",
    "fit_concepts",
    "order_pools",
]

#: Pools that come first, in this order (fg concepts occupy the first channels, as in the authors' code).
POOL_ORDER = ("fg", "bg", "all")


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
    (the authors' settings). Pools present in ``pools`` but not in ``k_per_pool`` are ignored (COCO-80 uses
    only the fg pool). Every pool is clustered with the same seed, as in the reference. ``nredo``/``init`` are
    passed to :func:`kmeans` (reference: 1 / ``"random"``) and recorded in ``extra``. ``algorithm=
    "minibatch_kmeans"`` uses sklearn's MiniBatchKMeans as the reference does for Cityscapes/LIP
    (:mod:`transfgu.kmeans.minibatch`; ``niter`` is its ``max_iter``, ``seed`` its ``random_state``).
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
            res = minibatch_kmeans(pools[name], k, max_iter=niter, random_state=seed)
        else:
            res = kmeans(pools[name], k, niter=niter, seed=seed, use_gpu=use_gpu, nredo=nredo, init=init)
        fits[name] = res
    extra = {"nredo": int(nredo), "init": init, "algorithm": algorithm}
    return assemble_bank(fits, k_per_pool, seed=seed, niter=niter, extra=extra)


def assemble_bank(
    fits: Mapping[str, KMeansResult], k_per_pool: Mapping[str, int], seed: int, niter: int, extra: dict | None = None
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
