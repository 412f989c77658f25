"""The Ray executor: :class:`RayExecutor`, the :class:`transfgu.method.Executor` of a Ray cluster.

==============  ===================================================================================================
protocol        Ray
==============  ===================================================================================================
run_sharded     a Ray Data actor pool over the records no kept shard covers (:func:`.shards.run_sharded_stage`):
                same plan by image id, same stamped shard files as the one-process executor
map_files       one Ray task per file; results in file order
hold            actors that each hold a contiguous group of files (:class:`RayHolders`); every call is sent to all
                of them and their per-file answers are concatenated in file order -- the one-process numbers
==============  ===================================================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import numpy as np

from transfgu.config import Config
from transfgu.distributed.cluster import task_resources
from transfgu.distributed.shards import run_sharded_stage
from transfgu.method import StageInfo

if TYPE_CHECKING:
    from transfgu.context import RunContext
    from transfgu.sharded import ShardedStage

T = TypeVar("T")
H = TypeVar("H")


def file_groups(files: Sequence[Path | str], n_groups: int) -> list[list[str]]:
    """``files`` cut into at most ``n_groups`` contiguous, non-empty groups (file order kept)."""
    n_groups = max(1, min(n_groups, len(files)))
    bounds = np.linspace(0, len(files), n_groups + 1).round().astype(int)
    return [[str(f) for f in files[bounds[i] : bounds[i + 1]]] for i in range(n_groups) if bounds[i + 1] > bounds[i]]


def _shared(arg: Any) -> Any:
    """Arguments sent to every holder go to the object store once (plain scalars travel as they are)."""
    import ray

    return arg if isinstance(arg, (str, int, float, bool, type(None))) else ray.put(arg)


class RayHolders:
    """Actors that each hold a group of files, seen as one holder of all the files.

    A method call goes to every actor and the per-file lists they return are concatenated (groups are contiguous
    and in order, so the result is in file order). A method named in the holder class's ``PER_FILE`` takes a
    global file index first and is sent to the one actor holding that file.
    """

    def __init__(self, actors: list[Any], groups: list[list[str]], per_file: Sequence[str]) -> None:
        self.actors, self.groups, self.per_file = actors, groups, tuple(per_file)
        self.where = [(a, j) for a, g in enumerate(groups) for j in range(len(g))]

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        import ray

        def call(*args: Any, **kwargs: Any) -> Any:
            if method in self.per_file:
                a, j = self.where[int(args[0])]
                return ray.get(getattr(self.actors[a], method).remote(j, *args[1:], **kwargs))
            shared = [_shared(x) for x in args]
            named = {k: _shared(v) for k, v in kwargs.items()}
            parts = ray.get([getattr(actor, method).remote(*shared, **named) for actor in self.actors])
            return [x for part in parts for x in part]

        return call


def start_holders(holder: Callable[..., Any], files: Sequence[Path | str], max_holders: int,
                  options: Mapping[str, Any], *args: Any) -> RayHolders:
    """``holder(group, *args)`` actors over contiguous groups of ``files`` with Ray ``options``: the holders of every
    sharded k-means (Leopart's dense steps through :meth:`RayExecutor.hold`, TransFGU's concepts).

    Holders live for a whole step: never more of them than the cluster can host at once, or they would wait for
    each other forever (tasks could queue; long-lived actors cannot).
    """
    import ray

    total = ray.cluster_resources()
    fit = int(total.get("CPU", 1) // max(float(options.get("num_cpus", 1)), 1e-3))
    if options.get("num_gpus"):
        fit = min(fit, int(total.get("GPU", 0) // float(options["num_gpus"])))
    groups = file_groups(list(files), max(1, min(max_holders, fit)))
    cls = ray.remote(holder).options(**options)
    shared = [_shared(x) for x in args]
    actors = [cls.remote(g, *shared) for g in groups]
    return RayHolders(actors, groups, getattr(holder, "PER_FILE", ()))


class RayExecutor:
    """The Ray executor (:class:`transfgu.method.Executor`) on the cluster this process has joined."""

    name = "ray"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.res = task_resources(cfg)

    def run_sharded(self, ctx: RunContext, stage: type[ShardedStage]) -> StageInfo:
        return run_sharded_stage(ctx, stage)

    def map_files(self, fn: Callable[[str], T], files: Sequence[Path]) -> list[T]:
        import ray

        # "DEFAULT": on the cluster, not inside the placement group of a Tune trial
        task = ray.remote(fn).options(num_cpus=self.res["num_cpus"], scheduling_strategy="DEFAULT")
        return ray.get([task.remote(str(f)) for f in files])

    def hold(self, holder: Callable[..., H], files: Sequence[Path], *args: Any) -> H:
        # CPU only (faiss CPU assign); "DEFAULT": on the cluster, not inside a Tune trial's placement group
        opts = {"num_cpus": self.res["num_cpus"], "scheduling_strategy": "DEFAULT"}
        return cast(H, start_holders(holder, files, self.cfg.ray.kmeans_shards, opts, *args))

    def release(self, held: object) -> None:
        import ray

        for a in getattr(held, "actors", []):
            ray.kill(a)
