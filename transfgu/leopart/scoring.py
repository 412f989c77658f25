"""Leopart's evaluation rules: Hungarian matching on matched pixels (the project's evaluator) or on IoU (the authors'
code), unmatched segments as errors or merged into background, and the mean +- std over Infomap seeds.

The authors match communities to classes with the Hungarian algorithm on the *IoU* matrix (``IoU[c, s] =
|c and s| / |c or s|`` over the evaluation pixels), merge every community left unmatched into background, and report
the mean and standard deviation of the val mIoU over 10 Infomap seeds (0-9). With ambiguous segments the IoU-optimal
and the pixel-optimal assignments differ (a small segment entirely inside a class can beat a large one that only half
overlaps it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def iou_matrix(conf: np.ndarray) -> np.ndarray:
    """``(C, S)`` IoU of class ``c`` and segment ``s`` from a ``(classes, segments)`` pixel confusion."""
    conf = np.asarray(conf, dtype=np.float64)
    union = conf.sum(axis=1, keepdims=True) + conf.sum(axis=0, keepdims=True) - conf
    return np.where(union > 0, conf / np.where(union > 0, union, 1.0), 0.0)


def hungarian_iou(conf: np.ndarray) -> np.ndarray:
    """Segment -> class mapping ``(S,)`` (-1 unmatched) of the one-to-one assignment maximising the summed IoU."""
    conf = np.asarray(conf)
    mapping = np.full(conf.shape[1], -1, dtype=np.int64)
    rows, cols = linear_sum_assignment(iou_matrix(conf), maximize=True)
    mapping[cols] = rows
    return mapping


def leopart_scores(conf: np.ndarray, names: Sequence[str], bg: int | None, match: str,
                   unmatched: str) -> dict[str, Any]:
    """Scores of a ``(classes, segments)`` confusion: Hungarian on ``match`` (``pixels`` | ``iou``), segments left
    unmatched as errors (``unmatched: error``) or merged into the background class (``background``)."""
    from transfgu.metrics import hungarian_match, mapped_scores

    conf = np.asarray(conf, dtype=np.int64)
    if match not in ("pixels", "iou"):
        raise ValueError(f"match must be 'pixels' or 'iou', got {match!r}")
    mapping = hungarian_iou(conf) if match == "iou" else hungarian_match(conf, "hungarian")
    if unmatched == "background":
        if bg is None:
            raise ValueError("leopart.unmatched=background needs a data set with a 'background' class")
        mapping[mapping < 0] = bg
    elif unmatched != "error":
        raise ValueError(f"unmatched must be 'error' or 'background', got {unmatched!r}")
    return mapped_scores(conf, mapping, names)


def seed_summary(values: Mapping[int, float]) -> dict[str, Any]:
    """``{"per_seed": {seed: value}, "mean", "std" (population, ddof 0), "n"}`` of per-seed values."""
    v = np.asarray([values[s] for s in sorted(values)], dtype=np.float64)
    return {"per_seed": {str(s): float(values[s]) for s in sorted(values)}, "mean": float(v.mean()),
            "std": float(v.std()), "n": int(v.size)}
