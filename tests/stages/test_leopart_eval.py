"""Leopart's label-using evaluations and its report: the linear probe of frozen patch tokens (against brute-force
definitions, and on real Weizmann-horse images beating chance and a shuffled-label probe), ``protocol: paper``'s
grid search of community detection's hyperparameters with train labels, and the report's Leopart sections
(foreground masks, cluster galleries, community graph).

The CBFE + CD steps themselves are tested in ``test_leopart.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.configs import leopart_config

from transfgu.leopart import probe
from transfgu.leopart import viz as lviz

# the appendix's schedule shrunk: 12 training images, so batches of 4 and 20 epochs (60 steps) instead of 120 x 25
PROBE = {"leopart.linear_probe.enabled": "true", "leopart.linear_probe.epochs": "20",
         "leopart.linear_probe.lr_drop_epoch": "16", "leopart.linear_probe.batch_size": "4",
         "leopart.linear_probe.train_size": "[32, 32]", "leopart.linear_probe.eval_size": "[64, 64]"}


# -- brute-force checks --------------------------------------------------------------------------------------------
def test_head_on_grid_equals_interpolating_the_features_first():
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 3)
    feats = torch.randn(2, 4 * 5, 6)
    fast = probe.probe_logits(head, feats, (4, 5), (13, 17))
    # the appendix's order: features bilinearly interpolated to the mask, then the linear head on every pixel
    up = F.interpolate(feats.transpose(1, 2).reshape(2, 6, 4, 5), size=(13, 17), mode="bilinear",
                       align_corners=False)
    slow = torch.einsum("bdhw,cd->bchw", up, head.weight) + head.bias[None, :, None, None]
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_identity_scores_match_per_class_brute_force():
    rng = np.random.default_rng(0)
    gt = rng.integers(-1, 3, size=500)
    pred = np.where(rng.random(500) < 0.6, gt, rng.integers(0, 3, size=500)).clip(0)
    from transfgu.metrics import confusion_matrix

    conf = confusion_matrix(gt[gt >= 0], pred[gt >= 0], 3, 3, ignore_index=None)
    s = probe.identity_scores(conf, ["a", "b", "c"])
    ious = []
    for c in range(3):
        v = gt >= 0
        inter = np.sum((gt == c) & (pred == c) & v)
        union = np.sum(((gt == c) | (pred == c)) & v)
        ious.append(inter / union)
        assert s["per_class_iou"]["abc"[c]] == pytest.approx(inter / union)
    assert s["mIoU"] == pytest.approx(np.mean(ious))
    assert s["pixel_accuracy"] == pytest.approx(np.mean(gt[gt >= 0] == pred[gt >= 0]))


def test_probe_rejects_bad_inputs():
    with pytest.raises(ValueError, match="feats must be"):
        probe.train_linear_probe(np.zeros((2, 5, 3)), np.zeros((2, 4, 4), int), (2, 2), 2)
    with pytest.raises(ValueError, match="outside the 2 classes"):
        probe.train_linear_probe(np.zeros((2, 4, 3)), np.full((2, 4, 4), 2), (2, 2), 2)


def test_gallery_helpers_match_brute_force():
    m = np.array([[0, 1, 1], [2, 1, 0]])
    assert lviz.patch_box(m, 1, (20, 30)) == (0, 20, 10, 30)  # rows 0-1, cols 1-2 of 10 x 10 pixel patches
    assert lviz.patch_box(m, 2, (20, 30)) == (10, 20, 0, 10)
    assert lviz.patch_box(m, 7, (20, 30)) is None
    maps = [("a", m), ("b", np.ones((2, 3), int)), ("c", np.zeros((2, 3), int)), ("d", m)]
    assert lviz.top_images(maps, 1, 2) == [("b", 1.0), ("a", 0.5)]  # ties keep their order; "c" lacks it
    assert lviz.top_images(maps, 1, 9) == [("b", 1.0), ("a", 0.5), ("d", 0.5)]


# -- on real images ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny one-process Leopart run on real horse images with the linear probe and the report."""
    from transfgu.pipeline import run_pipeline

    cfg = leopart_config(tmp_path_factory.mktemp("leopart_eval"), "probe", **{"run.report": "true", **PROBE})
    run_pipeline(cfg)
    return cfg


def _probe_data(cfg, split: str, size):
    from transfgu.leopart.pipeline import _dense_with_labels, _gt_at

    gt = _gt_at(cfg, split, None, "test", size)
    x, y, grid = _dense_with_labels(cfg.run_dir, split, gt)
    return x, y, grid


