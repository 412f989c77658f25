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
from transfgu.distributed.holders import RayShardSet
from transfgu.distributed.shards import run_sharded_stage
from transfgu.leopart import pipeline as lp_pipeline
from transfgu.leopart.pca import PCA

log = logging.getLogger(__name__)


class RayShards(RayShardSet):
    """The :class:`~transfgu.leopart.shards.DenseShards` interface over holders that each hold a group of files."""

    def select_all(self) -> list[int]:
        return self._all("select_all")

    def select_foreground(self, model: Any) -> list[int]:
        import ray

        return self._all("select_foreground", ray.put(model))

    def precision_stats(self, model: Any) -> list[Any]:
        return self._all("precision_stats", model)

    def label_maps(self, model: Any, what: str) -> list[Any]:
        return self._all("label_maps", model, what)

    def assign_maps(self, centroids: np.ndarray, normalize: bool) -> list[Any]:
        return self._all("assign_maps", centroids, normalize)

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
        from transfgu.leopart.shards import DenseShards

        # "DEFAULT": on the cluster, not inside the placement group of a Tune trial; CPU only (faiss CPU assign)
        opts = {"num_cpus": self.res["num_cpus"], "scheduling_strategy": "DEFAULT"}
        return RayShards.start(DenseShards, files, self.cfg.ray.kmeans_shards, opts, pca, mask)

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
