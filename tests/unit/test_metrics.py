"""Confusion matrix, Hungarian / majority matching and mIoU against brute force and hand-computed cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from transfgu.metrics import (
    RunningConfusion,
    confusion_matrix,
    hungarian_match,
    segmentation_scores,
)


def naive_confusion(gt, pred, c, k, ignore):
    m = np.zeros((c, k), dtype=np.int64)
    for g, p in zip(np.ravel(gt), np.ravel(pred)):
        if g == ignore or g < 0 or g >= c:
            continue
        m[g, p] += 1
    return m


def scores_of_assignment(conf: np.ndarray, cls_to_cluster: dict[int, int]) -> tuple[float, float]:
    """mIoU and accuracy of an explicit one-to-one class -> cluster assignment, from the definitions."""
    c = conf.shape[0]
    ious = []
    tp_sum = 0
    for cls in range(c):
        k = cls_to_cluster.get(cls)
        tp = conf[cls, k] if k is not None else 0
        fn = conf[cls].sum() - tp
        fp = (conf[:, k].sum() - tp) if k is not None else 0
        tp_sum += tp
        ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
    vals = [v for v in ious if not math.isnan(v)]
    return (sum(vals) / len(vals) if vals else math.nan), tp_sum / conf.sum()


def brute_force(conf: np.ndarray):
    """All one-to-one assignments of the C classes to distinct clusters (K >= C); best by matched pixels."""
    c, k = conf.shape
    best_tp, results = -1, []
    for clusters in itertools.permutations(range(k), c):
        tp = sum(conf[i, clusters[i]] for i in range(c))
        res = scores_of_assignment(conf, dict(enumerate(clusters)))
        if tp > best_tp:
            best_tp, results = tp, [res]
        elif tp == best_tp:
            results.append(res)
    return best_tp, results


def test_confusion_matrix_vs_loop_numpy_and_torch():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 6, size=(3, 7, 9))
    gt[gt == 5] = 255  # ignore
    gt[0, 0, :3] = -1  # out of range -> ignored too
    pred = rng.integers(0, 7, size=(3, 7, 9))
    want = naive_confusion(gt, pred, 5, 7, 255)
    got = confusion_matrix(gt, pred, 5, 7, ignore_index=255)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(confusion_matrix(torch.from_numpy(gt), torch.from_numpy(pred), 5, 7), want)
    assert got.sum() == int(((gt >= 0) & (gt < 5)).sum())
    with pytest.raises(ValueError):
        confusion_matrix(gt, pred, 5, 6)  # prediction id 6 out of range


def test_hand_computed_example():
    # GT rows, prediction columns. Cluster 1 is mostly class 0, cluster 0 mostly class 1.
    conf = np.array([[2, 8, 0], [6, 1, 0], [0, 0, 3]])
    s = segmentation_scores(conf, class_names=["a", "b", "c"])
    assert s["mapping"] == [1, 0, 2]
    # a: TP 8, FN 2, FP 1 -> 8/11; b: TP 6, FN 1, FP 2 -> 6/9; c: 3/3
    assert s["per_class_iou"] == pytest.approx({"a": 8 / 11, "b": 6 / 9, "c": 1.0})
    assert s["mIoU"] == pytest.approx((8 / 11 + 6 / 9 + 1) / 3)
    assert s["pixel_accuracy"] == pytest.approx(17 / 20)
    assert s["n_clusters"] == 3


def test_overclustering_hand_example():
    # 2 classes, 3 clusters: clusters 0 and 2 both mostly class 0.
    conf = np.array([[5, 1, 4], [0, 6, 1]])
    s = segmentation_scores(conf)
    assert s["mapping"] == [0, 1, -1]
    # class 0: TP 5, FN 5 (incl. 4 px of the unmatched cluster), FP 0 -> 0.5
    # class 1: TP 6, FN 1, FP 1 -> 0.75
    assert s["per_class_iou"]["0"] == pytest.approx(0.5)
    assert s["per_class_iou"]["1"] == pytest.approx(0.75)
    assert s["pixel_accuracy"] == pytest.approx(11 / 17)
    m = segmentation_scores(conf, overcluster="majority")
    assert m["mapping"] == [0, 1, 0]
    # class 0: TP 9, FN 1, FP 1 -> 9/11; class 1: TP 6, FN 1, FP 1 -> 6/8
    assert m["per_class_iou"] == pytest.approx({"0": 9 / 11, "1": 6 / 8})
    assert m["pixel_accuracy"] == pytest.approx(15 / 17)


def test_nanmean_skips_absent_classes():
    conf = np.array([[4, 0, 0], [0, 0, 0], [1, 0, 5]])  # class 1 never in GT and cluster 1 never predicted
    s = segmentation_scores(conf)
    assert math.isnan(s["per_class_iou"]["1"])
    assert s["mIoU"] == pytest.approx((4 / 5 + 5 / 6) / 2)
    # a class absent from GT but predicted has IoU 0, not NaN
    conf = np.array([[4, 2], [0, 0]])
    s = segmentation_scores(conf)
    assert s["per_class_iou"]["1"] == 0.0 and s["mIoU"] == pytest.approx((4 / 6 + 0) / 2)


@pytest.mark.parametrize("seed", range(40))
def test_hungarian_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    c = int(rng.integers(1, 6))
    k = int(rng.integers(c, 7))
    conf = rng.integers(0, 60, size=(c, k)) * (rng.random((c, k)) < 0.7)
    if seed % 5 == 0:
        conf[rng.integers(c)] = 0  # a class absent from GT
    if conf.sum() == 0:
        conf[0, 0] = 1
    s = segmentation_scores(conf)
    mapping = np.array(s["mapping"])
    assert (mapping >= 0).sum() == c and len(set(mapping[mapping >= 0])) == c
    best_tp, results = brute_force(conf)
    assert s["pixel_accuracy"] == pytest.approx(best_tp / conf.sum())
    # among equally good assignments the mIoU may differ: ours must be one of them
    assert any(
        (math.isnan(r[0]) and math.isnan(s["mIoU"])) or r[0] == pytest.approx(s["mIoU"]) for r in results
    )


@pytest.mark.parametrize("seed", range(10))
def test_invariance_to_relabelling_predictions(seed):
    rng = np.random.default_rng(100 + seed)
    c, k = 4, 6
    gt = rng.integers(0, c, size=2000)
    pred = np.where(rng.random(2000) < 0.6, (gt * 7 + 1) % k, rng.integers(0, k, size=2000))
    perm = rng.permutation(k)
    a = segmentation_scores(confusion_matrix(gt, pred, c, k))
    b = segmentation_scores(confusion_matrix(gt, perm[pred], c, k))
    assert a["mIoU"] == pytest.approx(b["mIoU"]) and a["pixel_accuracy"] == pytest.approx(b["pixel_accuracy"])
    assert a["per_class_iou"] == pytest.approx(b["per_class_iou"])


def test_perfect_prediction_under_any_permutation():
    rng = np.random.default_rng(7)
    gt = rng.integers(0, 5, size=(4, 10, 10))
    perm = rng.permutation(5)
    s = segmentation_scores(confusion_matrix(gt, perm[gt], 5, 5))
    assert s["mIoU"] == pytest.approx(1.0) and s["pixel_accuracy"] == pytest.approx(1.0)
    assert [s["mapping"][perm[c]] for c in range(5)] == list(range(5))


def test_fewer_clusters_than_classes():
    conf = np.array([[5, 0], [0, 3], [2, 0]])
    s = segmentation_scores(conf)
    assert sorted(s["mapping"]) == [0, 1]
    assert s["per_class_iou"]["2"] == 0.0
    assert hungarian_match(conf).tolist() == [0, 1]


def test_running_confusion_and_ignore():
    rng = np.random.default_rng(3)
    run = RunningConfusion(3, 4, ignore_index=-1)
    total = np.zeros((3, 4), dtype=np.int64)
    for _ in range(3):
        gt = torch.from_numpy(rng.integers(-1, 3, size=(2, 5, 5)))
        pred = torch.from_numpy(rng.integers(0, 4, size=(2, 5, 5)))
        run.update(gt, pred)
        total += naive_confusion(gt.numpy(), pred.numpy(), 3, 4, -1)
    np.testing.assert_array_equal(run.conf, total)
    other = RunningConfusion(3, 4, ignore_index=-1)
    other.update(np.array([0, 1]), np.array([3, 3]))
    run += other
    assert run.conf[0, 3] == total[0, 3] + 1 and run.conf[1, 3] == total[1, 3] + 1
    assert run.scores()["n_classes"] == 3
    run.reset()
    assert run.conf.sum() == 0
    # ignored pixels do not change any score
    gt = np.array([0, 0, 1, 1, 255, 255])
    pred = np.array([1, 1, 0, 0, 0, 1])
    s = segmentation_scores(confusion_matrix(gt, pred, 2, 2, ignore_index=255))
    assert s["pixel_accuracy"] == 1.0 and s["mIoU"] == 1.0
