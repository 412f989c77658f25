"""Stage 2 on Ray: faiss-equivalent k-means over the feature shards, with no process holding all features.

A few long-lived :class:`ShardHolder` actors each read their group of Parquet shards ONCE (into CPU memory, decoded
per pool) behind :class:`transfgu.distributed.executor.RayHolders` (the holders of Leopart's dense steps too), and
the one Lloyd driver of every sharded k-means (:func:`transfgu.kmeans.lloyd_kmeans`) sends them only the current
centroids; each returns per-file sums and counts (faiss on the GPU when the actor holds one) and the driver adds
them up in file order and divides. Per-iteration traffic is therefore ``K x D`` numbers each way per actor, and no
feature byte is read from disk after loading (each holder counts the bytes it read: :meth:`ShardHolder.bytes_read`).
Memory grows with the cluster, not the data: a holder keeps ``1 / num_tasks`` of the features; the driver holds
``K x D`` numbers.

The driver reproduces ``faiss.Kmeans.train`` as :func:`transfgu.kmeans.kmeans` configures it (``nredo = 1``, no
subsampling, faiss's sample initialisation in the pool's row order: shards in file-name order, rows in file order, the
order :func:`store.formats.read_features` concatenates them; faiss's empty-cluster split), then, as the one-process
path does after faiss, one more assignment and the plain means of the members (``means_step``). Sums are float64
where faiss uses float32, so centroids agree to about 1e-6 relative, and an assignment can only differ for a point
equidistant to two centroids within that precision.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfgu import integrity
from transfgu.context import RunContext
from transfgu.distributed.cluster import cluster_has_gpus, task_resources
from transfgu.distributed.executor import start_holders
from transfgu.kmeans import KMeansResult, Stats, lloyd_kmeans, shard_stats
from transfgu.local import run_concepts
from transfgu.stages import concept_pools, finish_concepts
from transfgu.store.formats import iter_feature_shards, list_parquet_files

log = logging.getLogger(__name__)


def _read_pool(path: str, pool: str) -> np.ndarray:
    for _, _, cls in iter_feature_shards(path, columns=["pool"], pools=[pool]):
        return cls
    raise FileNotFoundError(path)


class ShardHolder:
    """A group of feature shards held in memory, per pool, for every Lloyd iteration (run as a Ray actor).

    Loading happens once, in the constructor; :meth:`select` picks the pool that the shard-set calls
    (``counts``/``rows``/``stats``, per file) see. ``bytes_read`` is the Parquet bytes this holder read from
    storage, so a test can show that iterations after the first read nothing.
    """

    PER_FILE = ("rows",)  # called with a file index, on the one holder of that file

    def __init__(self, paths: Sequence[str], pools: Sequence[str], use_gpu: bool = False) -> None:
        self.paths = [str(p) for p in paths]
        self.use_gpu = use_gpu
        self._sizes = [os.path.getsize(p) for p in self.paths]
        # one array per (file, pool): row order = file order, as store.read_features concatenates them
        self.data: list[dict[str, np.ndarray]] = [
            {pool: np.ascontiguousarray(_read_pool(path, pool)) for pool in pools} for path in self.paths
        ]
        self.pool = str(pools[0])

    def bytes_read(self) -> list[int]:
        """Parquet bytes read from storage, per file (all of it at construction)."""
        return list(self._sizes)

    def nbytes(self) -> int:
        return sum(a.nbytes for d in self.data for a in d.values())

    def select(self, pool: str) -> list[int]:
        """The pool that the shard-set calls see; returns its per-file counts."""
        self.pool = pool
        return self.counts()

    def counts(self) -> list[int]:
        return [int(d[self.pool].shape[0]) for d in self.data]

    def rows(self, file: int, local_rows: Sequence[int]) -> np.ndarray:
        """Rows (pool-local indices) of the ``file``-th shard of this holder."""
        return self.data[file][self.pool][np.asarray(local_rows, dtype=np.int64)]

    def stats(self, centroids: np.ndarray, normalize: bool) -> list[Stats]:
        """Per file: the Lloyd statistics of the selected pool (:func:`transfgu.kmeans.shard_stats`)."""
        return [shard_stats(d[self.pool], centroids, normalize, use_gpu=self.use_gpu) for d in self.data]


def distributed_kmeans(
    files: Sequence[str | Path],
    k_per_pool: Mapping[str, int],
    niter: int,
    seed: int = 1,
    init_centroids: Mapping[str, np.ndarray] | None = None,
    num_tasks: int = 4,
    use_gpu: bool = False,
    task_options: Mapping[str, Any] | None = None,
) -> dict[str, KMeansResult]:
    """k-means of every pool over feature shards held by Ray actors; see the module docstring for the equivalence."""
    files = [str(f) for f in files]
    if not files:
        raise FileNotFoundError("no feature shards to cluster")
    # "DEFAULT": schedule on the cluster, not inside the placement group of a Tune trial that calls this
    opts = {"num_cpus": 1, "scheduling_strategy": "DEFAULT", **(task_options or {})}
    if use_gpu:
        opts.setdefault("num_gpus", 1)
    pools = list(k_per_pool)
    shards = start_holders(ShardHolder, files, num_tasks, opts, pools, use_gpu)
    try:
        loaded = sum(shards.bytes_read())
        log.info("[concepts] %d shard holders loaded %.1f MB of features once", len(shards.actors), loaded / 1e6)
        out = {}
        for pool in pools:
            shards.select(pool)
            init = None if init_centroids is None else init_centroids.get(pool)
            out[pool] = lloyd_kmeans(shards, int(k_per_pool[pool]), niter, seed, init_centroids=init,
                                     means_step=True, name=f"pool {pool!r}")
        return out
    finally:
        import ray

        for a in shards.actors:
            ray.kill(a)


def run_concepts_ray(ctx: RunContext) -> dict[str, Any]:
    """The Ray executor of the concepts stage: the same concept bank as the one-process faiss k-means, computed by
    Ray tasks over the feature shards, then the stage's own assembly (:func:`transfgu.stages.finish_concepts`)."""
    cfg = ctx.cfg
    integrity.require_stamped(ctx.layout.features, "extract", ctx.hashes["extract"])
    if cfg.concepts.algorithm == "minibatch_kmeans":
        # sklearn's MiniBatchKMeans (protocol: paper, Cityscapes/LIP) is one process: run it on the driver.
        return run_concepts(ctx)
    files = list_parquet_files(ctx.layout.features)
    gpu = cluster_has_gpus(cfg)
    res = task_resources(cfg, gpu)
    pools = concept_pools(cfg)
    results = distributed_kmeans(
        files, pools, niter=cfg.concepts.niter, seed=cfg.concepts.seed,
        num_tasks=cfg.ray.kmeans_shards, use_gpu=gpu, task_options=res,
    )
    return finish_concepts(ctx, results, extra={"nredo": 1, "init": "random", "algorithm": cfg.concepts.algorithm,
                                              "engine": "ray", "shards": len(files)})
