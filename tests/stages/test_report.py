"""Visual report of a run directory and the drawing helpers behind it."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from transfgu import viz
from transfgu.report import ReportOptions, image_miou, main, nearest_crops, spread, write_report

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
    assert "<details>" in page and "leopart:" not in page and "finetune:" not in page  # collapsed, this method only
    assert "<title>TransFGU report: run</title>" in page and "<h1>TransFGU run <code>run</code></h1>" in page
    for title in ("Metrics", "Predictions vs ground truth", "Configuration"):  # a table of contents
        anchor = "sec-" + re.sub(r"[^a-z0-9]", "-", title.lower()).strip("-")
        assert f"href='#{anchor}'" in page and f"id='{anchor}'" in page


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


def test_report_title_names_the_runs_method(tiny_run_dir, tmp_path):
    from transfgu.methods import REGISTRY, get_method

    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("features", "label_bank", "model", "eval"))
    config = (run / "config.yaml").read_text()
    assert "method: transfgu\n" in config
    (run / "config.yaml").write_text(config.replace("method: transfgu\n", "method: leopart\n"))
    page = write_report(run, SMALL).read_text()
    assert "<title>Leopart report: run</title>" in page and "<h1>Leopart run <code>run</code></h1>" in page
    assert "TransFGU" not in page.split("</h1>")[0]
    # every registered method has a title of its own
    titles = [get_method(m).display_name for m in REGISTRY]
    assert len(set(titles)) == len(titles) and all(t != m for t, m in zip(titles, REGISTRY)), titles


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


def test_spread_and_image_miou_hand_computed():
    assert spread(10, 4) == [0, 3, 6, 9] and spread(3, 4) == [0, 1, 2] and spread(5, 1) == [0] and spread(0, 3) == []
    assert len(spread(100, 16)) == 16 and spread(100, 16)[-1] == 99
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, -1]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 255, 0]])  # 255: unmatched cluster, wrong where the GT is valid
    # class 0: inter 3, union 4 + 1 (pred 0 on the -1 pixel is not scored) = 4 -> 3/4; class 1: inter 2, gt 3 + pred 3
    # = 6 - 2 = 4 -> 2/4
    assert image_miou(gt, pred, 2) == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert image_miou(gt, gt, 2) == 1.0


def _ranked_run(tiny_run_dir, tmp_path):
    """A copy of the tiny run whose model has a cluster -> class matching (every cluster to a class)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run)
    meta = json.loads((run / "model" / "model.json").read_text())
    if meta.get("cluster_to_class") is None:
        meta["cluster_to_class"] = list(range(meta["decoder"]["n_classes"]))
        (run / "model" / "model.json").write_text(json.dumps(meta))
    return run


def test_prediction_panel_shows_the_models_range(tiny_run_dir, tmp_path):
    from transfgu.config import load_config
    from transfgu.data.datasets import dataset_spec, list_records, load_sample
    from transfgu.predict import load

    run = _ranked_run(tiny_run_dir, tmp_path)
    page = write_report(run, ReportOptions(n_pred_images=3, n_pred_candidates=6, device="cpu", n_cam_images=1,
                                           n_per_concept=2)).read_text()
    cfg = load_config(run / "config.yaml")
    records = list(list_records(cfg.data.name, cfg.data.root, cfg.data.val_split, **dict(cfg.data.options)))
    spec = dataset_spec(cfg.data.name, cfg.data.root, **dict(cfg.data.options))
    predictor = load(run, device="cpu")
    scores = {}  # the oracle: every candidate's per-image mIoU, computed here
    for i in spread(len(records), 6):
        img, gt = load_sample(records[i], spec.label_map)
        gt = np.where((gt == spec.ignore_index) | (gt >= len(spec.class_names)), -1, gt)
        scores[records[i].image_id] = image_miou(gt, predictor.predict(np.array(img), as_classes=True),
                                                 len(spec.class_names))
    ranked = sorted(scores, key=lambda k: -scores[k])
    rows = re.findall(r"<tr><td>([^<]+)</td><td>(best|worst|rank \d+)</td><td>([\d.]+) %</td></tr>", page)
    assert [r[0] for r in rows] == [ranked[i] for i in spread(len(ranked), 3)]  # best, middle, worst
    assert rows[0][1] == "best" and rows[-1][1] == "worst"
    assert float(rows[0][2]) >= float(rows[-1][2])
    assert float(rows[0][2]) == pytest.approx(100 * scores[ranked[0]], abs=0.06)
    ids = [r[0] for r in rows]
    assert len(set(ids)) == 3 and ids != [rec.image_id for rec in records[:3]]  # not the first frames
    assert "6 images spread evenly" in page


