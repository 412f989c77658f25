"""TransFGU's evaluate stage on Ray: :func:`transfgu.stages.evaluate_model` in one Ray task (on a GPU when the
cluster has one), its progress shown by the driver (:mod:`transfgu.distributed.progress`)."""

from __future__ import annotations

from typing import Any

import torch

from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.distributed.cluster import task_resources, torch_threads, worker_config
from transfgu.distributed.progress import relay_sink, run_with_progress
from transfgu.logs import progress_sink, setup_logging
from transfgu.stages import evaluate_model


def _evaluate_task(cfg_dict: dict[str, Any], num_cpus: float, hashes: dict[str, str], relay: Any) -> dict[str, Any]:
    import ray

    setup_logging(worker=True)
    torch.set_num_threads(torch_threads(num_cpus))
    ctx = RunContext(Config.model_validate(cfg_dict), hashes)  # the driver's hashes (see RunContext)
    with progress_sink(relay_sink(relay)):
        out = evaluate_model(ctx)
    ray.get(relay.snapshot.remote())  # one caller's actor calls run in order: every count has arrived
    return out


def run_evaluate_ray(ctx: RunContext) -> dict[str, Any]:
    """The evaluate stage (:func:`transfgu.stages.evaluate_model`) as one Ray task (on a GPU when there is one)."""
    import ray

    res = task_resources(ctx.cfg)
    # "DEFAULT": on the cluster, not inside the placement group of a Tune trial that runs this pipeline
    task = ray.remote(_evaluate_task).options(**res, scheduling_strategy="DEFAULT")
    cfg = worker_config(ctx.cfg)
    return run_with_progress(lambda relay: task.remote(cfg, res["num_cpus"], ctx.hashes, relay))
