"""What the stages of one run share, on the driver: config, input hashes, run layout, manifest, device, backbone,
tracking.

Nothing here knows which method runs: the stage hashes come in (:func:`transfgu.methods.run_context`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from typing import Any

import torch

from transfgu.config import Config
from transfgu.errors import ErrorLog
from transfgu.layout import RunLayout
from transfgu.models.backbone import DinoViT
from transfgu.runtime import autocast_dtype, configure_inputs, load_run_backbone, resolve_device
from transfgu.store.manifest import Manifest
from transfgu.throughput.compile import compile_forward
from transfgu.tracking import PipelineTracker


def run_backbone(cfg: Config, layout: RunLayout, device: torch.device) -> DinoViT:
    """The run's frozen backbone on ``device``, eval mode, its eval forward compiled (``TRANSFGU_COMPILE``: on CUDA
    by default, eager fallback): the one construction every executor uses (this process, the Ray Data stage actors,
    the Ray Train workers)."""
    bb = load_run_backbone(cfg.backbone, layout, cfg.run.seed).to(device).eval()
    return compile_forward(bb)


#: ``on_epoch(metrics)``: what a stage that trains calls after every epoch (MLflow, Ray reporting).
EpochCallback = Callable[[dict[str, Any]], None]


class RunContext:
    """The driver-side state of one run; the backbone is built on first use (a Ray driver may never need it)."""

    def __init__(self, cfg: Config, hashes: Mapping[str, str]) -> None:
        self.cfg = cfg
        self.layout = RunLayout(cfg.run_dir)
        self.run_dir = self.layout.root
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest.load(self.run_dir)
        # The input hash of every stage of the run's method (transfgu.methods.run_context computes them; a Ray task
        # gets the driver's: the config it is shipped has absolute paths, which change them).
        self.hashes = dict(hashes)
        self.device = resolve_device(cfg.run.device)
        self.amp = autocast_dtype(cfg.backbone.precision, self.device)
        self.errors = ErrorLog(self.layout.errors)
        configure_inputs(cfg)
        self.pretrained = cfg.backbone.source.pretrained
        # Set by run_pipeline around each stage: the stage's MLflow child run and an on_epoch(metrics) callback.
        self.tracker: PipelineTracker | None = None
        self.stage_run_id: str | None = None
        self.on_epoch: EpochCallback | None = None

    @cached_property
    def backbone(self) -> DinoViT:
        return run_backbone(self.cfg, self.layout, self.device)
