"""Leopart's ``protocol: paper``: the evaluation and fitting rules of the authors' code, each against a hand
computation or a brute force written here (co-occurrence offsets and presence rule, Hungarian on IoU, the Infomap
seed mean, val's own CBFE precision, train + val fits), and an end-to-end paper run on real Weizmann-horse images."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from transfgu.leopart.communities import (
    AUTHORS_ANGLES,
    cooccurrence_matrix,
    cooccurrence_stats,
    glcm_offsets,
)
from transfgu.leopart.scoring import hungarian_iou, iou_matrix, leopart_scores, seed_summary


# -- co-occurrence -----------------------------------------------------------------------------------------------------
def test_authors_offsets_by_hand():
    # (round(sin a * d), round(cos a * d)); cos(4 pi / 3) is -0.5000000000000004 in floating point, so 4 pi / 3
    # at d = 1 rounds to (-1, -1), as 5 pi / 4 would; at d = 2 it is (-2, -1), where 5 pi / 4 gives (-1, -1)
    assert glcm_offsets((1, 2), angles=AUTHORS_ANGLES) == [
        (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1),
        (0, 2), (1, 1), (2, 0), (1, -1), (0, -2), (-2, -1), (-2, 0), (-1, 1),
    ]
    assert AUTHORS_ANGLES[5] == pytest.approx(4 * math.pi / 3)
    assert glcm_offsets((1, 2), angles=AUTHORS_ANGLES) != glcm_offsets((1, 2))


def _brute(maps: np.ndarray, n: int, offsets, presence: str) -> np.ndarray:
    """Per image, pixel by pixel: directed pair counts over the offsets, diagonal zeroed, rows normalised; each row
    averaged over the images where the cluster occurs (``occurs``) or where its row sum is > 0 (``row_sum``)."""
    total = np.zeros((n, n))
    count = np.zeros(n)
    for m in maps:
        c = np.zeros((n, n))
        h, w = m.shape
        for r in range(h):
            for q in range(w):
                for dr, dc in offsets:
                    if 0 <= r + dr < h and 0 <= q + dc < w:
                        c[m[r, q], m[r + dr, q + dc]] += 1
        np.fill_diagonal(c, 0)
        rows = c.sum(axis=1)
        for i in range(n):
            if rows[i] > 0:
                total[i] += c[i] / rows[i]
            if (presence == "occurs" and (m == i).any()) or (presence == "row_sum" and rows[i] > 0):
                count[i] += 1
    return np.where(count[:, None] > 0, total / np.maximum(count, 1)[:, None], 0.0)


def test_cooccurrence_with_the_authors_offsets_and_presence_rule_equals_brute_force():
    rng = np.random.default_rng(4)
    n = 5
    maps = rng.integers(0, n, size=(4, 7, 6))
    maps[1] = 0
    maps[1, 3, 3] = 4  # cluster 4 alone among 0s: its row sums > 0
    maps[2] = 2
    maps[2, 0, 0] = 3  # image 2: cluster 2 has neighbours; cluster 1 absent
    maps[3] = 1  # image 3: only cluster 1 -- it occurs, but its row sum is 0 (no other cluster at any offset)
    off = glcm_offsets((1, 2), angles=AUTHORS_ANGLES)
    s, occurs, row_sum = cooccurrence_stats(maps, n, off)
    np.testing.assert_allclose(cooccurrence_matrix(s, row_sum), _brute(maps, n, off, "row_sum"), atol=1e-12)
    np.testing.assert_allclose(cooccurrence_matrix(s, occurs), _brute(maps, n, off, "occurs"), atol=1e-12)
    assert occurs[1] == row_sum[1] + 1  # image 3 counts for cluster 1 only under the label-free rule
    assert not np.allclose(cooccurrence_matrix(s, row_sum)[1], cooccurrence_matrix(s, occurs)[1])


# -- matching and seeds ------------------------------------------------------------------------------------------------
def test_hungarian_on_iou_differs_from_pixel_matching_as_brute_force_says():
    # class 0: 120 px, class 1: 30 px; segment 0: 110 px, segment 1: 40 px
    conf = np.array([[80, 40], [30, 0]])
    iou = iou_matrix(conf)
    assert iou[0, 1] == pytest.approx(40 / (120 + 40 - 40)) and iou[1, 0] == pytest.approx(30 / (30 + 110 - 30))

    def best(score):  # every one-to-one assignment of the 2 segments, the best kept
        return max(itertools.permutations(range(2)), key=lambda p: sum(score[c, p[c]] for c in range(2)))

    by_pixels, by_iou = best(conf), best(iou)
    assert by_pixels == (0, 1) and by_iou == (1, 0)  # they differ here
    mapping = hungarian_iou(conf)  # segment -> class
    assert [int(mapping[by_iou[c]]) for c in range(2)] == [0, 1]
    px = leopart_scores(conf, ["bg", "obj"], 0, "pixels", "error")
    io = leopart_scores(conf, ["bg", "obj"], 0, "iou", "error")
    assert px["mapping"] == [0, 1] and io["mapping"] == [1, 0]
    # by hand: IoU matching scores class 0 with segment 1 (40 / 120) and class 1 with segment 0 (30 / 110)
    assert io["mIoU"] == pytest.approx((40 / 120 + 30 / 110) / 2)
    assert px["mIoU"] == pytest.approx((80 / 150 + 0.0) / 2)


def test_unmatched_segments_merge_into_background():
    conf = np.array([[50, 10, 5], [5, 40, 0]])  # 3 segments, 2 classes: segment 2 stays unmatched
    err = leopart_scores(conf, ["bg", "obj"], 0, "iou", "error")
    bg = leopart_scores(conf, ["bg", "obj"], 0, "iou", "background")
    assert err["mapping"][2] == -1 and bg["mapping"][2] == 0
    # background IoU by hand: tp 50 + 5, predicted bg 50 + 5 + 5 + 0 = 60, gt bg 65
    assert bg["per_class_iou"]["bg"] == pytest.approx(55 / (65 + 60 - 55))


def test_without_a_background_class_unmatched_segments_stay_errors():
    from transfgu.leopart.pipeline import unmatched_rule

    assert unmatched_rule("background", None) == "error" and unmatched_rule("background", 0) == "background"
    with pytest.raises(ValueError, match="background"):  # the scoring itself never merges into no class
        leopart_scores(np.array([[3, 1], [0, 2]]), ["a", "b"], None, "iou", "background")


def test_seed_summary_is_the_mean_and_population_std():
    vals = {s: 0.1 * s + 0.05 * (s % 3) for s in range(10)}
    out = seed_summary(vals)
    v = [vals[s] for s in range(10)]
    mean = sum(v) / 10
    assert out["n"] == 10 and list(out["per_seed"]) == [str(s) for s in range(10)]
    assert out["mean"] == pytest.approx(mean)
    assert out["std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in v) / 10))


def test_probe_augmentation_crops_logits_and_labels_alike():
    import torch

    from transfgu.leopart.probe import augment_pair

    g = torch.Generator().manual_seed(0)
    labels = torch.zeros(20, 24, dtype=torch.long)
    labels[5:15, 3:10] = 1
    labels[:, 18:] = 2
    logits = torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float() * 10
    flips = 0
    for _ in range(20):
        lo, la = augment_pair(logits, labels, g)
        assert lo.shape == logits.shape and la.shape == labels.shape
        agree = (lo.argmax(0) == la).float().mean()
        assert agree > 0.9  # the same crop and flip (bilinear vs nearest only differ at class borders)
        flips += int(la[0, 0] == 2)
    assert 0 < flips < 20  # the horizontal flip happens about half the time


def test_protocol_paper_sets_the_authors_choices_and_explicit_values_win():
    from transfgu.config import LeopartConfig

    free, paper = LeopartConfig(), LeopartConfig(protocol="paper")
    assert (free.match, free.unmatched, free.infomap_runs, free.fit_splits, free.val_precision) == (
        "pixels", "error", 1, "train", "train")
    assert (paper.match, paper.unmatched, paper.infomap_runs, paper.fit_splits, paper.val_precision) == (
        "iou", "background", 10, "train+val", "val")
    assert (paper.cooc_angles, paper.cooc_presence, paper.overcluster_split, paper.overcluster_seeds,
            paper.overcluster_spherical) == ("authors", "row_sum", "val", 5, False)
    assert (paper.linear_probe.weight_decay, paper.linear_probe.augment) == (1e-4, True)
    mixed = LeopartConfig(protocol="paper", match="pixels", infomap_runs=2)
    assert (mixed.match, mixed.infomap_runs, mixed.unmatched) == ("pixels", 2, "background")
    with pytest.raises(ValueError, match="cbfe_attention_weights"):
        LeopartConfig(cbfe_attention="weights")


# -- a paper run on real images ----------------------------------------------------------------------------------------
PAPER = {"leopart.protocol": "paper", "leopart.paper_grid.k_community": "[8]",
         "leopart.paper_grid.markov_time": "[1.5]", "leopart.paper_grid.edge_threshold": "[0.02]",
         "leopart.overcluster_k": "[5]"}


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    from helpers.configs import leopart_config

    from transfgu.pipeline import run_pipeline

    cfg = leopart_config(tmp_path_factory.mktemp("paper"), "paper", **PAPER)
    run_pipeline(cfg)
    return cfg


@pytest.mark.slow  # one end-to-end run (about 40 s on the loaded 2-core VM)
def test_val_precision_is_recomputed_from_val_masks(paper_run):
    from safetensors.numpy import load_file

    from transfgu.leopart.dense import read_dense
    from transfgu.leopart.foreground import attention_mask
    from transfgu.leopart.pca import PCA
    from transfgu.leopart.pipeline import dense_files, mask_kwargs, read_segments

    cfg = paper_run
    c = load_file(str(cfg.run_dir / "cbfe" / "cbfe.safetensors"))
    info = json.loads((cfg.run_dir / "cbfe" / "cbfe.json").read_text())
    pca = PCA.load(cfg.run_dir / "pca")
    unit = c["centroids"] / np.linalg.norm(c["centroids"], axis=1, keepdims=True)
    k = unit.shape[0]
    sums, n_img = np.zeros(k), np.zeros(k)
    labels_of = {}
    for f in dense_files(cfg.run_dir, "val"):
        for im in read_dense(f):
            x = pca.transform(im.feats)
            lab = np.argmax((x / np.linalg.norm(x, axis=1, keepdims=True)) @ unit.T, axis=1)
            labels_of[im.image_id] = lab
            mask = attention_mask(im.attn, im.grid, **mask_kwargs(cfg))
            for cl in np.unique(lab):
                sums[cl] += mask[lab == cl].mean()
                n_img[cl] += 1
    brute = np.where(n_img > 0, sums / np.maximum(n_img, 1), 0.0)
    np.testing.assert_allclose(c["precision_val"], brute, atol=1e-6)
    np.testing.assert_array_equal(c["foreground_val"].astype(bool), brute >= info["threshold"] - 1e-12)
    assert not np.allclose(c["precision_val"], c["precision"])  # val's own masks, not train's numbers
    # val's cluster maps use val's flags: a patch of a val-background CBFE cluster is the background node k
    clusters = read_segments(cfg.run_dir, "val", "clusters")
    k_comm = json.loads((cfg.run_dir / "communities" / "communities.json").read_text())["k"]
    fg_val = c["foreground_val"].astype(bool)
    for image_id, lab in labels_of.items():
        got = clusters[image_id].ravel()
        np.testing.assert_array_equal(got == k_comm, ~fg_val[lab])


@pytest.mark.slow
def test_ten_infomap_seeds_mean_and_per_seed_values(paper_run):
    from safetensors.numpy import load_file

    from transfgu.errors import CollectedErrors
    from transfgu.leopart.model import upsample_labels
    from transfgu.leopart.pipeline import _fg_classes, _gt_at, read_segments

    cfg = paper_run
    m = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    seeds = m["infomap_seeds"]["mIoU"]
    assert list(seeds["per_seed"]) == [str(s) for s in range(10)]
    v = np.array(list(seeds["per_seed"].values()))
    assert seeds["mean"] == pytest.approx(v.mean()) and seeds["std"] == pytest.approx(v.std())
    assert seeds["per_seed"]["0"] == pytest.approx(m["mIoU"])  # the model is seed 0's partition
    assert m["match"] == "iou" and m["unmatched"] == "background"
    # brute force, seed by seed: val cluster maps through that seed's partition, pixel confusion, IoU Hungarian
    runs = load_file(str(cfg.run_dir / "communities" / "communities.safetensors"))["cluster_to_segment_runs"]
    assert runs.shape[0] == 10
    names, bg = _fg_classes(cfg)
    gt = _gt_at(cfg, "val", CollectedErrors(), "test")
    clusters = read_segments(cfg.run_dir, "val", "clusters")
    for s in range(10):
        seg = runs[s]
        n_seg = int(seg.max()) + 1
        conf = np.zeros((len(names), n_seg), dtype=np.int64)
        for i, g in gt.items():
            pred = seg[upsample_labels(clusters[i], g.shape)]
            ok = g >= 0
            np.add.at(conf, (g[ok], pred[ok]), 1)
        assert leopart_scores(conf, names, bg, "iou", "background")["mIoU"] == pytest.approx(seeds["per_seed"][str(s)])
    # overclustering: fitted on val, Euclidean, 5 seeds averaged
    over = m["overclustering"]["5"]
    assert over["fitted_on"] == "val" and over["spherical"] is False and len(over["per_seed"]) == 5
    assert over["mIoU"] == pytest.approx(np.mean(list(over["per_seed"].values())))


@pytest.mark.slow
def test_paper_fits_pca_and_cooccurrence_on_train_and_val(paper_run):
    from transfgu.leopart.dense import read_dense
    from transfgu.leopart.pipeline import dense_files

    cfg = paper_run
    n = sum(im.feats.shape[0] for split in ("train", "val") for f in dense_files(cfg.run_dir, split)
            for im in read_dense(f))
    assert json.loads((cfg.run_dir / "pca" / "pca.json").read_text())["n"] == n
    comm = json.loads((cfg.run_dir / "communities" / "communities.json").read_text())
    assert (comm["fit_splits"], comm["cooc_angles"], comm["cooc_presence"]) == ("train+val", "authors", "row_sum")


def test_paper_protocol_sets_the_authors_kmeans() -> None:
    """``protocol: paper`` runs the authors' k-means (raw points, faiss's 256-point subsampling, 5 restarts);
    the label-free default keeps every point, L2-normalised, one community restart; an explicit key wins."""
    from transfgu.config import LeopartConfig

    free = LeopartConfig()
    assert (free.kmeans_points, free.kmeans_max_points_per_centroid, free.community_nredo) == (
        "l2_normalized", None, 1)
    paper = LeopartConfig(protocol="paper")
    assert (paper.kmeans_points, paper.kmeans_max_points_per_centroid, paper.community_nredo) == ("raw", 256, 5)
    assert paper.cbfe_nredo == 5 and paper.cbfe_niter == 100 and paper.community_niter == 100
    mixed = LeopartConfig(protocol="paper", kmeans_points="l2_normalized", kmeans_max_points_per_centroid=None)
    assert (mixed.kmeans_points, mixed.kmeans_max_points_per_centroid, mixed.community_nredo) == (
        "l2_normalized", None, 5)