def test_linear_probe_beats_chance_and_a_shuffled_label_probe(run):
    cfg = run
    metrics = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    lp = metrics["linear_probe"]
    assert lp["labels_used"] is True and "training labels" in lp["note"]
    assert lp["n_train_images"] == 12 and lp["n_val_images"] == 8 and lp["eval_size"] == [64, 64]
    assert lp["losses"][-1] < lp["losses"][0]
    names = ["background", "horse"]
    x_val, y_val, grid = _probe_data(cfg, "val", (64, 64))
    # recomputed from the saved dense files: the same numbers (the probe is deterministic)
    x_tr, y_tr, _ = _probe_data(cfg, "train", (32, 32))
    kw = {"epochs": 20, "lr_drop_epoch": 16, "batch_size": 4, "seed": cfg.leopart.seed}
    head, _ = probe.train_linear_probe(x_tr, np.stack(y_tr), grid, 2, **kw)
    assert probe.evaluate_probe(head, x_val, y_val, grid, names)["mIoU"] == pytest.approx(lp["mIoU"])
    # chance: the best constant prediction (every pixel the majority class)
    from transfgu.metrics import confusion_matrix

    gt = np.concatenate([g.ravel() for g in y_val])
    gt = gt[gt >= 0]
    majority = np.bincount(gt).argmax()
    chance = probe.identity_scores(confusion_matrix(gt, np.full_like(gt, majority), 2, 2, None), names)["mIoU"]
    # broken: each training image's labels shuffled over its pixels (same class frequencies, no correspondence)
    rng = np.random.default_rng(0)
    shuffled = np.stack([rng.permutation(y.ravel()).reshape(y.shape) for y in y_tr])
    bad_head, _ = probe.train_linear_probe(x_tr, shuffled, grid, 2, **kw)
    broken = probe.evaluate_probe(bad_head, x_val, y_val, grid, names)["mIoU"]
    assert lp["mIoU"] > chance + 0.08, (lp["mIoU"], chance)
    assert lp["mIoU"] > broken + 0.08, (lp["mIoU"], broken)


def test_paper_protocol_selects_community_hyperparameters_with_train_labels(run, tmp_path):
    from transfgu.leopart.model import upsample_labels
    from transfgu.leopart.pipeline import _fg_classes, _gt_at, read_segments, segment_scores
    from transfgu.metrics import RunningConfusion
    from transfgu.pipeline import run_pipeline

    grid = {"leopart.paper_grid.k_community": "[6, 8, 100000]", "leopart.paper_grid.markov_time": "[0.5, 1.5]",
            "leopart.paper_grid.edge_threshold": "[0.02, 0.1]"}
    shutil.copytree(run.run_dir, tmp_path / "paper")
    cfg = leopart_config(tmp_path, "paper", **{"leopart.protocol": "paper", **grid})
    run_pipeline(cfg)
    comm = json.loads((cfg.run_dir / "communities" / "communities.json").read_text())
    sel = comm["selection"]
    assert sel["selected_with"] == "train labels"
    trials = [t for t in sel["trials"] if "train_mIoU" in t]
    assert len(trials) == 8 and [t for t in sel["trials"] if "skipped" in t][0]["k_community"] == 100000
    best = max(trials, key=lambda t: t["train_mIoU"])
    assert (comm["k"], comm["markov_time"], comm["edge_threshold"]) == (
        best["k_community"], best["markov_time"], best["edge_threshold"])
    assert sel["train_mIoU"] == pytest.approx(best["train_mIoU"], abs=1e-6)
    # oracle: the segments the run wrote for the training images, scored directly against the training labels,
    # give the train mIoU the search reported (its shortcut sums cluster columns of one confusion per k)
    names, bg = _fg_classes(cfg)
    gt = _gt_at(cfg, "train", None, "test")
    segs = read_segments(cfg.run_dir, "train")
    conf = RunningConfusion(len(names), comm["n_segments"], ignore_index=None)
    for i, g in gt.items():
        conf.update(g, upsample_labels(segs[i], g.shape))
    assert segment_scores(conf.conf, names, bg, cfg.leopart.unmatched)["mIoU"] == pytest.approx(sel["train_mIoU"])
    metrics = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    assert metrics["labels_used_for_fitting"] is True
    assert metrics["hyperparameters"]["selected_with"] == "train labels"
    assert metrics["hyperparameters"]["k_community"] == best["k_community"]
    from transfgu.leopart.report import graph_section

    (tmp_path / "rep").mkdir()
    assert "Hyperparameters selected with train labels" in graph_section(cfg.run_dir, tmp_path / "rep", metrics).html
    # the label-free default is untouched: fixed values, said so
    free = json.loads((run.run_dir / "eval" / "metrics.json").read_text())["hyperparameters"]
    assert free == {"k_community": 8, "markov_time": 1.5, "edge_threshold": 0.02,
                    "selected_with": "fixed values (no labels)"}
    # every k of the grid too large: a clear error naming the key
    shutil.copytree(cfg.run_dir, tmp_path / "toolarge")  # its paper CBFE is kept: only communities runs
    bad = leopart_config(tmp_path, "toolarge", **{"leopart.protocol": "paper",
                                                  "leopart.paper_grid.k_community": "[100000]"})
    with pytest.raises(ValueError, match="leopart.paper_grid.k_community"):
        run_pipeline(bad)


