"""Process set-up shared by every executor: seeding, the device, autocast, and the run's backbone."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

from transfgu.config import BackboneConfig, Config, PseudoLabelConfig
from transfgu.data.io import set_max_image_pixels
from transfgu.layout import RunLayout
from transfgu.models.backbone import DinoViT, build_backbone, save_backbone_weights

log = logging.getLogger(__name__)


def configure_inputs(cfg: Config) -> None:
    """Per-process input limits from the config (every process that decodes images calls this)."""
    set_max_image_pixels(cfg.data.max_image_pixels)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present; asking for CUDA on a machine without it is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("run.device=cuda was requested but no CUDA device is available; use run.device=cpu or auto")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it (``precision=auto``), else full precision."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def pseudo_autocast_dtype(pseudo: PseudoLabelConfig) -> torch.dtype | None:
    """The pseudo-label pass runs in float32 on every device unless ``pseudo.precision=bf16`` opts in (issue 12)."""
    return torch.bfloat16 if pseudo.precision == "bf16" else None


def load_run_backbone(cfg: BackboneConfig, layout: RunLayout | None, seed: int) -> DinoViT:
    """Build the backbone of a run. A random backbone is saved once in the run directory and reloaded afterwards,
    so every stage (and every Ray worker) of the run sees the same weights. ``cfg.pos_embed`` picks the
    position-embedding resampling (timm's or DINO's)."""
    bb = _load_run_backbone(cfg, layout, seed)
    bb.pos_embed_mode = cfg.pos_embed
    return bb


def _load_run_backbone(cfg: BackboneConfig, layout: RunLayout | None, seed: int) -> DinoViT:
    src = cfg.source
    if src.kind != "random" or layout is None:  # (a stand-in file is not pretrained, but it is not random either)
        torch.manual_seed(seed)
        return build_backbone(cfg.arch, cfg.weights)
    path = layout.random_backbone
    if path.is_file():
        bb = build_backbone(cfg.arch, str(path))
        bb.pretrained = False
        bb.weights = "none"
        bb.prior = "random"
        return bb
    torch.manual_seed(seed)
    bb = build_backbone(cfg.arch, "none")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_backbone_weights(bb, path)
    log.info("random backbone weights saved to %s so this run can be reproduced", path)
    return bb
