"""Leopart's stages (:mod:`transfgu.leopart.pipeline`) on Ray: the same stage definitions, a Ray executor.

==============  ===================================================================================================
step            Ray
==============  ===================================================================================================
dense           Ray Data actor pool over the image records of each split (:func:`.shards.run_sharded_stage` with
                :func:`transfgu.leopart.pipeline.dense_stage`: same shard files, resume, row-count checks, errors.jsonl)
pca             one task per dense file returns its additive moments; the driver reduces them in file order
k-means, CBFE,  actors that each hold a group of dense files in memory, projected by the PCA
co-occurrence   (:class:`transfgu.leopart.shards.DenseShards` as a Ray actor); every Lloyd step sends the centroids
                to all actors and reduces their per-file statistics in file order -- the one-process numbers
==============  ===================================================================================================

Infomap runs on the driver: the network has ``k_community + 1`` nodes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfgu.config import Config
from transfgu.distributed.cluster import task_resources
from transfgu.distributed.shards import run_sharded_stage
from transfgu.leopart import pipeline as lp_pipeline
from transfgu.leopart.pca import PCA

log = logging.getLogger(__name__)


def _groups(files: Sequence[Path], n_groups: int) -> list[list[str]]:
    n_groups = max(1, min(n_groups, len(files)))
    bounds = np.linspace(0, len(files), n_groups + 1).round().astype(int)
    return [[str(f) for f in files[bounds[i] : bounds[i + 1]]] for i in range(n_groups) if bounds[i + 1] > bounds[i]]


class RayShards:
    """The :class:`~transfgu.leopart.shards.DenseShards` interface over actors that each hold a group of files.

    Every per-file answer comes back in file order (groups are contiguous and in order).
    """

    def __init__(self, actors: list[Any], groups: list[list[str]]) -> None:
        self.actors, self.groups = actors, groups
        self.where = [(a, j) for a, g in enumerate(groups) for j in range(len(g))]

    def _all(self, method: str, *args: Any) -> list[Any]:
        import ray

        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return [x for part in ray.get(refs) for x in part]

    def counts(self) -> list[int]:
        return self._all("counts")

    def select_all(self) -> list[int]:
        return self._all("select_all")

    def select_foreground(self, model: Any) -> list[int]:
        import ray

        return self._all("select_foreground", ray.put(model))

    def rows(self, file: int, local_rows: Sequence[int]) -> np.ndarray:
        import ray

        a, j = self.where[file]
        return ray.get(self.actors[a].rows.remote(j, list(local_rows)))

    def stats(self, centroids: np.ndarray, spherical: bool) -> list[Any]:
        import ray

        return self._all("stats", ray.put(centroids), spherical)

    def precision_stats(self, model: Any) -> list[Any]:
        return self._all("precision_stats", model)

    def label_maps(self, model: Any, what: str) -> list[Any]:
        return self._all("label_maps", model, what)

    def assign_maps(self, centroids: np.ndarray, spherical: bool) -> list[Any]:
        return self._all("assign_maps", centroids, spherical)

    def cooc_stats(self, model: Any, size: tuple[int, int] | None, offsets: Sequence[tuple[int, int]]) -> list[Any]:
        return self._all("cooc_stats", model, size, list(offsets))


class RayExecutor:
    """Runs the Leopart steps on the Ray cluster this process has joined."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.res = task_resources(cfg)

    def extract(self, ctx: Any, split: str, records: Sequence[Any], out_dir: Path) -> None:
        stage_cls = lp_pipeline.dense_stage(split)  # its records and output directory are ``records``, ``out_dir``
        run_sharded_stage(ctx, stage_cls)

    def shards(self, files: Sequence[Path], pca: PCA, mask: dict[str, Any]) -> RayShards:
        import ray

        from transfgu.leopart.shards import DenseShards

        # holders live for a whole step: never more of them than the cluster can host at once, or they would wait
        # for each other forever (tasks could queue; long-lived actors cannot) -- as the TransFGU k-means holders
        fit = int(ray.cluster_resources().get("CPU", 1) // max(float(self.res["num_cpus"]), 1e-3))
        groups = _groups(list(files), max(1, min(self.cfg.ray.kmeans_shards, fit)))
        # "DEFAULT": on the cluster, not inside the placement group of a Tune trial; CPU only (faiss CPU assign)
        cls = ray.remote(DenseShards).options(num_cpus=self.res["num_cpus"], scheduling_strategy="DEFAULT")
        pca_ref = ray.put(pca)
        return RayShards([cls.remote(g, pca_ref, mask) for g in groups], groups)

    def map_files(self, fn: Callable[[str], Any], files: Sequence[Path]) -> list[Any]:
        import ray

        task = ray.remote(fn).options(num_cpus=self.res["num_cpus"], scheduling_strategy="DEFAULT")
        return ray.get([task.remote(str(f)) for f in files])

    def release(self, shards: Any) -> None:
        import ray

        for a in getattr(shards, "actors", []):
            ray.kill(a)


def _runner(fn: Callable[[Any, Any], dict[str, Any]]) -> Callable[[Any], dict[str, Any]]:
    return lambda ctx: fn(ctx, RayExecutor(ctx.cfg))


LEOPART_RAY_RUNNERS = {
    "dense": _runner(lp_pipeline.run_dense),
    "pca": _runner(lp_pipeline.run_pca),
    "cbfe": _runner(lp_pipeline.run_cbfe),
    "communities": _runner(lp_pipeline.run_communities),
    "segments": _runner(lp_pipeline.run_segments),
    "evaluate": _runner(lp_pipeline.run_evaluate),
}
