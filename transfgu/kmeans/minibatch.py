"""sklearn ``MiniBatchKMeans`` as the reference runs it for Cityscapes and LIP (docs/fidelity.md row 11).

The authors cluster the crop CLS features of Cityscapes and LIP with ``sklearn.cluster.MiniBatchKMeans``
(``max_iter=100``, ``random_state=0``, otherwise sklearn 1.0.1's defaults: k-means++ initialisation, ``n_init=3``,
``batch_size=1024``, ``max_no_improvement=10``) and then recompute every centroid as the plain mean of the points
assigned to it. ``concepts.algorithm=minibatch_kmeans`` (set by ``protocol: paper`` for those data sets) selects
this; the default is the faiss k-means used for every data set (:func:`transfgu.kmeans.kmeans`).
"""

from __future__ import annotations

import numpy as np

from transfgu.kmeans.rules import KMeansResult, assign, check_points, cluster_sums, exact_sq_dists

REFERENCE_SETTINGS = {"max_iter": 100, "random_state": 0, "n_init": 3, "batch_size": 1024,
                      "max_no_improvement": 10, "init": "k-means++"}


def minibatch_kmeans(x: np.ndarray, k: int, max_iter: int = 100, random_state: int = 0) -> KMeansResult:
    """MiniBatchKMeans with the reference's settings, then centroids = means of the assigned points.

    A cluster that ends empty keeps sklearn's centroid (as :func:`transfgu.kmeans.kmeans` keeps faiss's).
    """
    from sklearn.cluster import MiniBatchKMeans

    x = check_points(x, k)
    settings = {**REFERENCE_SETTINGS, "max_iter": int(max_iter), "random_state": int(random_state)}
    km = MiniBatchKMeans(n_clusters=k, **settings).fit(x)
    centroids = np.asarray(km.cluster_centers_, dtype=np.float32)
    labels, _ = assign(x, centroids, use_gpu=False)
    sums, counts = cluster_sums(x, labels, k)
    filled = counts > 0
    centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
    inertia = float(exact_sq_dists(x, centroids, labels).sum())
    return KMeansResult(centroids=centroids, inertia=inertia, n_points=int(x.shape[0]), assignments=labels)