def test_report_shows_foreground_masks_galleries_and_graph(run, tmp_path):
    from PIL import Image

    from transfgu.report import write_report

    cfg = run
    out = cfg.run_dir / "report"
    page = (out / "index.html").read_text()
    for title in ("Leopart: foreground masks", "Leopart: community and cluster galleries",
                  "Leopart: community graph"):
        assert f">{title}</h2>" in page and "<a href='#" in page  # a heading with its table-of-contents entry
    assert "Concept galleries" not in page and "CAM panels" not in page  # TransFGU's sections are not drawn
    assert "linear probe (trained with train labels" in page and "fixed values (no labels)" in page
    comm = json.loads((cfg.run_dir / "communities" / "communities.json").read_text())
    import base64

    def png(name: str) -> Image.Image:
        path = out / name
        assert base64.b64encode(path.read_bytes()).decode() in page  # embedded in the self-contained page
        im = Image.open(path)
        assert im.format == "PNG"
        return im

    # foreground panel: 4 images x 5 panels (photo, attention, mask, CBFE, segments), 2.4 in per panel at 80 dpi
    with png("leopart_foreground.png") as im:
        w, h = im.size
        assert 0.8 * 5 * 2.4 * 80 < w < 1.1 * 5 * 2.4 * 80 and 0.8 * 4 * 2.4 * 80 < h < 1.2 * 4 * 2.75 * 80
        # the photos are there: the panel is far from one colour
        assert np.asarray(im.convert("L")).std() > 20
    # galleries: one 1-inch row (80 px) per segment, one per foreground cluster with patches (at most 16)
    with png("leopart_communities.png") as im:
        assert abs(im.size[1] - 80 * comm["n_segments"]) < 80
    segs = {}
    import pyarrow.parquet as pq

    for f in sorted((cfg.run_dir / "segments" / "train").glob("*.parquet")):
        t = pq.read_table(f)
        for i, c in zip(t["image_id"].to_pylist(), t["clusters"].to_pylist()):
            segs[i] = np.asarray(c)
    n_fired = len({int(c) for m in segs.values() for c in m if c < comm["k"]})
    with png("leopart_clusters.png") as im:
        assert abs(im.size[1] - 80 * min(16, n_fired)) < 80
    with png("leopart_graph.png") as im:
        assert im.size[0] > 100
    assert (out / "leopart_graph.png").read_bytes() == (cfg.run_dir / "communities" / "graph.png").read_bytes()
    # a run stopped before its segments: the report still renders, with a note
    part = tmp_path / "partial"
    shutil.copytree(cfg.run_dir, part)
    shutil.rmtree(part / "segments")
    page2 = write_report(part).read_text()
    assert "No segments yet" in page2 and ">Leopart: foreground masks</h2>" in page2


def test_bad_settings_are_rejected_clearly():
    from helpers.data import REPO

    from transfgu.config import ConfigError, load_config

    preset = REPO / "conf" / "leopart_horse.yaml"
    with pytest.raises(ConfigError, match="paper_grid.k_community"):
        load_config(preset, ["leopart.paper_grid.k_community=[]"])
    with pytest.raises(ConfigError, match="paper_grid.markov_time"):
        load_config(preset, ["leopart.paper_grid.markov_time=[0, 1]"])
    with pytest.raises(ConfigError, match="linear_probe.epochs"):
        load_config(preset, ["leopart.linear_probe.epochs=0"])
    with pytest.raises(ConfigError, match="linear_probe.lr_drop"):
        load_config(preset, ["leopart.linear_probe.lr_drop=3"])  # a misspelt key, not silently ignored
