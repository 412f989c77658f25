"""What the stages of one run share, on the driver: config, run layout, manifest, device, backbone, tracking."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from transfgu.config import Config
from transfgu.errors import ErrorLog
from transfgu.layout import RunLayout
from transfgu.models.backbone import DinoViT
from transfgu.runtime import autocast_dtype, load_run_backbone, resolve_device
from transfgu.stages import stage_hashes
from transfgu.store import Manifest
from transfgu.throughput import compile_forward
from transfgu.training import EpochCallback

if TYPE_CHECKING:  # tracking imports MLflow lazily; the type is only needed by checkers
    from transfgu.tracking import PipelineTracker


class RunContext:
    """The driver-side state of one run; the backbone is built on first use (a Ray driver may never need it)."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.layout = RunLayout(cfg.run_dir)
        self.run_dir = self.layout.root
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest.load(self.run_dir)
        self.hashes = stage_hashes(cfg)
        self.device = resolve_device(cfg.run.device)
        self.amp = autocast_dtype(cfg.backbone.precision, self.device)
        self.errors = ErrorLog(self.layout.errors)
        self.pretrained = cfg.backbone.source.pretrained
        # Set by run_pipeline around each stage: the stage's MLflow child run and an on_epoch(metrics) callback.
        self.tracker: PipelineTracker | None = None
        self.stage_run_id: str | None = None
        self.on_epoch: EpochCallback | None = None

    @cached_property
    def backbone(self) -> DinoViT:
        bb = load_run_backbone(self.cfg.backbone, self.layout, self.cfg.run.seed).to(self.device)
        return compile_forward(bb)  # eval forward compiled on CUDA, eager fallback
