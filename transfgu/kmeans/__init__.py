"""k-means with faiss's rules, written once for every method and both executors.

=====================  ============================================================================================
module                 what
=====================  ============================================================================================
:mod:`.rules`          faiss's rules: input checks, sample initialisation and restart seeds, subsampling, empty-
                       cluster split, EPS, nearest-centroid assignment and the per-shard Lloyd statistics; the one
                       result type :class:`KMeansResult`
:mod:`.lloyd`          the Lloyd driver over a *shard set* (points held in files, in one process or by Ray actors)
:mod:`.faiss_kmeans`   ``faiss.Kmeans`` on points in memory, followed by the means of the members (TransFGU concepts)
:mod:`.minibatch`      sklearn's MiniBatchKMeans as the TransFGU reference runs it for Cityscapes/LIP
=====================  ============================================================================================

TransFGU's concepts (one process: :func:`kmeans`; Ray: :mod:`transfgu.distributed.kmeans`) and Leopart's CBFE,
community overclustering and overclustering evaluation (:mod:`transfgu.leopart.pipeline`, both executors) call these;
the Ray executors hold their shards in actors behind :class:`transfgu.distributed.executor.RayHolders`.
"""

from transfgu.kmeans.faiss_kmeans import kmeans
from transfgu.kmeans.lloyd import ArrayShards, ShardSet, gather, lloyd_kmeans, reduce_stats
from transfgu.kmeans.rules import (
    EPS,
    KMeansResult,
    Stats,
    assign,
    check_points,
    cluster_sums,
    exact_sq_dists,
    init_rows,
    l2_normalize,
    lloyd_step_stats,
    nearest,
    shard_stats,
    split_empty_clusters,
    subsample_rows,
)

__all__ = [
    "EPS",
    "ArrayShards",
    "KMeansResult",
    "ShardSet",
    "Stats",
    "assign",
    "check_points",
    "cluster_sums",
    "exact_sq_dists",
    "gather",
    "init_rows",
    "kmeans",
    "l2_normalize",
    "lloyd_kmeans",
    "lloyd_step_stats",
    "nearest",
    "reduce_stats",
    "shard_stats",
    "split_empty_clusters",
    "subsample_rows",
]
