"""The actor pool's size follows the cluster (``cluster.actor_pool_bounds``, ``ray.extract_actors = (lo, auto)``).

Pure arithmetic against hand-computed cases; no Ray needed. ``per_actor`` is what ``task_resources`` asks for,
``cluster`` what ``ray.cluster_resources()`` returns.
"""

from __future__ import annotations

import pytest

from transfgu.config import RayConfig
from transfgu.distributed.cluster import actor_pool_bounds, task_resources

GPU_ACTOR = {"num_gpus": 1.0, "num_cpus": 1.0}
CPU_ACTOR = {"num_cpus": 1.0}


@pytest.mark.parametrize(
    ("actors", "per_actor", "cluster", "n_items", "expected"),
    [
        # 8 GPUs, 1 GPU per actor, 64 CPUs: 8 actors
        ((1, "auto"), GPU_ACTOR, {"GPU": 8.0, "CPU": 64.0}, 1000, (1, 8)),
        # fractional GPUs: 2 GPUs / 0.25 = 8 actors (0.25 * 4 sums to 1.0 exactly in float, 1e-9 guard)
        ((1, "auto"), {"num_gpus": 0.25, "num_cpus": 1.0}, {"GPU": 2.0, "CPU": 64.0}, 1000, (1, 8)),
        # 1/3 GPU each: floor(1 / (1/3)) = 3, not 2 from float rounding
        ((1, "auto"), {"num_gpus": 1 / 3, "num_cpus": 0.5}, {"GPU": 1.0, "CPU": 16.0}, 1000, (1, 3)),
        # GPU actors also need their CPUs: 8 GPUs but only 4 CPUs at 1 CPU/actor -> 4
        ((1, "auto"), GPU_ACTOR, {"GPU": 8.0, "CPU": 4.0}, 1000, (1, 4)),
        # CPU actors: 16 CPUs / 2 per actor = 8; GPUs present are ignored for CPU actors
        ((1, "auto"), {"num_cpus": 2.0}, {"CPU": 16.0, "GPU": 4.0}, 1000, (1, 8)),
        # fewer shards than the cluster holds: one actor per shard
        ((1, "auto"), CPU_ACTOR, {"CPU": 16.0}, 3, (1, 3)),
        # min above the bound is lowered to it
        ((4, "auto"), CPU_ACTOR, {"CPU": 16.0}, 2, (2, 2)),
        # nothing fits (a GPU cluster with no GPU node up yet): one actor, which waits for the autoscaler
        ((1, "auto"), GPU_ACTOR, {"CPU": 8.0}, 1000, (1, 1)),
        # an explicit max above the current resources is kept (an autoscaling cluster grows into it)
        ((1, 32), GPU_ACTOR, {"GPU": 2.0, "CPU": 16.0}, 1000, (1, 32)),
        # ...but never above one actor per shard
        ((2, 32), GPU_ACTOR, {"GPU": 2.0, "CPU": 16.0}, 5, (2, 5)),
        ((1, 4), CPU_ACTOR, {"CPU": 2.0}, 0, (1, 1)),
    ],
)
def test_actor_pool_bounds(actors, per_actor, cluster, n_items, expected):
    assert actor_pool_bounds(actors, per_actor, cluster, n_items) == expected


def test_auto_is_the_default_and_uses_task_resources():
    cfg = RayConfig(gpus_per_actor=0.5, cpus_per_actor=2.0)
    assert cfg.extract_actors == (1, "auto")

    class C:  # the part of Config that task_resources reads
        ray = cfg

    res = task_resources(C, gpu=True)  # type: ignore[arg-type]
    # 4 GPUs / 0.5 = 8, but 12 CPUs / 2 = 6 bound it
    assert actor_pool_bounds(cfg.extract_actors, res, {"GPU": 4.0, "CPU": 12.0}, 100) == (1, 6)
    res = task_resources(C, gpu=False)  # type: ignore[arg-type]
    assert actor_pool_bounds(cfg.extract_actors, res, {"GPU": 4.0, "CPU": 12.0}, 100) == (1, 6)
    with pytest.raises(ValueError, match="extract_actors"):
        RayConfig(extract_actors=(3, 2))
