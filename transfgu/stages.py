"""The five stages of the method, each defined once (docs/architecture.md, "Stages").

A stage here is its inputs (the config sections in its input hash, :func:`stage_hashes`), its outputs under the run
layout, its per-item work and its checks. The executors only schedule that work:

* the one-process executor (:mod:`transfgu.local`) runs it in a loop in this process;
* the Ray executor (:mod:`transfgu.distributed`) runs the same per-item code in a Ray Data actor pool (extract,
  label bank), Ray tasks (k-means Lloyd steps, evaluation) or Ray Train workers (training).

================  ==============================  ===================================  =============================
stage             reads                           writes                               per-item work
================  ==============================  ===================================  =============================
extract           images of the training split    ``features/part-*.parquet``          :class:`ExtractStage`
concepts          ``features/``                   ``concepts/``                        :mod:`transfgu.concepts`
label_bank        images, ``concepts/``           ``label_bank/part-*.parquet``        :class:`LabelBankStage`
train             images, ``label_bank/``         ``train/round_*/``, ``model/``       :mod:`transfgu.training`
evaluate          ``model/``, labelled val split  ``eval/`` (+ mapping in model.json)  :mod:`transfgu.evaluate_stage`
================  ==============================  ===================================  =============================

Nothing in this module knows about Ray or MLflow.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from transfgu import integrity
from transfgu.checkpoint import set_cluster_to_class
from transfgu.concepts import ConceptBank, assemble_bank, order_pools
from transfgu.config import Config, CropConfig, PseudoLabelConfig
from transfgu.context import RunContext
from transfgu.crops import extract_crops_batch
from transfgu.data.loaders import split_records
from transfgu.evaluate_stage import evaluate_decoder, has_labelled_val, write_eval
from transfgu.kmeans import KMeansResult
from transfgu.layout import RunLayout
from transfgu.models.backbone import DinoViT
from transfgu.pseudo_labels import concept_map_parts
from transfgu.quality import stage_quality
from transfgu.runtime import pseudo_autocast_dtype
from transfgu.selection import select_student
from transfgu.sharded import SHARD_IMAGES, ShardedStage, training_images
from transfgu.store.atomic import atomic_write_json, to_jsonable
from transfgu.store.formats import LabelMaps, features_table, label_bank_image_ids, label_bank_table
from transfgu.throughput.tensors import prepare_images, to_device
from transfgu.training import build_decoder, load_latest_student, load_model_decoder, write_model

log = logging.getLogger(__name__)

__all__ = ["STAGES", "SHARD_IMAGES", "ExtractStage", "LabelBankStage", "ShardedStage", "training_images"]
#: The stages of the method, in order (docs/architecture.md, "Stages").
STAGES = ("extract", "concepts", "label_bank", "train", "evaluate")


# -- per-item work of the sharded stages -----------------------------------------------------------------------------
def extract_features(
    backbone: DinoViT,
    images: Sequence[np.ndarray] | torch.Tensor,
    image_ids: Sequence[str],
    split: str,
    crops: CropConfig,
    device: torch.device,
    amp: torch.dtype | None = None,
) -> pa.Table:
    """Crop + embed a group of decoded images (the reference's crop stage) into rows of the features table."""
    if len(images) == 0:
        return features_table([], split, [], dim=backbone.embed_dim)
    # ``images`` may already be the resized batch (throughput.tensors.prepare_images, run in the prefetch thread).
    x = images if isinstance(images, torch.Tensor) else prepare_images(images, crops.input_size, crops.resize_mode)
    x = to_device(x, device)
    recs = extract_crops_batch(
        backbone,
        x,
        betas=crops.betas,
        mode=crops.selection,
        th_fg=crops.th_fg,
        th_bg=crops.th_bg,
        crop_size=crops.crop_size,
        batch_size=crops.batch_size,
        autocast_dtype=amp,
        trim_last_pixel=crops.trim_last_pixel,
    )
    return features_table(list(image_ids), split, recs)


def build_label_maps(
    backbone: DinoViT,
    images: Sequence[np.ndarray] | torch.Tensor,
    centroids: np.ndarray,
    pseudo: PseudoLabelConfig,
    device: torch.device,
) -> list[LabelMaps]:
    """Concept maps of a group of decoded images (eq. 5-7) in the lossless label-bank layout.

    Precision comes from ``pseudo.precision`` (float32 by default, also on CUDA), not from ``backbone.precision``:
    the concept decision hinges on gaps far below bf16's resolution.
    """
    out: list[LabelMaps] = []
    amp = pseudo_autocast_dtype(pseudo)
    c = torch.from_numpy(np.asarray(centroids, dtype=np.float32)).to(device)
    k = c.shape[0]
    for start in range(0, len(images), pseudo.batch_size):
        group = images[start : start + pseudo.batch_size]
        x = group if isinstance(group, torch.Tensor) else prepare_images(group, pseudo.input_size, pseudo.resize_mode)
        x = to_device(x, device)
        n = x.shape[0]
        parts, (h, w) = concept_map_parts(
            backbone, x, c, grad_scale=pseudo.grad_scale, mass=pseudo.mass, autocast_dtype=amp
        )
        maps = parts.maps().reshape(n, k, h, w).cpu().numpy()
        a_hat = parts.a_hat.reshape(n, h, w).cpu().numpy()
        gate = parts.gate.reshape(n, k, h, w).cpu().numpy()
        bonus = parts.bonus.reshape(n, k, h, w).cpu().numpy()
        out.extend(LabelMaps.from_parts(a_hat[i], gate[i], bonus[i], maps[i]) for i in range(n))
    return out


class ExtractStage(ShardedStage):
    """Stage 1: crops + CLS features of every training image (paper §3.2) -> ``features/``."""

    name = "extract"

    def prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        return prepare_images(images, self.cfg.crops.input_size, self.cfg.crops.resize_mode)

    def compute(self, images: list[np.ndarray] | torch.Tensor, image_ids: list[str]) -> pa.Table:
        return extract_features(
            self.backbone, images, image_ids, self.cfg.data.train_split, self.cfg.crops, self.device, self.amp
        )

    @classmethod
    def finish(cls, ctx: RunContext, image_ids: Sequence[str]) -> dict[str, Any]:
        info = super().finish(ctx, image_ids)
        if info["rows"] == 0:
            raise RuntimeError(
                "extract: no crops were produced (no readable images, or no window passed the fg/bg test)"
            )
        return info


class LabelBankStage(ShardedStage):
    """Stage 3: the pseudo-label concept maps of every training image (eq. 5-8) -> ``label_bank/``."""

    name = "label_bank"

    def __init__(self, cfg: Config, backbone: DinoViT, device: torch.device, amp: torch.dtype | None,
                 centroids: Sequence[Sequence[float]] | np.ndarray) -> None:
        super().__init__(cfg, backbone, device, amp)
        self.centroids = np.asarray(centroids, dtype=np.float32)

    @classmethod
    def check_inputs(cls, ctx: RunContext) -> None:
        load_checked_concepts(ctx)

    @classmethod
    def worker_inputs(cls, layout: RunLayout) -> dict[str, Any]:
        return {"centroids": ConceptBank.load(layout.concepts).centroids.tolist()}

    def prepare(self, images: list[np.ndarray]) -> torch.Tensor:
        return prepare_images(images, self.cfg.pseudo.input_size, self.cfg.pseudo.resize_mode)

    def compute(self, images: list[np.ndarray] | torch.Tensor, image_ids: list[str]) -> pa.Table:
        maps = build_label_maps(self.backbone, images, self.centroids, self.cfg.pseudo, self.device)
        return label_bank_table(list(image_ids), list(maps))


SHARDED_STAGES: dict[str, type[ShardedStage]] = {"extract": ExtractStage, "label_bank": LabelBankStage}


# -- stage 2: concepts ---------------------------------------------------------------------------------------------
def concept_pools(cfg: Config) -> dict[str, int]:
    """The pools to cluster and their K, in channel order (fg, bg, all, ...)."""
    return {p: int(cfg.concepts.k_per_pool[p]) for p in order_pools(list(cfg.concepts.k_per_pool))}


def finish_concepts(ctx: RunContext, fits: Mapping[str, KMeansResult], extra: dict[str, Any]) -> dict[str, Any]:
    """Stack the per-pool k-means results, write ``concepts/`` and return the manifest info."""
    cfg = ctx.cfg
    for pool, fit in fits.items():
        log.info("[concepts] pool %s: %d crop features", pool, fit.n_points)
    bank = assemble_bank(fits, concept_pools(cfg), seed=cfg.concepts.seed, niter=cfg.concepts.niter, extra=extra)
    bank.save(ctx.layout.concepts)
    integrity.stamp_json(ctx.layout.concepts / ConceptBank.META_FILE, ctx.hashes["concepts"])
    return {"rows": bank.num_concepts, "k": bank.num_concepts}


def load_checked_concepts(ctx: RunContext) -> ConceptBank:
    """The concept bank, after checking that the current concepts stage wrote it (hash) and its values are finite."""
    path = ctx.layout.concepts / ConceptBank.META_FILE
    integrity.check_json_stamp(path, ctx.hashes["concepts"], "the concept bank",
                               "re-run with --force concepts label_bank")
    bank = ConceptBank.load(ctx.layout.concepts)
    k = sum(concept_pools(ctx.cfg).values())
    if bank.num_concepts != k or not np.isfinite(bank.centroids).all():
        raise integrity.IntegrityError(
            f"{path.parent}: {bank.num_concepts} concepts (config asks for {k}) or non-finite centroids; "
            "re-run with --force concepts label_bank"
        )
    return bank


# -- stage 4: train ------------------------------------------------------------------------------------------------
def finish_train(ctx: RunContext, state_dir: Path | None = None) -> dict[str, Any]:
    """Write ``model/`` from the newest training state (or the state in ``state_dir``: the Ray executor's final
    checkpoint) and return the manifest info."""
    cfg = ctx.cfg
    student, state = load_latest_student(cfg, ctx.layout, ctx.backbone.embed_dim, ctx.device, ctx.hashes["train"],
                                         state_dir=state_dir)
    selection = select_student(cfg, ctx.layout.train, student)  # train.select (best_val: the best-on-val epoch)
    write_model(cfg, ctx.layout, student, ctx.backbone, selection, input_hash=ctx.hashes["train"])
    in_bank = label_bank_image_ids(ctx.layout.label_bank)
    n_images = sum(1 for r in split_records(cfg, cfg.data.train_split) if r.image_id in in_bank)
    metrics = state.get("metrics", {})
    return to_jsonable({
        "rows": n_images * cfg.train.repeat,
        "epochs": cfg.train.epochs,
        "rounds": int(state["round"]) + 1,
        "final_loss": float(metrics["loss"]) if "loss" in metrics else None,
        **selection,
    })


# -- stage 5: evaluate ---------------------------------------------------------------------------------------------
def evaluate_model(ctx: RunContext) -> dict[str, Any]:
    """Score ``model/`` on the labelled validation split; write ``eval/`` and the cluster -> class mapping."""
    cfg = ctx.cfg
    if not has_labelled_val(cfg):
        log.info("[evaluate] no labelled validation split configured; skipping")
        return {"rows": 0, "skipped": "no labels"}
    dec = load_model_decoder(cfg, ctx.layout, ctx.backbone.embed_dim, ctx.device, ctx.hashes["train"])
    scores, names, n_images = evaluate_decoder(cfg, ctx.backbone, dec, ctx.device, ctx.amp, errors=ctx.errors)
    meta = json.loads(ctx.layout.model_json.read_text())
    selection = {k: v for k, v in meta.items() if k.startswith("select")}
    write_eval(ctx.layout.eval, scores, names, pretrained=ctx.pretrained, n_images=n_images, selection=selection,
               input_hash=ctx.hashes["evaluate"])
    if not math.isfinite(float(scores["mIoU"])):
        log.warning("[evaluate] mIoU is not defined: the validation images hold no labelled pixel")
    add_stage_quality(ctx)
    # The prediction checkpoint learns which cluster is which class, so `transfgu predict` can name them.
    set_cluster_to_class(ctx.layout.model, np.asarray(scores["mapping"]).tolist())
    return {"rows": n_images, "errors": scores["skipped"], "mIoU": float(scores["mIoU"]),
            "pixel_accuracy": float(scores["pixel_accuracy"]), **selection}


def add_stage_quality(ctx: RunContext) -> None:
    """Concept, pseudo-label and per-round quality (:mod:`transfgu.quality`) into ``eval/metrics.json``."""
    cfg = ctx.cfg

    def score(dec: torch.nn.Module) -> dict[str, Any]:
        return evaluate_decoder(cfg, ctx.backbone, dec, ctx.device, ctx.amp)[0]

    stages_q = stage_quality(ctx.layout.root, cfg, lambda: build_decoder(cfg, ctx.backbone.embed_dim).to(ctx.device),
                             score, ctx.backbone, ctx.device)
    prior = cfg.backbone.source.prior
    metrics = json.loads(ctx.layout.metrics.read_text())
    metrics["prior"] = prior
    if prior != "pretrained":
        metrics["warning"] = f"{prior} backbone (not pretrained): these numbers are not the method's"
    metrics["stages"] = to_jsonable(stages_q)
    atomic_write_json(ctx.layout.metrics, metrics)
