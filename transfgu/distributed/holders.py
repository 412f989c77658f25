"""One shard-holder abstraction for the Ray executors' k-means (TransFGU concepts, Leopart's dense steps).

A *holder* is a Ray actor that reads a contiguous group of files once, at construction, and then answers the shard-set
calls of :class:`transfgu.kmeans.ShardSet` (``counts``/``rows``/``stats``) per file. :class:`RayShardSet` puts the
actors behind that interface: every per-file answer comes back in file order (groups are contiguous and in order), so
:func:`transfgu.kmeans.lloyd_kmeans` reduces the same numbers in the same order as in one process. Every Lloyd
iteration sends only the centroids to the actors; no feature byte is read after loading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from transfgu.kmeans import Stats


def file_groups(files: Sequence[str | Path], n_groups: int) -> list[list[str]]:
    """``files`` cut into at most ``n_groups`` contiguous, non-empty groups of about equal size."""
    n_groups = max(1, min(n_groups, len(files)))
    bounds = np.linspace(0, len(files), n_groups + 1).round().astype(int)
    return [[str(f) for f in files[bounds[i] : bounds[i + 1]]] for i in range(n_groups) if bounds[i + 1] > bounds[i]]


class RayShardSet:
    """The shard-set interface over actors that each hold one group of files (see the module docstring)."""

    def __init__(self, actors: list[Any], groups: list[list[str]]) -> None:
        self.actors, self.groups = actors, groups
        self.where = [(a, j) for a, g in enumerate(groups) for j in range(len(g))]

    @classmethod
    def start(cls, holder: type, files: Sequence[str | Path], max_holders: int, options: Mapping[str, Any],
              *args: Any) -> Self:
        """Start ``holder(group, *args)`` actors over ``files`` with Ray ``options``.

        Holders live for a whole clustering: never more of them than the cluster can host at once, or they would wait
        for each other forever (tasks could queue; long-lived actors cannot).
        """
        import ray

        total = ray.cluster_resources()
        fit = int(total.get("CPU", 1) // max(float(options.get("num_cpus", 1)), 1e-3))
        if options.get("num_gpus"):
            fit = min(fit, int(total.get("GPU", 0) // float(options["num_gpus"])))
        groups = file_groups(list(files), max(1, min(max_holders, fit)))
        remote = ray.remote(holder).options(**options)
        refs = [ray.put(a) for a in args]  # one copy in the object store for every holder
        return cls([remote.remote(g, *refs) for g in groups], groups)

    def _all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every holder, the per-file answers concatenated in file order."""
        import ray

        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return [x for part in ray.get(refs) for x in part]

    def each(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every holder: one answer per holder."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def counts(self) -> list[int]:
        return self._all("counts")

    def rows(self, file: int, local_rows: Sequence[int]) -> np.ndarray:
        import ray

        a, j = self.where[file]
        return ray.get(self.actors[a].rows.remote(j, list(local_rows)))

    def stats(self, centroids: np.ndarray, normalize: bool) -> list[Stats]:
        import ray

        return self._all("stats", ray.put(centroids), normalize)

    def release(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
