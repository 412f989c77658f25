"""Stage 2 on Ray: faiss-equivalent k-means as Ray tasks over the feature shards (issue 4 item 2).

No process holds all features: every Lloyd iteration sends the current centroids to a few tasks, each task reads
its group of Parquet shards, assigns them with faiss (GPU when the task has one) and returns per-centroid sums and
counts (:func:`transfgu.concepts.lloyd_step_stats`); the driver adds them up and divides. The driver itself holds
``K x D`` numbers plus one random permutation of the row indices (4 bytes per crop).

It reproduces ``faiss.Kmeans.train`` (faiss/Clustering.cpp, ``nredo = 1``, no subsampling, as
:func:`transfgu.concepts.kmeans` configures it) step by step:

* init: the points ``perm[:k]`` of ``faiss.rand_perm(n, seed + 1)`` in the pool's row order (shards in file-name
  order, rows in file order: the order :func:`transfgu.store.read_features` concatenates them), or given centroids;
* ``niter`` iterations of assign -> means; an empty cluster is re-seeded like faiss's ``split_clusters`` (copy a
  cluster chosen with faiss's ``RandomGenerator(1234)``, perturb both copies by +-1/1024);
* then, as :func:`transfgu.concepts.kmeans` does after faiss, one more assignment and the plain means of the members.

Sums are accumulated in float64 where faiss uses float32, so centroids agree to about 1e-6 relative, and an
assignment can only differ for a point equidistant to two centroids within that precision.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_EPS = 1.0 / 1024.0  # faiss Clustering.cpp: "a bit above machine epsilon for float16"


@dataclass
class PoolResult:
    centroids: np.ndarray  # (k, D) float32, means of the members
    inertia: float  # sum of squared distances to the means
    n_points: int
    objective: list[float]  # per-iteration sum of squared distances to the current centroids (faiss's obj)


# -- tasks ---------------------------------------------------------------------------------------------------------
def _read_pool(path: str, pool: str) -> np.ndarray:
    from transfgu.store import iter_feature_shards

    for _, _, cls in iter_feature_shards(path, columns=["pool"], pools=[pool]):
        return cls
    raise FileNotFoundError(path)


def shard_counts(paths: Sequence[str], pools: Sequence[str]) -> list[dict[str, int]]:
    """Rows per pool of each shard, reading only the ``pool`` column."""
    import pyarrow.parquet as pq

    out = []
    for p in paths:
        col = np.asarray(pq.read_table(p, columns=["pool"])["pool"].to_pylist(), dtype=object)
        out.append({pool: int((col == pool).sum()) for pool in pools})
    return out


def shard_gather(path: str, pool: str, local_rows: Sequence[int]) -> np.ndarray:
    """The requested rows (pool-local indices) of one shard."""
    return _read_pool(path, pool)[np.asarray(local_rows, dtype=np.int64)]


def shard_stats(
    paths: Sequence[str], centroids: Mapping[str, np.ndarray], use_gpu: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray, float, float]]:
    """Per pool: ``(sums (k, D) float64, counts (k,), sum of squared distances, sum of squared norms)``."""
    from transfgu.concepts import lloyd_step_stats

    acc: dict[str, list[Any]] = {}
    for path in paths:
        for pool, c in centroids.items():
            x = _read_pool(path, pool)
            sums, counts, inertia = lloyd_step_stats(x, c, use_gpu=use_gpu)
            sq = float(np.einsum("ij,ij->", x.astype(np.float64), x.astype(np.float64)))
            if pool not in acc:
                acc[pool] = [sums, counts, inertia, sq]
            else:
                a = acc[pool]
                a[0] += sums
                a[1] += counts
                a[2] += inertia
                a[3] += sq
    return {pool: (a[0], a[1], float(a[2]), float(a[3])) for pool, a in acc.items()}


# -- faiss's update rules ------------------------------------------------------------------------------------------
def faiss_init_rows(n: int, k: int, seed: int) -> np.ndarray:
    """Row indices of faiss's random-sample initialisation (``rand_perm(n, seed + 1)[:k]``, first redo)."""
    import faiss

    perm = np.zeros(n, dtype=np.int32)
    faiss.rand_perm(faiss.swig_ptr(perm), n, seed + 1)
    return perm[:k].astype(np.int64)


