"""Runs a method's stages on a Ray cluster: :func:`run_pipeline_ray` joins (or starts) Ray and hands
:func:`transfgu.pipeline.run_pipeline` the Ray executor (:class:`.executor.RayExecutor`).

Skip-if-done, the manifest (written by this driver only), MLflow and the report are
:func:`transfgu.pipeline.run_pipeline`'s; only the executor differs, so a run directory can be resumed by either
executor. Stages whose Ray form the executor protocol cannot express yet name it themselves (TransFGU's k-means
tasks, Ray Train rounds and evaluation task, :mod:`.evaluate`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from transfgu.config import Config
from transfgu.distributed.cluster import init_ray
from transfgu.distributed.executor import RayExecutor
from transfgu.layout import RunLayout
from transfgu.logs import setup_logging
from transfgu.method import StageFn
from transfgu.pipeline import run_pipeline
from transfgu.preflight import check_ray_address, preflight, raise_problems
from transfgu.runtime import load_run_backbone

log = logging.getLogger(__name__)


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
