"""TransFGU's evaluate stage on Ray: :func:`transfgu.stages.evaluate_model` in one Ray task (on a GPU when the
cluster has one)."""

from __future__ import annotations

from typing import Any

import torch

from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.distributed.cluster import task_resources, torch_threads, worker_config
from transfgu.logs import setup_logging
from transfgu.stages import evaluate_model


def _evaluate_task(cfg_dict: dict[str, Any], num_cpus: float, hashes: dict[str, str]) -> dict[str, Any]:
    setup_logging(worker=True)
    torch.set_num_threads(torch_threads(num_cpus))
    ctx = RunContext(Config.model_validate(cfg_dict), hashes)  # the driver's hashes (see RunContext)
    return evaluate_model(ctx)


def run_evaluate_ray(ctx: RunContext) -> dict[str, Any]:
    """The evaluate stage (:func:`transfgu.stages.evaluate_model`) as one Ray task (on a GPU when there is one)."""
    import ray

    res = task_resources(ctx.cfg)
    # "DEFAULT": on the cluster, not inside the placement group of a Tune trial that runs this pipeline
    task = ray.remote(_evaluate_task).options(**res, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(worker_config(ctx.cfg), res["num_cpus"], ctx.hashes))
