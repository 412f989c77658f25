"""The Ray executor: the stages of :mod:`transfgu.stages` scheduled on a Ray cluster.

=============  =====================================================================================================
stage          how Ray runs it
=============  =====================================================================================================
extract        Ray Data actor pool over the image records, one shard per call (:func:`.shards.run_sharded_stage`)
concepts       Lloyd iterations as Ray tasks over the feature shards (:func:`.kmeans.run_concepts_ray`)
label_bank     Ray Data actor pool, as extract
train          Ray Train ``TorchTrainer`` (V2), one fit per bootstrapping round (:func:`.train.run_train_ray`)
evaluate       one Ray task, on a GPU when the cluster has one (:func:`run_evaluate_ray`)
=============  =====================================================================================================

Skip-if-done, the manifest (written by this driver only), MLflow and the report are
:func:`transfgu.pipeline.run_pipeline`'s; only the stage runners are swapped, so a run directory can be resumed
by either executor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.distributed.cluster import init_ray, task_resources, torch_threads, worker_config
from transfgu.distributed.kmeans import run_concepts_ray
from transfgu.distributed.shards import run_sharded_stage
from transfgu.distributed.train import run_train_ray
from transfgu.layout import RunLayout
from transfgu.local import StageRunner
from transfgu.logs import setup_logging
from transfgu.pipeline import run_pipeline
from transfgu.preflight import check_ray_address, preflight, raise_problems
from transfgu.runlock import run_lock
from transfgu.runtime import load_run_backbone
from transfgu.stages import ExtractStage, LabelBankStage, run_evaluate

log = logging.getLogger(__name__)


def run_extract_ray(ctx: RunContext) -> dict[str, Any]:
    return run_sharded_stage(ctx, ExtractStage)


def run_label_bank_ray(ctx: RunContext) -> dict[str, Any]:
    return run_sharded_stage(ctx, LabelBankStage)


def _evaluate_task(cfg_dict: dict[str, Any], num_cpus: float, hashes: dict[str, str]) -> dict[str, Any]:
    setup_logging(worker=True)
    torch.set_num_threads(torch_threads(num_cpus))
    ctx = RunContext(Config.model_validate(cfg_dict))
    ctx.hashes = dict(hashes)  # the driver's: the shipped config has absolute paths, which change the hashes
    return run_evaluate(ctx)


def run_evaluate_ray(ctx: RunContext) -> dict[str, Any]:
    """The evaluate stage (:func:`transfgu.stages.run_evaluate`) as one Ray task (on a GPU when there is one)."""
    import ray

    res = task_resources(ctx.cfg)
    # "DEFAULT": on the cluster, not inside the placement group of a Tune trial that runs this pipeline
    task = ray.remote(_evaluate_task).options(**res, scheduling_strategy="DEFAULT")
    return ray.get(task.remote(worker_config(ctx.cfg), res["num_cpus"], ctx.hashes))


RAY_RUNNERS: dict[str, StageRunner] = {
    "extract": run_extract_ray,
    "concepts": run_concepts_ray,
    "label_bank": run_label_bank_ray,
    "train": run_train_ray,
    "evaluate": run_evaluate_ray,
}


def prepare_run_dir(cfg: Config) -> None:
    """Create the run directory and, for a random backbone, its weights file once, before any actor reads it."""
    layout = RunLayout(cfg.run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    if not cfg.backbone.source.pretrained:
        load_run_backbone(cfg.backbone, layout, cfg.run.seed)


def run_pipeline_ray(cfg: Config, only: Sequence[str] | None = None, force: Sequence[str] = (),
                     kind: str = "ray_pipeline", runners: Mapping[str, StageRunner] | None = None,
                     tracking_parent: str | None = None) -> dict[str, Any]:
    """Run (or resume) every stage on the Ray cluster this process joins (or starts); returns the manifest."""
    setup_logging()
    images = preflight(cfg)  # fail on bad data paths, weights, device or window layout before starting Ray
    raise_problems(check_ray_address(cfg))  # a short timeout instead of ray.init's long retries
    with run_lock(cfg.run_dir):  # before Ray starts and anything is written; run_pipeline takes it again
        log.info("preflight: images per split %s", images)
        init_ray(cfg)
        prepare_run_dir(cfg)
        if cfg.method == "leopart":
            from transfgu.distributed.leopart import LEOPART_RAY_RUNNERS as base
        elif cfg.method == "leopart_finetune":
            from transfgu.distributed.finetune import FINETUNE_RAY_RUNNERS as base
        else:
            base = RAY_RUNNERS
        return run_pipeline(cfg, only=only, force=force, runners={**base, **(runners or {})}, kind=kind,
                            tracking_parent=tracking_parent, checked=True)