def test_report_links_its_mlflow_run(tiny_run_dir, tmp_path):
    import yaml

    from transfgu.config import load_config
    from transfgu.tracking import PipelineTracker

    run = tmp_path / "runs" / "linked"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("features", "label_bank", "model"))
    data = yaml.safe_load((run / "config.yaml").read_text())
    data["run"].update(root=str(tmp_path / "runs"), name="linked")
    data["mlflow"].update(enabled=True, system_metrics=False, tracking_uri=None)
    (run / "config.yaml").write_text(yaml.safe_dump(data))
    cfg = load_config(run / "config.yaml")
    tracker = PipelineTracker.from_config(cfg)
    run_id = tracker.start()
    tracker.finish(None)
    page = write_report(run, SMALL).read_text()
    m = re.search(r"<a id='mlflow-run' href='([^']+)'", page)
    assert m and m.group(1).endswith(f"/runs/{run_id}") and "/#/experiments/" in m.group(1)
    assert f"mlflow ui --backend-store-uri sqlite:///{(tmp_path / 'runs' / 'mlflow.db').as_posix()}" in page


def test_report_page_in_chromium(tiny_run_dir, tmp_path, browser):
    import os

    from helpers.chromium import element_screenshot, open_page

    run = _ranked_run(tiny_run_dir, tmp_path)
    path = write_report(run, ReportOptions(n_pred_images=4, device="cpu", n_cam_images=1, n_per_concept=2))
    # ready once the report is there (the new tab is on about:blank, also "complete", until it navigates)
    session = open_page(browser, path.as_uri(), ready="document.querySelector('nav.toc a') !== null")
    toc = browser.evaluate(session, "[...document.querySelectorAll('nav.toc a')].map(a => a.getAttribute('href'))")
    assert len(toc) >= 5 and all(browser.evaluate(session, f"document.querySelector('{h}') !== null") for h in toc)
    # the configuration is collapsed: its text takes no room until opened
    assert browser.evaluate(session, "document.querySelector('details').open") is False
    assert browser.evaluate(session, "document.querySelector('details').getBoundingClientRect().height") < 60
    assert browser.evaluate(session, "document.querySelector('details pre').checkVisibility()") is False
    # following the contents' link scrolls to the prediction panel, which shows an image
    browser.evaluate(session, "document.querySelector(\"a[href='#sec-predictions-vs-ground-truth']\").click()")
    time.sleep(0.3)
    top = browser.evaluate(session, "document.getElementById('sec-predictions-vs-ground-truth')"
                                    ".getBoundingClientRect().top")
    assert abs(top) < 40
    figure = "#sec-predictions-vs-ground-truth ~ figure"
    assert browser.evaluate(session, f"document.querySelector('{figure} img').naturalWidth") > 300
    shot = element_screenshot(browser, session, figure)
    arr = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert arr.shape[0] > 200 and arr.std() > 20  # drawn, not blank
    if os.environ.get("TRANSFGU_SCREENSHOTS"):  # docs/img/report_predictions.png is made this way
        Path(os.environ["TRANSFGU_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["TRANSFGU_SCREENSHOTS"]) / "report_predictions.png").write_bytes(shot)
