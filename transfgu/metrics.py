"""Unsupervised segmentation metrics: confusion matrix, cluster-to-class matching, mIoU, pixel accuracy.

Conventions: the confusion matrix is ``(n_classes, n_clusters)`` with ground-truth classes as rows and
predicted cluster ids as columns, accumulated over the whole evaluation split before any matching (one
matching per split, as the reference does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

Overcluster = Literal["hungarian", "majority"]


def _as_int_array(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x).astype(np.int64, copy=False).ravel()


def confusion_matrix(
    gt: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    n_classes: int,
    n_clusters: int,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """``(n_classes, n_clusters)`` int64 counts of (GT class, predicted cluster) pairs.

    Pixels whose GT equals ``ignore_index`` or lies outside ``[0, n_classes)`` (e.g. -1 or 255) are skipped.
    Predictions must lie in ``[0, n_clusters)``. Torch inputs are counted on their own device.
    """
    if isinstance(gt, torch.Tensor) and isinstance(pred, torch.Tensor):
        g = gt.reshape(-1).long()
        p = pred.reshape(-1).to(g.device).long()
        if g.shape != p.shape:
            raise ValueError(f"gt and pred sizes differ: {tuple(gt.shape)} vs {tuple(pred.shape)}")
        valid = (g >= 0) & (g < n_classes)
        if ignore_index is not None:
            valid &= g != ignore_index
        g, p = g[valid], p[valid]
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= n_clusters):
            raise ValueError(f"predicted ids must lie in [0, {n_clusters})")
        counts = torch.bincount(g * n_clusters + p, minlength=n_classes * n_clusters)
        return counts.cpu().numpy().astype(np.int64).reshape(n_classes, n_clusters)
    g = _as_int_array(gt)
    p = _as_int_array(pred)
    if g.shape != p.shape:
        raise ValueError(f"gt and pred sizes differ: {g.shape} vs {p.shape}")
    valid = (g >= 0) & (g < n_classes)
    if ignore_index is not None:
        valid &= g != ignore_index
    g, p = g[valid], p[valid]
    if p.size and (p.min() < 0 or p.max() >= n_clusters):
        raise ValueError(f"predicted ids must lie in [0, {n_clusters})")
    counts = np.bincount(g * n_clusters + p, minlength=n_classes * n_clusters)
    return counts.astype(np.int64).reshape(n_classes, n_clusters)


def hungarian_match(conf: np.ndarray, overcluster: Overcluster = "hungarian") -> np.ndarray:
    """Map every predicted cluster to a GT class: returns ``cluster_to_class`` of length K (-1 = unmatched).

    ``"hungarian"`` (the reference's evaluation): a one-to-one assignment that maximises the matched pixel count,
    computed with ``scipy.optimize.linear_sum_assignment`` on the rectangular ``C x K`` matrix. With K == C
    every cluster gets a class. With K > C (over-clustering) C of the K clusters are matched and the other
    K - C map to -1: their pixels count as errors, i.e. as false negatives of their GT class, and no class
    receives them as false positives. With K < C some classes get no cluster (their IoU is 0 if they occur in
    the GT).

    ``"majority"``: many-to-one, every cluster goes to the GT class it overlaps most (as some over-clustering
    papers report); clusters with no pixels map to -1.
    """
    conf = np.asarray(conf)
    n_classes, n_clusters = conf.shape
    mapping = np.full(n_clusters, -1, dtype=np.int64)
    if overcluster == "hungarian":
        rows, cols = linear_sum_assignment(conf, maximize=True)
        mapping[cols] = rows
    elif overcluster == "majority":
        has_pixels = conf.sum(axis=0) > 0
        mapping[has_pixels] = conf.argmax(axis=0)[has_pixels]
    else:
        raise ValueError(f"overcluster must be 'hungarian' or 'majority', got {overcluster!r}")
    return mapping


def matched_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """``(C, C)`` confusion after relabelling clusters by ``mapping``; unmatched clusters dropped."""
    conf = np.asarray(conf)
    n_classes = conf.shape[0]
    out = np.zeros((n_classes, n_classes), dtype=np.int64)
    for k, c in enumerate(mapping):
        if c >= 0:
            out[:, c] += conf[:, k]
    return out


def segmentation_scores(
    conf: np.ndarray,
    class_names: Sequence[str] | None = None,
    overcluster: Overcluster = "hungarian",
) -> dict[str, Any]:
    """mIoU and pixel accuracy of a ``(C, K)`` confusion matrix after cluster-to-class matching.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)`` where FN_c counts every GT pixel of class c that is not predicted
    as c, including pixels of unmatched clusters; ``mIoU`` is the nanmean over classes, so classes absent from
    both GT and prediction are skipped. Pixel accuracy is ``sum_c TP_c / (all labelled pixels)``.

    Returns a dict with ``mIoU``, ``pixel_accuracy`` (fractions in [0, 1]), ``per_class_iou`` ({name: IoU or
    NaN}), ``mapping`` (list: cluster -> class, -1 unmatched), ``n_clusters`` and ``n_classes``.
    """
    conf = np.asarray(conf, dtype=np.int64)
    return mapped_scores(conf, hungarian_match(conf, overcluster), class_names)


def mapped_scores(conf: np.ndarray, mapping: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`segmentation_scores` for a given cluster -> class ``mapping`` (-1: unmatched): the one IoU definition
    shared by the Hungarian/overclustering evaluation, Leopart's unmatched-to-background merge and the probe."""
    conf = np.asarray(conf, dtype=np.int64)
    mapping = np.asarray(mapping, dtype=np.int64)
    n_classes, n_clusters = conf.shape
    names = list(class_names) if class_names is not None else [str(c) for c in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} classes")
    m = matched_confusion(conf, mapping)
    tp = np.diag(m).astype(np.float64)
    gt_total = conf.sum(axis=1).astype(np.float64)  # includes pixels of unmatched clusters
    pred_total = m.sum(axis=0).astype(np.float64)
    denom = gt_total + pred_total - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)
    total = conf.sum()
    miou = float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan")
    return {
        "mIoU": miou,
        "pixel_accuracy": float(tp.sum() / total) if total > 0 else float("nan"),
        "per_class_iou": {name: float(v) for name, v in zip(names, iou)},
        "mapping": mapping.tolist(),
        "n_clusters": int(n_clusters),
        "n_classes": int(n_classes),
    }


class RunningConfusion:
    """Confusion matrix accumulated batch by batch over a split (mergeable across workers with ``+=``)."""

    def __init__(self, n_classes: int, n_clusters: int, ignore_index: int | None = 255) -> None:
        self.n_classes = n_classes
        self.n_clusters = n_clusters
        self.ignore_index = ignore_index
        self.conf = np.zeros((n_classes, n_clusters), dtype=np.int64)

    def update(self, gt: np.ndarray | torch.Tensor, pred: np.ndarray | torch.Tensor) -> None:
        self.conf += confusion_matrix(gt, pred, self.n_classes, self.n_clusters, self.ignore_index)

    def __iadd__(self, other: RunningConfusion) -> RunningConfusion:
        if other.conf.shape != self.conf.shape:
            raise ValueError("cannot merge confusion matrices of different shapes")
        self.conf += other.conf
        return self

    def reset(self) -> None:
        self.conf[...] = 0

    def scores(
        self, class_names: Sequence[str] | None = None, overcluster: Overcluster = "hungarian"
    ) -> dict[str, Any]:
        return segmentation_scores(self.conf, class_names=class_names, overcluster=overcluster)