def split_empty_clusters(centroids: np.ndarray, hassign: np.ndarray, n: int) -> int:
    """faiss ``split_clusters`` in place: re-seed every empty cluster from a big one; returns the number of splits."""
    import faiss

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
        up, down = np.float64(1 + _EPS), np.float64(1 - _EPS)
        ci_row = centroids[ci].astype(np.float64)
        cj_row = centroids[cj].astype(np.float64)
        centroids[ci] = np.where(even, ci_row * up, ci_row * down).astype(np.float32)
        centroids[cj] = np.where(even, cj_row * down, cj_row * up).astype(np.float32)
        hassign[ci] = np.float32(hassign[cj] / np.float32(2))
        hassign[cj] = np.float32(hassign[cj] - hassign[ci])
        nsplit += 1
    return nsplit


# -- driver --------------------------------------------------------------------------------------------------------
def _groups(files: Sequence[str], n_groups: int) -> list[list[str]]:
    n_groups = max(1, min(n_groups, len(files)))
    bounds = np.linspace(0, len(files), n_groups + 1).round().astype(int)
    return [list(files[bounds[i] : bounds[i + 1]]) for i in range(n_groups) if bounds[i + 1] > bounds[i]]


def distributed_kmeans(
    files: Sequence[str | Path],
    k_per_pool: Mapping[str, int],
    niter: int,
    seed: int = 1,
    init_centroids: Mapping[str, np.ndarray] | None = None,
    num_tasks: int = 4,
    use_gpu: bool = False,
    task_options: Mapping[str, Any] | None = None,
) -> dict[str, PoolResult]:
    """k-means of every pool over feature shards with Ray tasks; see the module docstring for the equivalence."""
    import ray

    files = [str(f) for f in files]
    if not files:
        raise FileNotFoundError("no feature shards to cluster")
    # "DEFAULT": schedule on the cluster, not inside the placement group of a Tune trial that calls this
    opts = {"num_cpus": 1, "scheduling_strategy": "DEFAULT", **(task_options or {})}
    if use_gpu:
        opts["num_gpus"] = 1
    counts_task = ray.remote(shard_counts).options(**opts)
    gather_task = ray.remote(shard_gather).options(**opts)
    stats_task = ray.remote(shard_stats).options(**opts)
    pools = list(k_per_pool)
    groups = _groups(files, num_tasks)
    per_file: list[dict[str, int]] = [c for part in ray.get([counts_task.remote(g, pools) for g in groups])
                                      for c in part]
    state: dict[str, np.ndarray] = {}
    totals: dict[str, int] = {}
    iters: dict[str, int] = {}
    for pool in pools:
        k = int(k_per_pool[pool])
        counts = np.array([c[pool] for c in per_file], dtype=np.int64)
        n = int(counts.sum())
        totals[pool] = n
        if n < k:
            raise ValueError(f"pool {pool!r} has {n} crops, fewer than its k={k} concepts")
        iters[pool] = int(niter)
        if init_centroids is not None and pool in init_centroids:
            c0 = np.ascontiguousarray(init_centroids[pool], dtype=np.float32)
            if c0.shape[0] != k:
                raise ValueError(f"init_centroids[{pool!r}] has {c0.shape[0]} rows, expected k={k}")
        else:
            # faiss copies the training set when n == k and does not iterate
            rows = np.arange(k, dtype=np.int64) if n == k else faiss_init_rows(n, k, seed)
            if n == k:
                iters[pool] = 0
            starts = np.concatenate([[0], np.cumsum(counts)])
            file_of = np.searchsorted(starts, rows, side="right") - 1
            refs, where = [], []
            for f in np.unique(file_of):
                sel = np.nonzero(file_of == f)[0]
                refs.append(gather_task.remote(files[f], pool, (rows[sel] - starts[f]).tolist()))
                where.append(sel)
            c0 = np.zeros((k, 0), dtype=np.float32)
            for sel, got in zip(where, ray.get(refs)):
                if c0.shape[1] == 0:
                    c0 = np.zeros((k, got.shape[1]), dtype=np.float32)
                c0[sel] = got
        state[pool] = c0
    objective: dict[str, list[float]] = {p: [] for p in pools}
    t0 = time.time()
    for it in range(max(iters.values())):
        active = {p: c for p, c in state.items() if it < iters[p]}
        ref = ray.put(active)
        parts = ray.get([stats_task.remote(g, ref) for g in groups])
        for pool in active:
            sums, counts, inertia = _reduce(parts, pool)
            objective[pool].append(inertia)
            new = state[pool].copy()
            nonempty = counts > 0
            new[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
            hassign = counts.astype(np.float32)
            nsplit = split_empty_clusters(new, hassign, totals[pool])
            if nsplit:
                log.info("[concepts] pool %s iteration %d: %d empty clusters re-seeded", pool, it, nsplit)
            state[pool] = new
        el = time.time() - t0
        n_it = max(iters.values())
        if it == 0 or (it + 1) % 10 == 0 or it + 1 == n_it:
            eta = el / (it + 1) * (n_it - it - 1)
            log.info("[concepts] Lloyd iteration %d/%d objective %s (%.1fs, eta %.0fs)", it + 1, n_it,
                     {p: f"{v[-1]:.4g}" for p, v in objective.items() if v}, el, eta)
    # the means of the members of the final centroids (transfgu.concepts.kmeans after faiss)
    parts = ray.get([stats_task.remote(g, ray.put(state)) for g in groups])
    out: dict[str, PoolResult] = {}
    for pool in pools:
        sums, counts, _ = _reduce(parts, pool)
        sq = float(sum(p[pool][3] for p in parts if pool in p))
        means = state[pool].astype(np.float64)
        nonempty = counts > 0
        means[nonempty] = sums[nonempty] / counts[nonempty, None]
        # sum ||x - mean||^2 over members = sum ||x||^2 - sum_c ||S_c||^2 / n_c (empty clusters add nothing)
        inertia = sq - float((np.einsum("ij,ij->i", sums[nonempty], sums[nonempty]) / counts[nonempty]).sum())
        out[pool] = PoolResult(means.astype(np.float32), max(inertia, 0.0), totals[pool], objective[pool])
    return out


def _reduce(parts: Sequence[Mapping[str, Any]], pool: str) -> tuple[np.ndarray, np.ndarray, float]:
    sums = None
    counts = None
    inertia = 0.0
    for p in parts:
        if pool not in p:
            continue
        s, c, i, _ = p[pool]
        sums = s.copy() if sums is None else sums + s
        counts = c.copy() if counts is None else counts + c
        inertia += i
    if sums is None or counts is None:
        raise RuntimeError(f"no shard returned statistics for pool {pool!r}")
    return sums, counts, inertia


def run_concepts_ray(ctx: Any) -> dict[str, Any]:
    """Drop-in for :func:`transfgu.pipeline.run_concepts`: the same ConceptBank, computed by Ray tasks."""
    from transfgu.concepts import ConceptBank, order_pools
    from transfgu.distributed.cluster import cluster_has_gpus, task_resources
    from transfgu.store import list_parquet_files

    cfg = ctx.cfg
    if cfg.concepts.algorithm == "minibatch_kmeans":
        # sklearn's MiniBatchKMeans (protocol: paper, Cityscapes/LIP) is one process: run it on the driver.
        from transfgu.pipeline import run_concepts

        return run_concepts(ctx)
    files = list_parquet_files(ctx.run_dir / "features")
    gpu = cluster_has_gpus(cfg)
    res = task_resources(cfg, gpu)
    names = order_pools(list(cfg.concepts.k_per_pool))
    results = distributed_kmeans(
        files, {p: cfg.concepts.k_per_pool[p] for p in names}, niter=cfg.concepts.niter, seed=cfg.concepts.seed,
        num_tasks=cfg.ray.kmeans_shards, use_gpu=gpu, task_options={"num_cpus": res["num_cpus"]},
    )
    for pool in names:
        log.info("[concepts] pool %s: %d crop features", pool, results[pool].n_points)
    bank = ConceptBank(
        centroids=np.concatenate([results[p].centroids for p in names]),
        pools=[p for p in names for _ in range(cfg.concepts.k_per_pool[p])],
        k_per_pool={p: int(cfg.concepts.k_per_pool[p]) for p in names},
        seed=int(cfg.concepts.seed),
        niter=int(cfg.concepts.niter),
        inertia={p: results[p].inertia for p in names},
        n_points={p: results[p].n_points for p in names},
        extra={"nredo": 1, "init": "random", "engine": "ray", "shards": len(files)},
    )
    bank.save(ctx.run_dir / "concepts")
    return {"rows": int(bank.centroids.shape[0]), "k": int(bank.centroids.shape[0])}
