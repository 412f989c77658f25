"""The small configurations of the tests: each method's preset shrunk to a tiny random ViT on a few real images."""

from __future__ import annotations

from pathlib import Path

from helpers.data import REPO, require_shared_data

#: The tiny whole-method config of the tests and the quick benchmarks.
TINY_CONFIG = REPO / "conf" / "tiny.yaml"


def _load(preset: Path, overrides: dict[str, str]):
    from transfgu.config import load_config

    return load_config(preset, [f"{k}={v}" for k, v in overrides.items()])


def tiny_config(run_root: Path, name: str = "tiny", **over: str):
    """``conf/tiny.yaml`` on the shared CamVid images: tiny random ViT, 6 training images, two epochs."""
    camvid = require_shared_data("camvid")
    return _load(TINY_CONFIG, {"data.root": str(camvid), "run.root": str(run_root), "run.name": name, **over})


def leopart_config(run_root: Path, name: str = "lp", **over: str):
    """conf/leopart_horse.yaml shrunk for tests: a tiny random ViT on a few real Weizmann-horse images."""
    horse = require_shared_data("weizmann_horse")
    overrides = {
        "data.root": str(horse), "data.max_train_images": "12", "data.max_val_images": "8",
        "backbone.arch": "vit_test_tiny", "leopart.input_size": "[64, 64]", "leopart.pca_dim": "16",
        "leopart.k_cbfe": "12", "leopart.cbfe_niter": "10", "leopart.cbfe_nredo": "2", "leopart.k_community": "8",
        "leopart.community_niter": "10", "leopart.cooc_size": "[32, 32]", "leopart.edge_threshold": "0.02",
        "leopart.overcluster_k": "[5, 10]", "leopart.eval_size": "[32, 32]",
        "run.root": str(run_root), "run.name": name, "mlflow.enabled": "false", "run.report": "false",
    }
    overrides.update(over)
    return _load(REPO / "conf" / "leopart_horse.yaml", overrides)


def finetune_config(run_root: Path, name: str = "ft", **over: str):
    """conf/leopart_finetune_tiny.yaml on the shared CamVid images (tiny random ViT, 6 images)."""
    camvid = require_shared_data("camvid")
    overrides = {"data.root": str(camvid), "run.root": str(run_root), "run.name": name, "run.report": "false",
                 **over}
    return _load(REPO / "conf" / "leopart_finetune_tiny.yaml", overrides)


#: 6 epochs of 1 step (batch 6) of Leopart's fine-tuning: the first epoch runs without the queue (it fills in that
#: step), so a loss is compared from the second epoch on.
FINETUNE_LEARN = {"finetune.epochs": "6", "finetune.batch_size": "6", "finetune.lr_head": "3e-3"}
