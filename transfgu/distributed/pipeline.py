"""The whole method on Ray: :func:`transfgu.pipeline.run_pipeline`'s stage loop with distributed stages.

Skip-if-done, the manifest (written by this driver only), MLflow and the report are the one-process pipeline's;
only the stage implementations are swapped, so a run directory can be resumed by either pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from transfgu import stages
from transfgu.config import Config
from transfgu.distributed.cluster import init_ray, task_resources, torch_threads, worker_config
from transfgu.distributed.extract import run_extract_ray
from transfgu.distributed.kmeans import run_concepts_ray
from transfgu.distributed.label_bank import run_label_bank_ray
from transfgu.distributed.train import run_train_ray

log = logging.getLogger(__name__)


def _evaluate_task(cfg_dict: dict[str, Any], num_cpus: float) -> dict[str, Any]:
    from transfgu.pipeline import Context, run_evaluate, setup_logging

    setup_logging()
    torch.set_num_threads(torch_threads(num_cpus))
    return run_evaluate(Context(Config.model_validate(cfg_dict)))


def run_evaluate_ray(ctx: Any) -> dict[str, Any]:
    """Drop-in for :func:`transfgu.pipeline.run_evaluate`, run as one Ray task (on a GPU when there is one)."""
    import ray

    res = task_resources(ctx.cfg)
    # "DEFAULT": on the cluster, not inside the placement group of a Tune trial that runs this pipeline
    task = ray.remote(_evaluate_task).options(**res, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(worker_config(ctx.cfg), res["num_cpus"]))


RAY_RUNNERS = {
    "extract": run_extract_ray,
    "concepts": run_concepts_ray,
    "label_bank": run_label_bank_ray,
    "train": run_train_ray,
    "evaluate": run_evaluate_ray,
}


def prepare_run_dir(cfg: Config) -> None:
    """Create the run directory and, for a random backbone, its weights file once, before any actor reads it."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.backbone.weights == "none":
        stages.load_run_backbone(cfg.backbone, cfg.run_dir, cfg.run.seed)


def run_pipeline_ray(cfg: Config, only: Sequence[str] | None = None, force: Sequence[str] = (),
                     kind: str = "ray_pipeline", runners: dict[str, Any] | None = None,
                     tracking_parent: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage on the Ray cluster this process joins (or starts); returns the manifest."""
    from transfgu.pipeline import run_pipeline, setup_logging
    from transfgu.preflight import preflight

    setup_logging()
    preflight(cfg)  # fail on bad data paths, weights, device or window layout before starting Ray
    init_ray(cfg)
    prepare_run_dir(cfg)
    if cfg.method == "leopart":
        from transfgu.distributed.leopart import LEOPART_RAY_RUNNERS as base
    else:
        base = RAY_RUNNERS
    return run_pipeline(cfg, only=only, force=force, runners={**base, **(runners or {})}, kind=kind,
                        tracking_parent=tracking_parent)
