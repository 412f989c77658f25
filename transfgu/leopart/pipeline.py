"""The Leopart stages, defined once and run by either executor (one process here, Ray in
``transfgu.distributed.executor``).

=============  ==============================================================================================
stage          output (``<run>/...``)
=============  ==============================================================================================
dense          ``dense/<split>/part-*.parquet``: patch tokens + head-mean CLS attention per image (train, val)
pca            ``pca/``: standardisation + PCA fit on the training split (additive per-shard statistics)
cbfe           ``cbfe/``: spherical k-means centroids, per-cluster precision, threshold, foreground flags
communities    ``communities/``: foreground-cluster centroids, co-occurrence matrix, Infomap modules;
               ``model/``: the CBFE + CD prediction checkpoint
segments       ``segments/<split>/part-*.parquet``: segment and cluster maps (patch grid) of every image
evaluate       ``eval/``: Hungarian matching of segments at ``leopart.eval_size``, overclustering at each K
=============  ==============================================================================================

Every stage is ``run_x(ctx, ex)`` (:class:`transfgu.method.Executor`) and asks its executor for three things only:
run the dense extraction over a split (a :class:`transfgu.sharded.ShardedStage`: planned by image id and stamped
like TransFGU's extract), hold dense files in memory (:class:`~transfgu.leopart.shards.DenseShards`, one in this
process or one Ray actor per group of files), apply a function to every file; the numbers are reduced here, in file
order, so both executors write the same files. Every output records the input hash of the stage that wrote it
(:mod:`transfgu.integrity`): dense and segment shards in their Parquet metadata, ``pca.json``, ``cbfe.json``,
``communities.json``, ``model.json``, ``segments.json`` and ``metrics.json`` in an ``input_hash`` field. The method
(stages, hash inputs, outputs) is :mod:`transfgu.methods.leopart`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors.numpy import load_file, save_file

from transfgu import integrity
from transfgu.config import Config, LeopartConfig
from transfgu.context import RunContext
from transfgu.data.datasets import ImageRecord
from transfgu.data.loaders import EvalDataset, dataset_classes, split_records
from transfgu.errors import ErrorLog, check_error_budget
from transfgu.evaluate_stage import has_labelled_val, write_eval
from transfgu.kmeans import KMeansResult, lloyd_kmeans
from transfgu.layout import RunLayout
from transfgu.leopart import cbfe as cbfe_mod
from transfgu.leopart.communities import (
    AUTHORS_ANGLES,
    community_map,
    cooccurrence_matrix,
    detect_communities,
    glcm_offsets,
    network_edges,
)
from transfgu.leopart.dense import dense_features, dense_table, read_dense
from transfgu.leopart.model import LeopartModel, save_leopart_model, upsample_labels
from transfgu.leopart.pca import PCA, MomentStats, fit_pca, reduce_moments
from transfgu.leopart.probe import evaluate_probe, train_linear_probe
from transfgu.leopart.shards import DenseShards
from transfgu.leopart.viz import community_graph_png
from transfgu.method import Executor, StageInfo
from transfgu.metrics import RunningConfusion, hungarian_match, mapped_scores
from transfgu.models.backbone import DinoViT
from transfgu.sharded import ShardedStage
from transfgu.store import atomic_write_json, fix_mode, list_parquet_files, write_parquet_atomic

log = logging.getLogger("transfgu")

STAGES = ("dense", "pca", "cbfe", "communities", "segments", "evaluate")

SEGMENTS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("h", pa.int32(), nullable=False),
    pa.field("w", pa.int32(), nullable=False),
    pa.field("segments", pa.list_(pa.int32()), nullable=False),
    pa.field("clusters", pa.list_(pa.int32()), nullable=False),
], metadata={"format": "transfgu.leopart.segments/1"})


#: The label-free values of the choices ``leopart.protocol`` sets (see :class:`transfgu.config.LeopartConfig`).
LABEL_FREE: dict[str, Any] = {
    "cbfe_attention": "backbone", "cbfe_attention_arch": "vit_small_patch16", "cbfe_attention_weights": None,
    "fit_splits": "train", "val_precision": "train", "cooc_angles": "even", "cooc_presence": "occurs",
    "match": "pixels", "infomap_runs": 1, "overcluster_split": "train", "overcluster_seeds": 1,
    "overcluster_spherical": True,
}


def fit_files(cfg: Config, run_dir: Path, input_hash: str | None = None) -> list[Path]:
    """Dense files the fits use: the training split's, then val's under ``leopart.fit_splits: train+val`` (the
    authors' transductive PCA, k-means and co-occurrence)."""
    files = dense_files(run_dir, cfg.data.train_split, input_hash)
    if cfg.leopart.fit_splits == "train+val" and len(splits(cfg)) > 1:
        files = files + dense_files(run_dir, cfg.data.val_split, input_hash)
    return files


def splits(cfg: Config) -> list[str]:
    """Training split, plus the validation split when one is configured."""
    out = [cfg.data.train_split]
    if cfg.data.val_split is not None and cfg.data.val_split != cfg.data.train_split:
        out.append(cfg.data.val_split)
    return out


def mask_kwargs(cfg: Config) -> dict[str, Any]:
    lp = cfg.leopart
    return {"mass": lp.attn_mass, "kernel": lp.blur_kernel, "sigma": lp.blur_sigma, "min_component": lp.min_component}


def kmeans_options(lp: LeopartConfig) -> dict[str, Any]:
    """The spherical k-means options of CBFE and overclustering (:func:`transfgu.kmeans.lloyd_kmeans`)."""
    return {"normalize": lp.kmeans_points == "l2_normalized",
            "max_points_per_centroid": lp.kmeans_max_points_per_centroid}


def file_moments(path: str) -> MomentStats:
    """PCA statistics of one dense file (all its patch tokens)."""
    imgs = read_dense(path)
    if not imgs:
        raise ValueError(f"{path} holds no image")
    return MomentStats.of(np.concatenate([im.feats for im in imgs]))


def dense_rows(backbone: DinoViT, images: list[np.ndarray], ids: list[str], cfg: Config, device: torch.device,
               amp: torch.dtype | None) -> pa.Table:
    """The dense stage's table for one shard of decoded images (both executors)."""
    lp = cfg.leopart
    outputs = dense_features(backbone, images, tuple(lp.input_size), device, lp.batch_size, amp)
    if lp.cbfe_attention == "weights":  # CBFE's attention from another ViT (the authors: DINO ViT-S/16)
        outputs = with_attention_of(attention_backbone(lp.cbfe_attention_arch, str(lp.cbfe_attention_weights),
                                                       device), outputs, images, cfg, device, amp)
    return dense_table(ids, outputs)


_ATTENTION_BACKBONES: dict[tuple[str, str, str], Any] = {}


def attention_backbone(arch: str, weights: str, device: Any) -> Any:
    """The ViT of ``leopart.cbfe_attention: weights``, built once per process (a dense worker keeps it)."""
    from transfgu.models.backbone import build_backbone

    key = (arch, weights, str(device))
    if key not in _ATTENTION_BACKBONES:
        _ATTENTION_BACKBONES[key] = build_backbone(arch, weights).to(device)
    return _ATTENTION_BACKBONES[key]


def with_attention_of(attn_backbone: Any, outputs: list, images: list[np.ndarray], cfg: Config, device: Any,
                      amp: Any) -> list:
    """``outputs`` (``(feats, attn, grid)`` per image) with ``attn`` replaced by ``attn_backbone``'s head-mean CLS
    attention at the same input size, resized bilinearly to the evaluated backbone's patch grid when the two grids
    differ (a ViT-B/8 evaluated with ViT-S/16 attention), then renormalised to sum 1."""
    import torch
    import torch.nn.functional as F

    lp = cfg.leopart
    other = dense_features(attn_backbone, images, tuple(lp.input_size), device, lp.batch_size, amp)
    out = []
    for (feats, _, grid), (_, a, g2) in zip(outputs, other):
        a = np.asarray(a, dtype=np.float32)
        if tuple(g2) != tuple(grid):
            t = torch.from_numpy(a.reshape(1, 1, *g2))
            a = F.interpolate(t, size=tuple(grid), mode="bilinear", align_corners=False).numpy().ravel()
            a = a / max(float(a.sum()), 1e-12)
        out.append((feats, a, grid))
    return out


class DenseStage(ShardedStage):
    """The dense step of one split (:func:`dense_stage`): patch tokens + head-mean CLS attention per image."""

    name = "dense"
    split: ClassVar[str]

    @classmethod
    def output(cls, layout: RunLayout) -> Path:
        return layout.root / "dense" / cls.split

    @classmethod
    def records(cls, cfg: Config) -> list[ImageRecord]:
        return split_records(cfg, cls.split)

    def compute(self, images: list[np.ndarray] | torch.Tensor, image_ids: list[str]) -> pa.Table:
        return dense_rows(self.backbone, list(images), image_ids, self.cfg, self.device, self.amp)


def dense_stage(split: str) -> type[DenseStage]:
    """The dense step of ``split`` as a :class:`transfgu.sharded.ShardedStage`: its records and output directory are
    that split's; both executors plan it by image id and stamp its shards with the dense hash."""
    return type(f"DenseStage_{split}", (DenseStage,), {"split": split})


# -- stages --------------------------------------------------------------------------------------------------------
def dense_files(run_dir: Path, split: str, input_hash: str | None = None) -> list[Path]:
    """The dense files of ``split``; with ``input_hash``, after checking that the current dense stage wrote them."""
    d = run_dir / "dense" / split
    files = list_parquet_files(d) if d.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no dense features under {d}; run the dense stage first")
    if input_hash is not None:
        integrity.require_stamped(d, "dense", input_hash)
    return files


def run_dense(ctx: RunContext, ex: Executor) -> StageInfo:
    """Dense tokens of every split, one stamped shard per ``SHARD_IMAGES`` images, resumed by image id."""
    cfg = ctx.cfg
    info: dict[str, Any] = {"rows": 0, "errors": 0}
    for split in splits(cfg):
        got = ex.run_sharded(ctx, dense_stage(split))  # verify_shards + the error budget of the split
        if split == cfg.data.train_split and got["rows"] == 0:
            raise RuntimeError("dense: no training image could be read")
        info[f"{split}_images"] = int(got["rows"])
        info["rows"] += int(got["rows"])
        info["errors"] += int(got["errors"])
    return info


def run_pca(ctx: RunContext, ex: Executor) -> StageInfo:
    cfg = ctx.cfg
    parts = ex.map_files(file_moments, fit_files(cfg, ctx.run_dir, ctx.hashes["dense"]))
    pca = fit_pca(reduce_moments(parts), cfg.leopart.pca_dim)
    pca.save(ctx.run_dir / "pca")
    integrity.stamp_json(ctx.run_dir / "pca" / "pca.json", ctx.hashes["pca"])
    kept = float(pca.eigenvalues.sum() / pca.mean.shape[0])  # standardised: the total variance is d
    return {"rows": pca.n, "dim": pca.dim, "variance_kept": round(kept, 4)}


def load_checked_pca(ctx: RunContext) -> PCA:
    """The PCA, after checking that the current pca stage wrote it."""
    integrity.check_json_stamp(ctx.run_dir / "pca" / "pca.json", ctx.hashes["pca"], "the PCA",
                               "re-run with --force pca")
    return PCA.load(ctx.run_dir / "pca")


def load_checked_model(ctx: RunContext, upto: str) -> LeopartModel:
    """:func:`load_model` after checking that the current ``upto`` stage (and so every stage before it) wrote it."""
    meta = ctx.run_dir / upto / f"{upto}.json"
    integrity.check_json_stamp(meta, ctx.hashes[upto], f"the {upto} fit", f"re-run with --force {upto}")
    return load_model(ctx.run_dir, upto)


def load_model(run_dir: Path, upto: str) -> LeopartModel:
    """The model as far as ``upto`` (``cbfe`` or ``communities``) has fitted it."""
    pca = PCA.load(run_dir / "pca")
    c = load_file(str(run_dir / "cbfe" / "cbfe.safetensors"))
    model = LeopartModel(pca, c["centroids"], c["foreground"].astype(bool))
    if "foreground_val" in c:  # val's own CBFE flags (leopart.val_precision: val)
        val_split = json.loads((run_dir / "cbfe" / "cbfe.json").read_text())["val_split"]
        model.foreground_by_dir[str(run_dir / "dense" / val_split)] = c["foreground_val"].astype(bool)
    if upto == "communities":
        t = load_file(str(run_dir / "communities" / "communities.safetensors"))
        model.cd_centroids = t["centroids"]
        model.cluster_to_segment = t["cluster_to_segment"]
    return model


def _fg_classes(cfg: Config) -> tuple[tuple[str, ...], int | None]:
    """Class names and the background class index (None when the data set has no background class)."""
    names, _, _ = dataset_classes(cfg)
    bg = [i for i, n in enumerate(names) if n.strip().lower() in ("background", "bg", "_background_")]
    return names, (bg[0] if bg else None)


def _gt_at(cfg: Config, split: str, errors: ErrorLog, stage: str,
           size: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """Ground truth of a split at ``size`` (default ``leopart.eval_size``) by image id (-1 = ignore); bad samples
    are recorded."""
    names, ignore, label_map = dataset_classes(cfg)
    records = split_records(cfg, split)
    size = tuple(size) if size is not None else tuple(cfg.leopart.eval_size)
    ds = EvalDataset(records, label_map, size, ignore, errors=errors, stage=stage)
    check_error_budget(len(ds.skipped), len(records), cfg.run.error_budget, stage)
    return {rec.image_id: ds[i]["label"].numpy() for i, rec in enumerate(ds.records)}


def run_cbfe(ctx: RunContext, ex: Executor) -> StageInfo:
    cfg, lp = ctx.cfg, ctx.cfg.leopart
    pca = load_checked_pca(ctx)
    files = fit_files(cfg, ctx.run_dir)
    n_train = len(dense_files(ctx.run_dir, cfg.data.train_split))
    own_val = lp.val_precision == "val" and len(splits(cfg)) > 1
    if own_val and len(files) == n_train:  # val's precision needs val's masks in the shards
        files = files + dense_files(ctx.run_dir, cfg.data.val_split)
    shards = ex.hold(DenseShards, files, pca, mask_kwargs(cfg))
    val_precision = None
    try:
        if lp.fit_splits == "train+val" or not own_val:
            fit = lloyd_kmeans(shards, lp.k_cbfe, lp.cbfe_niter, lp.seed, spherical=True, nredo=lp.cbfe_nredo,
                               **kmeans_options(lp), name="cbfe")
        else:  # fitted on train only, val's precision from val's masks: the val files join afterwards
            train_only = ex.hold(DenseShards, files[:n_train], pca, mask_kwargs(cfg))
            try:
                fit = lloyd_kmeans(train_only, lp.k_cbfe, lp.cbfe_niter, lp.seed, spherical=True,
                                   nredo=lp.cbfe_nredo, **kmeans_options(lp), name="cbfe")
            finally:
                ex.release(train_only)
        model = LeopartModel(pca, fit.centroids, np.zeros(lp.k_cbfe, dtype=bool))
        parts = shards.precision_stats(model)
        precision = cbfe_mod.cluster_precision(*_sum_precision(parts[:n_train], lp.k_cbfe))  # file order
        if own_val:
            val_precision = cbfe_mod.cluster_precision(*_sum_precision(parts[n_train:], lp.k_cbfe))
        info: dict[str, Any] = {"protocol": lp.protocol, "labels_used": lp.protocol == "paper"}
        if lp.protocol == "paper" and _fg_classes(cfg)[1] is not None:
            threshold, ious = _paper_threshold(ctx, shards, model, precision)
            info["cut_iou"] = {str(k): v for k, v in ious.items()}
        elif lp.protocol == "paper":  # the authors' cut search scores foreground IoU: it needs a background class
            threshold = lp.precision_threshold
            info["labels_used"] = False
            info["threshold_rule"] = "fixed: the data set has no background class for the authors' cut search"
            log.info("[cbfe] protocol=paper without a background class: fixed threshold %.2f", threshold)
        else:
            threshold = lp.precision_threshold
        fg = cbfe_mod.foreground_clusters(precision, threshold)
    finally:
        ex.release(shards)
    out = ctx.run_dir / "cbfe"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "cbfe.safetensors.tmp"
    arrays = {"centroids": fit.centroids, "precision": precision, "foreground": fg.astype(np.uint8)}
    if val_precision is not None:  # the authors: the threshold applied to val's own precision
        arrays["precision_val"] = val_precision
        arrays["foreground_val"] = cbfe_mod.foreground_clusters(val_precision, threshold).astype(np.uint8)
        info["val_split"] = cfg.data.val_split
        info["n_foreground_clusters_val"] = int(arrays["foreground_val"].sum())
    info["fit_splits"] = lp.fit_splits
    save_file(arrays, str(tmp))
    fix_mode(tmp)  # safetensors writes 0600; the umask decides
    tmp.replace(out / "cbfe.safetensors")
    meta = {**info, "k": lp.k_cbfe, "threshold": threshold, "n_foreground_clusters": int(fg.sum()),
            "objective": fit.objective[-1], "redo": fit.redo, "n_points": fit.n_points,
            "precision": [round(float(p), 6) for p in precision], "input_hash": ctx.hashes["cbfe"]}
    atomic_write_json(out / "cbfe.json", meta)
    log.info("[cbfe] threshold %.2f: %d of %d clusters foreground", threshold, int(fg.sum()), lp.k_cbfe)
    return {"rows": fit.n_points, "threshold": threshold, "foreground_clusters": int(fg.sum()),
            "labels_used": info["labels_used"]}


def _sum_precision(parts: Sequence[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-file CBFE precision sums and image counts added up in file order."""
    sum_prec, n_img = np.zeros(k), np.zeros(k, dtype=np.int64)
    for sp_, n_ in parts:
        sum_prec += sp_
        n_img += n_
    return sum_prec, n_img


def _paper_threshold(ctx: RunContext, shards: DenseShards, model: LeopartModel,
                     precision: np.ndarray) -> tuple[float, dict]:
    """The authors' CBFE threshold, chosen WITH THE TRAINING SPLIT'S LABELS (``protocol: paper``)."""
    cfg = ctx.cfg
    _, bg = _fg_classes(cfg)
    if bg is None:
        raise ValueError("leopart.protocol=paper needs a data set with a 'background' class (its CBFE threshold is "
                         "chosen from foreground IoU against the training labels); use protocol=label_free")
    gt = _gt_at(cfg, cfg.data.train_split, ctx.errors, "cbfe")
    labs, fgs = [], []
    for file_maps in shards.label_maps(model, "cbfe"):
        for image_id, m in file_maps:
            if image_id in gt:
                g = gt[image_id]
                labs.append(upsample_labels(m, g.shape))
                fgs.append(np.where(g < 0, -1, (g != bg).astype(np.int64)))
    if not labs:
        raise RuntimeError("cbfe: no training image has a readable label (protocol=paper)")
    pix, gfg = cbfe_mod.cut_stats(labs, fgs, model.cbfe_centroids.shape[0])
    return cbfe_mod.paper_threshold(precision, pix, gfg)


def _n_communities(cfg: Config) -> int | None:
    if cfg.leopart.n_communities is not None:
        return cfg.leopart.n_communities
    if cfg.data.name == "folder":
        return None
    names, bg = _fg_classes(cfg)
    return len(names) - (1 if bg is not None else 0)


def leopart_model_meta(cfg: Config, pretrained: bool, input_hash: str | None = None) -> dict[str, Any]:
    names = dataset_classes(cfg)[0] if cfg.data.name != "folder" else ()
    return {
        "method": "leopart",
        "backbone": {"arch": cfg.backbone.arch, "weights": cfg.backbone.weights, "pretrained": pretrained},
        "input_size": list(cfg.leopart.input_size),
        "eval_size": list(cfg.leopart.eval_size),
        "class_names": list(names),
        "cluster_to_class": None,
        "config": json.loads(cfg.model_dump_json()),
        **({"input_hash": input_hash} if input_hash is not None else {}),
    }


def _fit_network(shards: DenseShards, model: LeopartModel, k: int,
                 lp: LeopartConfig) -> tuple[KMeansResult, np.ndarray]:
    """Foreground overclustering at ``k`` (the shards' selection must be the CBFE foreground) and its averaged
    co-occurrence matrix; sets ``model.cd_centroids``."""
    fit = lloyd_kmeans(shards, k, lp.community_niter, lp.seed, nredo=lp.community_nredo,
                       max_points_per_centroid=lp.kmeans_max_points_per_centroid, name=f"communities k={k}")
    model.cd_centroids = fit.centroids
    angles = AUTHORS_ANGLES if lp.cooc_angles == "authors" else None
    parts = shards.cooc_stats(model, tuple(lp.cooc_size) if lp.cooc_size else None, glcm_offsets(angles=angles))
    n = k + 1
    sum_norm = np.zeros((n, n))
    n_present = np.zeros(n, dtype=np.int64)
    for s, c, r in parts:  # file order
        sum_norm += s
        n_present += r if lp.cooc_presence == "row_sum" else c
    return fit, cooccurrence_matrix(sum_norm, n_present)


def segment_scores(conf: np.ndarray, names: Sequence[str], bg: int | None, unmatched: str,
                   match: str = "pixels") -> dict[str, Any]:
    """Hungarian scores of a ``(classes, segments)`` confusion on ``match`` (``leopart.match``: pixels | iou),
    unmatched segments per ``leopart.unmatched`` (:func:`transfgu.leopart.scoring.leopart_scores`)."""
    from transfgu.leopart.scoring import leopart_scores

    return leopart_scores(conf, names, bg, match, unmatched_rule(unmatched, bg))


def unmatched_rule(unmatched: str, bg: int | None) -> str:
    """``background`` needs a background class to merge into; a data set without one (MSRC) keeps ``error``."""
    return "error" if unmatched == "background" and bg is None else unmatched


def _paper_grid_search(ctx: RunContext, shards: DenseShards, model: LeopartModel, n_fg: int) -> dict[str, Any]:
    """``protocol: paper``: k_community x Markov time x edge threshold chosen by Hungarian mIoU on the TRAINING
    SPLIT'S LABELS (the authors' Optuna search on PVOC train, here a grid). The cluster confusion against the
    training labels is counted once per k; a partition's segment confusion is its columns summed by community."""
    cfg, lp = ctx.cfg, ctx.cfg.leopart
    names, bg = _fg_classes(cfg)
    gt = _gt_at(cfg, cfg.data.train_split, ctx.errors, "communities")
    if not gt:
        raise RuntimeError("communities: no training image has a readable label (protocol=paper)")
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for k in sorted(set(lp.paper_grid.k_community)):
        if k > n_fg:
            trials.append({"k_community": k, "skipped": f"{n_fg} foreground patches, fewer than k"})
            log.info("[communities] grid: k=%d skipped (%d foreground patches)", k, n_fg)
            continue
        fit, m = _fit_network(shards, model, k, lp)
        conf = RunningConfusion(len(names), k + 1, ignore_index=None)
        for file_maps in shards.label_maps(model, "clusters"):
            for image_id, cm in file_maps:
                if image_id in gt:
                    conf.update(gt[image_id], upsample_labels(cm, gt[image_id].shape))
        for mt in lp.paper_grid.markov_time:
            for thr in lp.paper_grid.edge_threshold:
                edges = network_edges(m, thr)
                comm = detect_communities(k + 1, edges, mt, _n_communities(cfg), lp.seed, lp.infomap_trials)
                seg = community_map(k + 1, comm.modules, bg_node=k)
                seg_conf = conf.conf @ np.eye(int(seg.max()) + 1, dtype=np.int64)[seg]  # columns summed by segment
                score = segment_scores(seg_conf, names, bg, lp.unmatched, lp.match)["mIoU"]
                trials.append({"k_community": k, "markov_time": mt, "edge_threshold": thr,
                               "train_mIoU": round(float(score), 6), "n_segments": int(seg.max()) + 1})
                log.info("[communities] grid (train labels): k=%d markov_time=%g edge_threshold=%g -> train mIoU "
                         "%.4f", k, mt, thr, score)
                if not np.isfinite(score):  # nothing labelled to score: never chosen over a scored setting
                    score = -np.inf
                if best is None or score > best["score"]:  # ties: the first in grid order
                    best = {"score": float(score), "k": k, "markov_time": mt, "edge_threshold": thr, "fit": fit,
                            "matrix": m, "edges": edges, "comm": comm, "seg": seg}
    if best is None:
        raise ValueError(f"communities: every leopart.paper_grid.k_community {lp.paper_grid.k_community} exceeds the "
                         f"{n_fg} foreground patches; lower them or use more images")
    best["trials"] = trials
    return best


def run_communities(ctx: RunContext, ex: Executor) -> StageInfo:
    cfg, lp = ctx.cfg, ctx.cfg.leopart
    model = load_checked_model(ctx, "cbfe")
    shards = ex.hold(DenseShards, fit_files(cfg, ctx.run_dir), model.pca, mask_kwargs(cfg))
    selection: dict[str, Any]
    try:
        n_fg = int(sum(shards.select_foreground(model)))
        if lp.protocol == "paper":
            best = _paper_grid_search(ctx, shards, model, n_fg)
            k, markov_time, edge_threshold = best["k"], best["markov_time"], best["edge_threshold"]
            fit, m, edges, comm = best["fit"], best["matrix"], best["edges"], best["comm"]
            model.cd_centroids = fit.centroids
            selection = {"selected_with": "train labels", "criterion": "Hungarian mIoU on the training split at "
                         "leopart.eval_size", "train_mIoU": best["score"], "trials": best["trials"]}
            log.info("[communities] SELECTED WITH TRAIN LABELS: k_community=%d markov_time=%g edge_threshold=%g "
                     "(train mIoU %.4f)", k, markov_time, edge_threshold, best["score"])
        else:
            k, markov_time, edge_threshold = lp.k_community, lp.markov_time, lp.edge_threshold
            if n_fg < k:
                raise ValueError(f"communities: {n_fg} foreground patches, fewer than leopart.k_community="
                                 f"{k}; lower it, lower leopart.precision_threshold or use more images")
            fit, m = _fit_network(shards, model, k, lp)
            comm = None
            selection = {"selected_with": "fixed values (no labels)"}
    finally:
        ex.release(shards)
    n = k + 1
    if comm is None:
        edges = network_edges(m, edge_threshold)
        comm = detect_communities(n, edges, markov_time, _n_communities(cfg), lp.seed, lp.infomap_trials)
    model.cluster_to_segment = community_map(n, comm.modules, bg_node=k)
    # the authors evaluate Infomap over several seeds (0-9): every run's partition is kept, the model is the first
    runs = [model.cluster_to_segment]
    run_info = [{"seed": lp.seed, "codelength": comm.codelength, "num_modules": comm.num_modules,
                 "n_segments": model.n_segments}]
    for r in range(1, lp.infomap_runs):
        c_r = detect_communities(n, edges, markov_time, _n_communities(cfg), lp.seed + r, lp.infomap_trials)
        runs.append(community_map(n, c_r.modules, bg_node=k))
        run_info.append({"seed": lp.seed + r, "codelength": c_r.codelength, "num_modules": c_r.num_modules,
                         "n_segments": int(runs[-1].max()) + 1})
    out = ctx.run_dir / "communities"
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "communities.safetensors.tmp"
    save_file({"centroids": fit.centroids, "cooccurrence": m, "cluster_to_segment": model.cluster_to_segment,
               "cluster_to_segment_runs": np.stack(runs).astype(np.int64)}, str(tmp))
    fix_mode(tmp)  # safetensors writes 0600; the umask decides
    tmp.replace(out / "communities.safetensors")
    meta = {"k": k, "n_nodes": n, "background_node": k, "n_edges": len(edges),
            "edges": [[i, j, round(w, 6)] for i, j, w in edges],
            "modules": {str(k): v for k, v in comm.modules.items()},
            "codelength": comm.codelength, "num_modules": comm.num_modules, "n_segments": model.n_segments,
            "markov_time": markov_time, "edge_threshold": edge_threshold,
            "preferred_modules": _n_communities(cfg), "objective": fit.objective[-1], "n_points": fit.n_points,
            "selection": selection, "infomap_runs": run_info, "fit_splits": lp.fit_splits,
            "cooc_angles": lp.cooc_angles, "cooc_presence": lp.cooc_presence, "input_hash": ctx.hashes["communities"]}
    atomic_write_json(out / "communities.json", meta)
    community_graph_png(edges, model.cluster_to_segment, k, out / "graph.png")
    save_leopart_model(ctx.run_dir / "model", model, leopart_model_meta(cfg, ctx.pretrained, ctx.hashes["communities"]),
               backbone=ctx.backbone)
    log.info("[communities] %d edges, %d Infomap modules, %d segments (codelength %.4f)", len(edges),
             comm.num_modules, model.n_segments, comm.codelength)
    return {"rows": fit.n_points, "edges": len(edges), "segments": model.n_segments, "codelength": comm.codelength,
            "k_community": k, "markov_time": markov_time, "edge_threshold": edge_threshold,
            "selected_with": selection["selected_with"]}


def segments_table(seg_maps: list[tuple[str, np.ndarray]], cl_maps: list[tuple[str, np.ndarray]]) -> pa.Table:
    return pa.Table.from_arrays([
        pa.array([i for i, _ in seg_maps], pa.string()),
        pa.array([m.shape[0] for _, m in seg_maps], pa.int32()),
        pa.array([m.shape[1] for _, m in seg_maps], pa.int32()),
        pa.array([m.ravel().astype(np.int32) for _, m in seg_maps], pa.list_(pa.int32())),
        pa.array([m.ravel().astype(np.int32) for _, m in cl_maps], pa.list_(pa.int32())),
    ], schema=SEGMENTS_SCHEMA)


def run_segments(ctx: RunContext, ex: Executor) -> StageInfo:
    cfg = ctx.cfg
    model = load_checked_model(ctx, "communities")
    h = ctx.hashes["segments"]
    files = [(split, f) for split in splits(cfg) for f in dense_files(ctx.run_dir, split)]
    # one group of holders for every split
    shards = ex.hold(DenseShards, [f for _, f in files], model.pca, mask_kwargs(cfg))
    try:
        segs = shards.label_maps(model, "segments")
        cls = shards.label_maps(model, "clusters")
    finally:
        ex.release(shards)
    rows = 0
    for (split, f), s, c in zip(files, segs, cls):
        out = ctx.run_dir / "segments" / split
        out.mkdir(parents=True, exist_ok=True)
        # stamped as the dense shard it maps: same ids (decode failures included), the segments hash
        dense = integrity.read_stamp(Path(f))
        table = integrity.stamp_table(segments_table(s, c), h, dense.image_ids or [i for i, _ in s], dense.failed_ids)
        write_parquet_atomic(table, out / Path(f).name)
        rows += len(s)
    for split in splits(cfg):
        ids = [r.image_id for r in split_records(cfg, split)]
        integrity.verify_shards(ctx.run_dir / "segments" / split, "segments", h, ids)
    # written last: the stage's stamp (an interrupted stage leaves none, and its files are set aside on re-run)
    atomic_write_json(ctx.run_dir / "segments" / "segments.json",
                      {"rows": rows, "segments": model.n_segments, "input_hash": h})
    return {"rows": rows, "segments": model.n_segments}


def read_segments(run_dir: Path, split: str, column: str = "segments") -> dict[str, np.ndarray]:
    """Segment maps ``(h, w)`` of a split by image id (``column="clusters"``: the foreground-cluster maps)."""
    out: dict[str, np.ndarray] = {}
    for f in list_parquet_files(run_dir / "segments" / split):
        t = pq.read_table(f)
        for i, h, w, s in zip(t["image_id"].to_pylist(), t["h"].to_pylist(), t["w"].to_pylist(),
                              t[column].to_pylist()):
            out[i] = np.asarray(s, dtype=np.int64).reshape(h, w)
    return out


def scores_unmatched_to_background(conf: np.ndarray, names: Sequence[str], bg: int) -> dict[str, Any]:
    """Hungarian matching, then every unmatched segment counted as background (the authors' evaluation).

    Same IoU definition as :func:`transfgu.metrics.segmentation_scores`, on the merged matching.
    """
    conf = np.asarray(conf, dtype=np.int64)
    mapping = hungarian_match(conf, "hungarian")
    mapping[mapping < 0] = bg
    return mapped_scores(conf, mapping, names)


def run_evaluate(ctx: RunContext, ex: Executor) -> StageInfo:
    cfg, lp = ctx.cfg, ctx.cfg.leopart
    if not has_labelled_val(cfg):
        log.info("[evaluate] no labelled validation split configured; skipping")
        return {"rows": 0, "skipped": "no labels"}
    names, bg = _fg_classes(cfg)
    gt = _gt_at(cfg, cfg.data.val_split, ctx.errors, "evaluate")
    integrity.check_json_stamp(ctx.run_dir / "segments" / "segments.json", ctx.hashes["segments"], "the segments",
                               "re-run with --force segments")
    segs = read_segments(ctx.run_dir, cfg.data.val_split)
    model = load_checked_model(ctx, "communities")
    conf = RunningConfusion(len(names), model.n_segments, ignore_index=None)
    ids = [i for i in gt if i in segs]
    for i in ids:
        conf.update(gt[i], upsample_labels(segs[i], gt[i].shape))
    scores = segment_scores(conf.conf, names, bg, lp.unmatched, lp.match)
    scores["confusion"] = conf.conf
    metrics = write_eval(ctx.run_dir / "eval", scores, names, pretrained=ctx.pretrained, n_images=len(ids))
    seeds = infomap_seed_scores(ctx.run_dir, cfg, gt, names, bg)
    over = overclustering(ctx, ex, gt, names) if lp.overcluster_k else {}
    probe = linear_probe(ctx, names) if lp.linear_probe.enabled else None
    comm_meta = json.loads((ctx.run_dir / "communities" / "communities.json").read_text())
    sel = comm_meta.get("selection") or {}
    metrics.update({
        "method": "leopart", "protocol": lp.protocol, "labels_used_for_fitting": lp.protocol == "paper",
        "eval_size": list(lp.eval_size), "unmatched": unmatched_rule(lp.unmatched, bg), "match": lp.match,
        "n_segments": model.n_segments, "infomap_seeds": seeds,
        "prior": cfg.backbone.source.prior,
        "overclustering": over,
        "hyperparameters": {"k_community": comm_meta.get("k"), "markov_time": comm_meta.get("markov_time"),
                            "edge_threshold": comm_meta.get("edge_threshold"),
                            "selected_with": sel.get("selected_with", "fixed values (no labels)"),
                            **({"train_mIoU": sel["train_mIoU"]} if "train_mIoU" in sel else {})},
        **({"linear_probe": probe} if probe is not None else {}),
        "note": "mIoU: Hungarian matching of label-free segments; overclustering maps clusters to classes WITH "
                "labels (many-to-one, precision-based), as Leopart reports it",
        "input_hash": ctx.hashes["evaluate"],
    })
    atomic_write_json(ctx.run_dir / "eval" / "metrics.json", metrics)
    meta_path = ctx.run_dir / "model" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["cluster_to_class"] = [int(x) for x in scores["mapping"]]
    atomic_write_json(meta_path, meta)
    seed_metrics = {"mIoU_mean": seeds["mIoU"]["mean"], "mIoU_std": seeds["mIoU"]["std"],
                    **{f"mIoU_seed_{s}": v for s, v in seeds["mIoU"]["per_seed"].items()}}
    return {"rows": len(ids), "mIoU": float(scores["mIoU"]), "pixel_accuracy": float(scores["pixel_accuracy"]),
            **seed_metrics,
            **{f"overcluster_{k}_mIoU": v["mIoU"] for k, v in over.items()},
            **({"linear_probe_mIoU": probe["mIoU"]} if probe is not None else {})}


def infomap_seed_scores(run_dir: Path, cfg: Config, gt: dict[str, np.ndarray], names: Sequence[str],
                        bg: int | None) -> dict[str, Any]:
    """Val scores of every Infomap run of the communities stage (``leopart.infomap_runs`` seeds) and their mean +-
    std (:func:`transfgu.leopart.scoring.seed_summary`). The val cluster confusion is counted once; a run's segment
    confusion is its columns summed by that run's communities."""
    from transfgu.leopart.scoring import seed_summary
    from transfgu.metrics import RunningConfusion

    lp = cfg.leopart
    t = load_file(str(run_dir / "communities" / "communities.safetensors"))
    runs = t["cluster_to_segment_runs"] if "cluster_to_segment_runs" in t else t["cluster_to_segment"][None]
    info = json.loads((run_dir / "communities" / "communities.json").read_text()).get("infomap_runs") or []
    seeds = [int(r["seed"]) for r in info] if len(info) == len(runs) else [lp.seed + r for r in range(len(runs))]
    clusters = read_segments(run_dir, cfg.data.val_split, "clusters")
    conf = RunningConfusion(len(names), runs.shape[1], ignore_index=None)
    for i in gt:
        if i in clusters:
            conf.update(gt[i], upsample_labels(clusters[i], gt[i].shape))
    miou, acc = {}, {}
    for s, seg in zip(seeds, runs):
        seg_conf = conf.conf @ np.eye(int(seg.max()) + 1, dtype=np.int64)[seg]  # columns summed by segment
        sc = segment_scores(seg_conf, names, bg, lp.unmatched, lp.match)
        miou[s], acc[s] = float(sc["mIoU"]), float(sc["pixel_accuracy"])
    return {"mIoU": seed_summary(miou), "pixel_accuracy": seed_summary(acc), "match": lp.match,
            "unmatched": unmatched_rule(lp.unmatched, bg)}


def _dense_with_labels(run_dir: Path, split: str, gt: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray],
                                                                                      tuple[int, int]]:
    """Frozen tokens ``(N, h*w, d)`` and label maps of the images of ``split`` that have both, in file order."""
    feats, labels, grids = [], [], set()
    for f in dense_files(run_dir, split):
        for im in read_dense(f):
            if im.image_id in gt:
                feats.append(im.feats)
                labels.append(gt[im.image_id])
                grids.add(tuple(im.grid))
    if not feats:
        raise RuntimeError(f"linear probe: no image of split {split!r} has both dense features and a label")
    if len(grids) != 1:
        raise ValueError(f"linear probe: dense grids differ within split {split!r}: {sorted(grids)}")
    return np.stack(feats), labels, grids.pop()


def linear_probe(ctx: RunContext, names: Sequence[str]) -> dict[str, Any]:
    """The optional linear probe (``leopart.linear_probe.enabled``; :mod:`transfgu.leopart.probe`): trained WITH
    THE TRAINING SPLIT'S LABELS on the frozen dense tokens of the dense stage, scored on val. It runs in the driver
    process for both executors (one linear layer; the inputs are the same files)."""
    cfg, pc = ctx.cfg, ctx.cfg.leopart.linear_probe
    gt_train = _gt_at(cfg, cfg.data.train_split, ctx.errors, "evaluate", pc.train_size)
    x_train, y_train, grid = _dense_with_labels(ctx.run_dir, cfg.data.train_split, gt_train)
    head, losses = train_linear_probe(x_train, np.stack(y_train), grid, len(names), epochs=pc.epochs, lr=pc.lr,
                                      lr_drop_epoch=pc.lr_drop_epoch, batch_size=pc.batch_size,
                                      momentum=pc.momentum, seed=cfg.leopart.seed,
                                      weight_decay=float(pc.weight_decay or 0.0), augment=bool(pc.augment))
    gt_val = _gt_at(cfg, cfg.data.val_split, ctx.errors, "evaluate", pc.eval_size)
    x_val, y_val, _ = _dense_with_labels(ctx.run_dir, cfg.data.val_split, gt_val)
    s = evaluate_probe(head, x_val, y_val, grid, names)
    log.info("[evaluate] linear probe (TRAINED WITH LABELS): mIoU %.4f on %d val images", s["mIoU"], len(y_val))
    return {**s, "labels_used": True, "n_train_images": int(x_train.shape[0]), "n_val_images": len(y_val),
            "train_size": list(pc.train_size), "eval_size": list(pc.eval_size), "epochs": pc.epochs, "lr": pc.lr,
            "weight_decay": pc.weight_decay, "augment": pc.augment,
            "losses": [round(v, 6) for v in losses],
            "note": "a linear layer on the frozen dense tokens trained with the training labels: a feature-quality "
                    "number, not an unsupervised one"}


def overclustering(ctx: RunContext, ex: Executor, gt: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, Any]:
    """k-means of the patches at each K (fitted on ``leopart.overcluster_split``, spherical or not per
    ``overcluster_spherical``), val patches assigned, clusters mapped to classes many-to-one by majority overlap
    (WITH labels), mIoU at ``leopart.eval_size``; averaged over ``overcluster_seeds`` seeds (the authors: fitted on
    val, Euclidean, 5 seeds)."""
    from transfgu.leopart.scoring import seed_summary
    from transfgu.metrics import RunningConfusion

    cfg, lp = ctx.cfg, ctx.cfg.leopart
    pca = load_checked_pca(ctx)
    seeds = [lp.seed + r for r in range(lp.overcluster_seeds)]
    spherical = bool(lp.overcluster_spherical)
    fit_split = cfg.data.val_split if lp.overcluster_split == "val" else cfg.data.train_split
    fits: dict[str, list[np.ndarray]] = {}
    train = ex.hold(DenseShards, dense_files(ctx.run_dir, fit_split), pca, mask_kwargs(cfg))
    try:  # one group of holders at a time: the fitting patches, then the val patches
        n_train = int(sum(train.counts()))
        for k in lp.overcluster_k:
            fits[str(k)] = [lloyd_kmeans(train, min(k, n_train), lp.cbfe_niter, seed, spherical=spherical,
                                         **(kmeans_options(lp) if spherical else {}),
                                         name=f"overcluster{k}").centroids for seed in seeds]
    finally:
        ex.release(train)
    out: dict[str, Any] = {}
    val = ex.hold(DenseShards, dense_files(ctx.run_dir, cfg.data.val_split), pca, mask_kwargs(cfg))
    try:
        for k, per_seed in fits.items():
            miou, acc = {}, {}
            for seed, centroids in zip(seeds, per_seed):
                kk = int(centroids.shape[0])
                conf = RunningConfusion(len(names), kk, ignore_index=None)
                for file_maps in val.assign_maps(centroids, spherical):  # unit centroids: largest cosine
                    for image_id, m in file_maps:
                        if image_id in gt:
                            conf.update(gt[image_id], upsample_labels(m, gt[image_id].shape))
                sc = conf.scores(names, overcluster="majority")
                miou[seed], acc[seed] = float(sc["mIoU"]), float(sc["pixel_accuracy"])
            rec: dict[str, Any] = {"k": kk, "mIoU": float(np.mean(list(miou.values()))),
                                   "pixel_accuracy": float(np.mean(list(acc.values())))}
            if len(seeds) > 1:
                rec.update({"mIoU_std": seed_summary(miou)["std"], "per_seed": seed_summary(miou)["per_seed"],
                            "fitted_on": fit_split, "spherical": spherical})
            out[k] = rec
            log.info("[evaluate] overclustering K=%d: mIoU %.4f (%d seeds)", kk, rec["mIoU"], len(seeds))
    finally:
        ex.release(val)
    return out
