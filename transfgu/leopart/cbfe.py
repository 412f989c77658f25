"""Step 3: cluster-based foreground extraction (CBFE; the Leopart paper's appendix A.1, Leopart's code step 3).

All training patches are clustered with spherical k-means (K = 200). A cluster's *precision* is the fraction of its
patches inside the noisy attention mask, computed per image and averaged over the images where the cluster occurs.
Clusters whose precision reaches a threshold are foreground; every patch of a foreground cluster is foreground.

Threshold: ``label_free`` uses a fixed value (appendix Table 1: 40 % for Leopart IN); ``paper`` picks it as the
authors' script does, from the *training split's ground truth*: sort the clusters by precision, try the cuts that put
55-75 % of them in the background, keep the cut with the best foreground IoU and round its precision to 0.05.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def precision_stats(labels: Sequence[np.ndarray], masks: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: the sum over images of its in-mask fraction, and the number of images it occurs in.

    ``labels[i]`` are the cluster ids of image i's patches, ``masks[i]`` its attention mask. Vectorised over all
    images of the call (one ``bincount`` over image x cluster codes); the results add up over shards.
    """
    if not labels:
        return np.zeros(k), np.zeros(k, dtype=np.int64)
    img = np.concatenate([np.full(len(lab), i, dtype=np.int64) for i, lab in enumerate(labels)])
    lab = np.concatenate([np.asarray(x, dtype=np.int64) for x in labels])
    m = np.concatenate([np.asarray(x, dtype=np.float64) for x in masks])
    code = img * k + lab
    cnt = np.bincount(code, minlength=len(labels) * k).reshape(len(labels), k)
    inside = np.bincount(code, weights=m, minlength=len(labels) * k).reshape(len(labels), k)
    present = cnt > 0
    prec = np.where(present, inside / np.where(present, cnt, 1), 0.0)
    return prec.sum(axis=0), present.sum(axis=0).astype(np.int64)


def cluster_precision(sum_prec: np.ndarray, n_images: np.ndarray) -> np.ndarray:
    """Average per-image precision of every cluster (0 for a cluster that occurs in no image)."""
    n = np.asarray(n_images, dtype=np.float64)
    return np.where(n > 0, np.asarray(sum_prec, dtype=np.float64) / np.where(n > 0, n, 1.0), 0.0)


def foreground_clusters(precision: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean ``(K,)``: clusters whose precision reaches ``threshold``."""
    return np.asarray(precision) >= threshold - 1e-12


def cut_stats(labels: Sequence[np.ndarray], gt_fg: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cluster: labelled pixels and ground-truth foreground pixels (labels and GT at the same resolution;
    ``gt_fg`` is 1 foreground, 0 background, -1 ignored)."""
    lab = np.concatenate([np.asarray(x, dtype=np.int64).ravel() for x in labels])
    g = np.concatenate([np.asarray(x, dtype=np.int64).ravel() for x in gt_fg])
    valid = g >= 0
    pix = np.bincount(lab[valid], minlength=k)
    fg = np.bincount(lab[valid], weights=(g[valid] == 1).astype(np.float64), minlength=k)
    return pix.astype(np.int64), fg.astype(np.int64)


def paper_threshold(
    precision: np.ndarray, pixels: np.ndarray, gt_fg: np.ndarray, lo: float = 0.55, hi: float = 0.75
) -> tuple[float, dict[int, float]]:
    """The authors' threshold choice WITH TRAIN LABELS: the best-IoU cut among those putting ``lo``..``hi`` of the
    clusters in the background; returns ``(threshold rounded to 0.05, {bg clusters: foreground IoU})``."""
    precision = np.asarray(precision, dtype=np.float64)
    k = precision.shape[0]
    order = np.argsort(precision, kind="stable")
    total_fg = float(np.sum(gt_fg))
    ious: dict[int, float] = {}
    for cut in range(math.ceil(lo * k), math.floor(hi * k) + 1):
        fg = order[cut:]
        inter = float(np.sum(gt_fg[fg]))
        union = total_fg + float(np.sum(pixels[fg] - gt_fg[fg]))
        ious[cut] = inter / union if union > 0 else 0.0
    if not ious:
        raise ValueError(f"no CBFE cut between {lo:.0%} and {hi:.0%} of {k} clusters")
    best = max(ious, key=lambda c: (ious[c], -c))
    value = precision[order[min(best, k - 1)]]
    return round(round(value / 0.05) * 0.05, 2), ious
