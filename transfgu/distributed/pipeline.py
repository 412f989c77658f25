"""Runs a method's stages on a Ray cluster: :func:`run_pipeline_ray` joins (or starts) Ray and hands
:func:`transfgu.pipeline.run_pipeline` the Ray executor (:class:`.executor.RayExecutor`).

Skip-if-done, the manifest (written by this driver only), MLflow and the report are
:func:`transfgu.pipeline.run_pipeline`'s; only the executor differs, so a run directory can be resumed by either
executor. Stages whose Ray form the executor protocol cannot express yet name it themselves (TransFGU's k-means
tasks, Ray Train rounds and :func:`run_evaluate_ray`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.distributed.cluster import init_ray, task_resources, torch_threads, worker_config
from transfgu.distributed.executor import RayExecutor
from transfgu.layout import RunLayout
from transfgu.logs import setup_logging
from transfgu.method import StageFn
from transfgu.pipeline import run_pipeline
from transfgu.preflight import check_ray_address, preflight, raise_problems
from transfgu.runtime import load_run_backbone
from transfgu.stages import run_evaluate

log = logging.getLogger(__name__)


def _evaluate_task(cfg_dict: dict[str, Any], num_cpus: float, hashes: dict[str, str]) -> dict[str, Any]:
    setup_logging(worker=True)
    torch.set_num_threads(torch_threads(num_cpus))
    ctx = RunContext(Config.model_validate(cfg_dict), hashes)  # the driver's hashes (see RunContext)
    return run_evaluate(ctx)


def run_evaluate_ray(ctx: RunContext) -> dict[str, Any]:
    """The evaluate stage (:func:`transfgu.stages.run_evaluate`) as one Ray task (on a GPU when there is one)."""
    import ray

    res = task_resources(ctx.cfg)
    # "DEFAULT": on the cluster, not inside the placement group of a Tune trial that runs this pipeline
    task = ray.remote(_evaluate_task).options(**res, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(worker_config(ctx.cfg), res["num_cpus"], ctx.hashes))


def prepare_run_dir(cfg: Config) -> None:
    """Create the run directory and, for a random backbone, its weights file once, before any actor reads it."""
    layout = RunLayout(cfg.run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    if not cfg.backbone.source.pretrained:
        load_run_backbone(cfg.backbone, layout, cfg.run.seed)


def run_pipeline_ray(cfg: Config, only: Sequence[str] | None = None, force: Sequence[str] = (),
                     kind: str = "ray_pipeline", runners: Mapping[str, StageFn] | None = None,
                     tracking_parent: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage on the Ray cluster this process joins (or starts); returns the manifest."""
    setup_logging()
    images = preflight(cfg)  # fail on bad data paths, weights, device or window layout before starting Ray
    log.info("preflight: images per split %s", images)
    raise_problems(check_ray_address(cfg))  # a short timeout instead of ray.init's long retries
    init_ray(cfg)
    prepare_run_dir(cfg)
    return run_pipeline(cfg, only=only, force=force, runners=runners, kind=kind, tracking_parent=tracking_parent,
                        checked=True, executor=RayExecutor(cfg))
