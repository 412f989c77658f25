"""What the stages of one run share, on the driver: config, input hashes, run layout, manifest, device, backbone,
tracking."""

from __future__ import annotations

import json
from functools import cached_property

import torch

from transfgu.config import Config
from transfgu.data.datasets import SUBSET_OPTIONS
from transfgu.errors import ErrorLog
from transfgu.layout import RunLayout
from transfgu.models.backbone import DinoViT
from transfgu.runtime import autocast_dtype, configure_inputs, load_run_backbone, resolve_device
from transfgu.store import Manifest, config_hash
from transfgu.throughput.compile import compile_forward
from transfgu.tracking import PipelineTracker
from transfgu.training import EpochCallback

#: The stages of the method, in order (docs/architecture.md, "Stages").
STAGES = ("extract", "concepts", "label_bank", "train", "evaluate")


def method_stages(cfg: Config) -> tuple[str, ...]:
    """The stages of ``cfg.method``, in order (Leopart's are defined in :mod:`transfgu.leopart.pipeline`)."""
    if cfg.method == "leopart":
        from transfgu.leopart.pipeline import STAGES as LEOPART_STAGES

        return tuple(LEOPART_STAGES)
    if cfg.method == "leopart_finetune":
        from transfgu.leopart.finetune_train import STAGES as FINETUNE_STAGES

        return tuple(FINETUNE_STAGES)
    return STAGES


#: ``train`` fields that only say how the training input is read; left out of the train hash.
TRAIN_INPUT_ONLY = ("num_workers", "image_store")


def stage_hashes(cfg: Config) -> dict[str, str]:
    """Input hash of every stage: its own config sections chained with its upstream stage's hash."""
    if cfg.method == "leopart":
        from transfgu.leopart.pipeline import stage_hashes as leopart_hashes

        return leopart_hashes(cfg)
    if cfg.method == "leopart_finetune":
        from transfgu.leopart.finetune_train import stage_hashes as finetune_hashes

        return finetune_hashes(cfg)
    d = json.loads(cfg.model_dump_json())
    data = {k: v for k, v in d["data"].items() if k != "max_val_images"}
    # Training/evaluation subsets (curated lists) do not change the crop, concept and label-bank stages.
    subsets = {k: v for k, v in data["options"].items() if k in SUBSET_OPTIONS}
    data["options"] = {k: v for k, v in data["options"].items() if k not in SUBSET_OPTIONS}
    h_ex = config_hash({"data": data, "backbone": d["backbone"], "crops": d["crops"], "seed": d["run"]["seed"]})
    h_co = config_hash({"up": h_ex, "concepts": d["concepts"]})
    h_lb = config_hash({"up": h_co, "pseudo": d["pseudo"]})
    # How the training input is read (loader processes, the image store) does not change what training computes.
    train = {k: v for k, v in d["train"].items() if k not in TRAIN_INPUT_ONLY}
    h_tr = config_hash(
        {"up": h_lb, "train": train, "seed": d["run"]["seed"], **({"subsets": subsets} if subsets else {})}
    )
    h_ev = config_hash({"up": h_tr, "eval": d["eval"], "val": d["data"]["val_split"], "n": d["data"]["max_val_images"]})
    return {"extract": h_ex, "concepts": h_co, "label_bank": h_lb, "train": h_tr, "evaluate": h_ev}


def run_backbone(cfg: Config, layout: RunLayout, device: torch.device) -> DinoViT:
    """The run's frozen backbone on ``device``, eval mode, its eval forward compiled (``TRANSFGU_COMPILE``: on CUDA
    by default, eager fallback): the one construction every executor uses (this process, the Ray Data stage actors,
    the Ray Train workers)."""
    bb = load_run_backbone(cfg.backbone, layout, cfg.run.seed).to(device).eval()
    return compile_forward(bb)


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
        configure_inputs(cfg)
        self.pretrained = cfg.backbone.source.pretrained
        # Set by run_pipeline around each stage: the stage's MLflow child run and an on_epoch(metrics) callback.
        self.tracker: PipelineTracker | None = None
        self.stage_run_id: str | None = None
        self.on_epoch: EpochCallback | None = None

    @cached_property
    def backbone(self) -> DinoViT:
        return run_backbone(self.cfg, self.layout, self.device)
