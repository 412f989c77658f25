"""Visual report of a run directory and the drawing helpers behind it."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from transfgu import viz
from transfgu.report import ReportOptions, main, nearest_crops, write_report

torch.set_num_threads(2)

SMALL = ReportOptions(n_per_concept=4, n_cam_images=2, n_pred_images=2, device="cpu")


def _png_ok(path) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"))
    assert arr.shape[0] > 50 and arr.shape[1] > 50, path
    assert arr.std() > 5, f"{path} looks blank"
    return arr


def _embedded(page: str) -> list[str]:
    return re.findall(r'<img src="([^"]{0,40})', page)


def test_full_report_of_a_finished_run(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    path = write_report(run, SMALL)
    assert path == run / "report" / "index.html"
    page = path.read_text()
    assert "RANDOM BACKBONE" in page and "not the method" in page
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert f"{100 * metrics['mIoU']:.2f} %" in page
    for name in ("per_class_iou", "confusion", "predictions", "concepts_00", "cam_00", "cam_01"):
        _png_ok(run / "report" / f"{name}.png")
    srcs = _embedded(page)
    assert len(srcs) == len(list((run / "report").glob("*.png"))) == 6
    assert all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
    assert "class='note'" not in page  # every section was drawn
    assert "vit_test_tiny" in page and "k_per_pool" in page  # the config is shown


def test_report_tolerates_missing_stages(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    shutil.rmtree(run / "eval")
    shutil.rmtree(run / "model")
    page = write_report(run, SMALL).read_text()
    assert "No evaluation yet" in page and "No trained model yet" in page
    assert (run / "report" / "concepts_00.png").is_file()  # the stages that ran are still drawn
    assert not (run / "report" / "confusion.png").exists()
    assert "RANDOM BACKBONE" in page  # known from the config even without model and metrics
    for d in ("features", "concepts", "label_bank", "train"):
        shutil.rmtree(run / d)
    (run / "config.yaml").unlink()
    (run / "_manifest.json").unlink()
    page = write_report(run, SMALL).read_text()
    assert "No concepts yet" in page and "No pseudo-label bank yet" in page and "No stage has run yet" in page
    assert "Backbone weights unknown" in page
    assert _embedded(page) == [] and not list((run / "report").glob("*.png"))


def test_report_of_a_pretrained_run_says_so(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("features", "label_bank"))
    meta = json.loads((run / "model" / "model.json").read_text())
    meta["backbone"].update(weights="/models/dino_deitsmall8_pretrain.pth", pretrained=True)
    (run / "model" / "model.json").write_text(json.dumps(meta))
    page = write_report(run, ReportOptions(n_pred_images=1, device="cpu")).read_text()
    assert "Pretrained backbone:" in page and "dino_deitsmall8_pretrain.pth" in page
    assert "RANDOM BACKBONE" not in page


def test_report_reads_configs_with_keys_of_older_versions(tiny_run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("features", "label_bank", "model"))
    text = (run / "config.yaml").read_text().replace("eval:\n", "eval:\n  removed_option: 3\n")
    (run / "config.yaml").write_text(text)
    page = write_report(run, SMALL).read_text()
    assert "data set <b>camvid</b>" in page and "RANDOM BACKBONE" in page


def test_nearest_crops_matches_brute_force():
    rng = np.random.default_rng(0)
    n, d = 200, 5
    feats = rng.normal(size=(n, d)).astype(np.float32)
    pools = np.where(rng.random(n) < 0.6, "fg", "bg")
    ids = [f"img{i // 7}" for i in range(n)]
    boxes = rng.integers(0, 50, size=(n, 4))
    centroids = rng.normal(size=(3, d)).astype(np.float32)
    cpools = ["fg", "fg", "bg"]

    def shard(lo, hi):
        t = pa.table({"image_id": ids[lo:hi], "box": boxes[lo:hi].tolist(), "pool": pools[lo:hi].tolist()})
        return None, t, feats[lo:hi]

    best, scanned = nearest_crops([shard(0, 90), shard(90, 200)], centroids, cpools, n=6)
    assert scanned == n
    for k in range(3):
        rows = [i for i in range(n) if pools[i] == cpools[k]]
        dist = {i: float(((feats[i].astype(np.float64) - centroids[k]) ** 2).sum()) for i in rows}
        want = sorted(rows, key=dist.get)[:6]
        assert [(b[1], b[2]) for b in best[k]] == [(ids[i], tuple(boxes[i])) for i in want]
        np.testing.assert_allclose([b[0] for b in best[k]], [dist[i] for i in want], rtol=1e-4)
    best, scanned = nearest_crops([shard(0, 90), shard(90, 200)], centroids, cpools, n=6, max_rows=50)
    assert scanned == 90
    # At most two crops of one image per concept: greedy over the brute-force order.
    best, _ = nearest_crops([shard(0, 90), shard(90, 200)], centroids, cpools, n=6, max_per_image=2)
    for k in range(3):
        rows = sorted((i for i in range(n) if pools[i] == cpools[k]),
                      key=lambda i: float(((feats[i].astype(np.float64) - centroids[k]) ** 2).sum()))
        want, seen = [], {}
        for i in rows:
            if seen.get(ids[i], 0) < 2 and len(want) < 6:
                seen[ids[i]] = seen.get(ids[i], 0) + 1
                want.append((ids[i], tuple(boxes[i])))
        assert [(b[1], b[2]) for b in best[k]] == want
        assert max(Counter(b[1] for b in best[k]).values()) <= 2


def test_colour_helpers_hand_computed():
    pal = viz.palette(60)
    assert pal.shape == (60, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal}) == 60
    np.testing.assert_array_equal(viz.palette(5), pal[:5])
    lab = np.array([[0, 1], [-1, 7]])
    col = viz.colorize(lab, pal[:2])
    np.testing.assert_array_equal(col[0, 0], pal[0])
    np.testing.assert_array_equal(col[0, 1], pal[1])
    np.testing.assert_array_equal(col[1], [[0, 0, 0], [0, 0, 0]])
    img = np.full((2, 2, 3), 100, dtype=np.uint8)
    over = viz.overlay(img, lab, np.array([[200, 0, 50], [0, 0, 0]], dtype=np.uint8), alpha=0.5)
    np.testing.assert_array_equal(over[0, 0], [150, 50, 75])
    np.testing.assert_array_equal(over[0, 1], [50, 50, 50])
    np.testing.assert_array_equal(over[1], img[1])  # invalid ids leave the photo untouched
    with pytest.raises(ValueError, match="sizes differ"):
        viz.overlay(img, lab[:1], pal)


def test_cli(tiny_run_dir, tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "run directory not found" in capsys.readouterr().err
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("features", "label_bank", "model"))
    assert main([str(run), "--pred-images", "1"]) == 0
    assert (run / "report" / "index.html").is_file()
