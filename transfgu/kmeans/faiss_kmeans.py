"""``faiss.Kmeans`` on points in memory, then the means of the members (TransFGU's concepts, one process).

The TransFGU reference clusters raw CLS features with faiss (L2, 100 iterations, seed 1, ``max_points_per_centroid``
= 10^7 so nothing is subsampled, random-sample initialisation, one redo), assigns every point to its nearest centroid
and replaces each centroid by the plain mean of its members (docs/fidelity.md, row 11).
"""

from __future__ import annotations

import math
from typing import Literal

import faiss
import numpy as np

from transfgu.kmeans.rules import (
    KMeansResult,
    _want_gpu,
    assign,
    check_options,
    check_points,
    cluster_sums,
    exact_sq_dists,
)


def kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 100,
    seed: int = 1,
    init_centroids: np.ndarray | None = None,
    use_gpu: bool | None = None,
    nredo: int = 1,
    init: Literal["random", "kmeans++"] = "random",
    max_points_per_centroid: int | None = None,
    spherical: bool = False,
) -> KMeansResult:
    """faiss k-means as in the reference implementation, followed by the means recomputation.

    Args:
        x: ``(n, D)`` raw features (cast to float32).
        k: number of clusters (``1 <= k <= n``).
        niter: Lloyd iterations inside faiss (reference: 100).
        seed: faiss seed (reference: 1).
        init_centroids: optional ``(k, D)`` initial centroids instead of faiss's random sample.
        use_gpu: ``None`` = GPU when faiss sees one, ``False`` = CPU, ``True`` = GPU or raise.
        nredo: faiss restarts, the run with the lowest objective is kept (reference: 1).
        init: ``"random"`` sample of k points (reference, faiss default) or ``"kmeans++"`` (faiss >= 1.13).
        max_points_per_centroid: faiss's subsampling (faiss's default 256); None = never subsample (reference).
        spherical: faiss's ``spherical`` (unit centroids during the iterations; the means step is not normalised).
    """
    x = check_points(x, k)
    n, d = x.shape
    check_options(niter, nredo, max_points_per_centroid)
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
        # None: the reference's 10^7, which disables subsampling for its data sizes; never subsample whatever n is
        max_points_per_centroid=(max(10**7, math.ceil(n / k) + 1) if max_points_per_centroid is None
                                 else int(max_points_per_centroid)),
        nredo=int(nredo),
        spherical=bool(spherical),
        verbose=False,
        gpu=gpu,
        **extra,
    )
    start = None
    if init_centroids is not None:
        start = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if start.shape != (k, d):
            raise ValueError(f"init_centroids must have shape {(k, d)}, got {start.shape}")
    km.train(x, init_centroids=start)
    faiss_centroids = np.asarray(km.centroids, dtype=np.float32).reshape(k, d)
    labels, _ = assign(x, faiss_centroids, use_gpu=gpu)
    sums, counts = cluster_sums(x, labels, k)
    centroids = faiss_centroids.astype(np.float64)
    nonempty = counts > 0
    centroids[nonempty] = sums[nonempty] / counts[nonempty, None]
    centroids = centroids.astype(np.float32)
    inertia = float(exact_sq_dists(x, centroids, labels).sum())
    return KMeansResult(centroids=centroids, inertia=inertia, n_points=n, assignments=labels,
                        objective=[float(v) for v in np.asarray(km.obj)] + [inertia])
