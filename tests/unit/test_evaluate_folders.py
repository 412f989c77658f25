"""transfgu.evaluate: folder-vs-folder scoring, hand-computed and on real CamVid ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfgu.data import DatasetError, LabelMapError, list_records, load_label
from transfgu.evaluate import MissingPredictionsError, evaluate_folders, main

CAMVID_VOID = 11
N_CAMVID = 11


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)


def _naive_scores(gts: list[np.ndarray], preds: list[np.ndarray], n_classes: int, ignore: int) -> dict:
    """Oracle: confusion by a Python loop, best one-to-one matching by brute force over permutations."""
    from itertools import permutations

    n_clusters = max(int(p.max()) for p in preds) + 1
    conf = np.zeros((n_classes, n_clusters), dtype=np.int64)
    for g, p in zip(gts, preds):
        for gv, pv in zip(g.ravel().tolist(), p.ravel().tolist()):
            if gv != ignore:
                conf[gv, pv] += 1
    best, best_map = -1, None
    for perm in permutations(range(n_clusters), n_classes):  # class c <- cluster perm[c]
        total = sum(conf[c, k] for c, k in enumerate(perm))
        if total > best:
            best, best_map = total, perm
    ious = []
    for c, k in enumerate(best_map):
        tp = conf[c, k]
        ious.append(tp / (conf[c].sum() + conf[:, k].sum() - tp))
    return {"mIoU": float(np.mean(ious)), "pixel_accuracy": best / conf.sum(), "iou": ious}


def test_hand_computed_two_images(tmp_path):
    # pixels (gt, pred): one confusion over BOTH images, not a per-image average
    gt_a, pred_a = np.array([[0, 0, 1, 1]]), np.array([[2, 2, 0, 0]])
    gt_b, pred_b = np.array([[0, 255, 1, 2]]), np.array([[2, 1, 1, 1]])
    for name, g, p in (("a", gt_a, pred_a), ("b", gt_b, pred_b)):
        _write(tmp_path / "gt" / f"{name}.png", g)
        _write(tmp_path / "pred" / f"{name}.png", p)
    res = evaluate_folders(tmp_path / "pred", tmp_path / "gt", n_classes=3, class_names=["x", "y", "z"])
    # conf rows=class, cols=cluster: x:[0,0,3]  y:[2,1,0]  z:[0,1,0]; best matching 2->x, 0->y, 1->z
    assert res["mapping"] == [1, 2, 0]
    assert res["per_class_iou"] == pytest.approx({"x": 1.0, "y": 2 / 3, "z": 1 / 2})
    assert res["mIoU"] == pytest.approx(13 / 18)
    assert res["pixel_accuracy"] == pytest.approx(6 / 7)
    assert res["n_images"] == 2 and res["confusion_matrix"] == [[0, 0, 3], [2, 1, 0], [0, 1, 0]]
    oracle = _naive_scores([gt_a, gt_b], [pred_a, pred_b], 3, 255)
    assert res["mIoU"] == pytest.approx(oracle["mIoU"])
    # inferred class count (max GT id + 1) gives the same numbers
    assert evaluate_folders(tmp_path / "pred", tmp_path / "gt")["mIoU"] == pytest.approx(13 / 18)


def test_random_small_cases_match_bruteforce_oracle(tmp_path):
    rng = np.random.default_rng(0)
    for trial in range(3):
        gts, preds = [], []
        d = tmp_path / f"t{trial}"
        for i in range(3):
            h, w = rng.integers(3, 9, 2)
            g = rng.integers(0, 4, (h, w))
            g[rng.random((h, w)) < 0.1] = 255
            p = np.where(rng.random((h, w)) < 0.6, (g * 7 + 1) % 5, rng.integers(0, 5, (h, w)))
            p[0, 0] = 4  # every cluster id 0..4 occurs somewhere
            gts.append(g)
            preds.append(p)
            _write(d / "gt" / f"{i}.png", g)
            _write(d / "pred" / f"{i}.png", p)
        res = evaluate_folders(d / "pred", d / "gt", n_classes=4)
        oracle = _naive_scores(gts, preds, 4, 255)
        assert res["pixel_accuracy"] == pytest.approx(oracle["pixel_accuracy"])
        assert res["mIoU"] == pytest.approx(oracle["mIoU"])


def test_overclustering_hand_case(tmp_path):
    gt = np.array([[0, 0, 0, 0, 1, 1]])
    pred = np.array([[0, 0, 0, 2, 1, 1]])  # class 0 split over clusters 0 (3 px) and 2 (1 px)
    _write(tmp_path / "gt" / "a.png", gt)
    _write(tmp_path / "pred" / "a.png", pred)
    hung = evaluate_folders(tmp_path / "pred", tmp_path / "gt", n_classes=2)
    assert hung["n_clusters"] == 3 and hung["mapping"] == [0, 1, -1]
    assert hung["pixel_accuracy"] == pytest.approx(5 / 6)
    assert hung["per_class_iou"]["0"] == pytest.approx(3 / 4)
    major = evaluate_folders(tmp_path / "pred", tmp_path / "gt", n_classes=2, overcluster="majority")
    assert major["mapping"] == [0, 1, 0] and major["mIoU"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ real CamVid val


@pytest.fixture(scope="module")
def camvid_val(camvid):
    recs = list_records("camvid", camvid, "val")
    return camvid, [(r.image_id, load_label(r.label_path).astype(np.uint8)) for r in recs]


def _write_preds(folder: Path, items, fn) -> None:
    for image_id, raw in items:
        _write(folder / f"{image_id}.png", fn(image_id, raw))


def test_camvid_gt_as_prediction_and_permutation(camvid_val, tmp_path):
    root, items = camvid_val
    _write_preds(tmp_path / "same", items, lambda _i, raw: raw)
    res = evaluate_folders(tmp_path / "same", dataset="camvid", split="val", root=root)
    assert res["n_images"] == 101 and res["n_classes"] == N_CAMVID
    assert res["mIoU"] == pytest.approx(1.0) and res["pixel_accuracy"] == pytest.approx(1.0)
    assert res["per_class_iou"]["Sky"] == pytest.approx(1.0)

    perm = np.random.default_rng(1).permutation(12)
    _write_preds(tmp_path / "perm", items, lambda _i, raw: perm[raw])
    permuted = evaluate_folders(tmp_path / "perm", dataset="camvid", split="val", root=root)
    for key in ("mIoU", "pixel_accuracy", "per_class_iou", "confusion_matrix"):
        if key == "confusion_matrix":
            np.testing.assert_array_equal(
                np.asarray(permuted[key])[:, perm[:N_CAMVID]], np.asarray(res[key])[:, :N_CAMVID]
            )
        else:
            assert permuted[key] == pytest.approx(res[key])

    # the same GT read from a plain folder (raw ids, void 11 as the ignore index) gives the same scores
    from_dir = evaluate_folders(
        tmp_path / "perm", root / "labels" / "val", n_classes=11, ignore_index=CAMVID_VOID
    )
    assert from_dir["mIoU"] == pytest.approx(permuted["mIoU"])
    assert from_dir["pixel_accuracy"] == pytest.approx(permuted["pixel_accuracy"])


def test_camvid_known_fraction_changed(camvid_val, tmp_path):
    root, items = camvid_val
    rng = np.random.default_rng(2)
    changed = valid = 0

    def corrupt(_image_id, raw):
        nonlocal changed, valid
        out = raw.copy()
        ok = np.flatnonzero(raw.ravel() != CAMVID_VOID)
        pick = rng.choice(ok, size=int(0.1 * ok.size), replace=False)
        out.ravel()[pick] = (raw.ravel()[pick] + 1) % N_CAMVID
        changed += pick.size
        valid += ok.size
        return out

    _write_preds(tmp_path / "pred", items, corrupt)
    res = evaluate_folders(tmp_path / "pred", dataset="camvid", split="val", root=root)
    assert res["mapping"][:N_CAMVID] == list(range(N_CAMVID))
    assert res["pixel_accuracy"] == pytest.approx(1 - changed / valid, abs=1e-12)
    assert 0.5 < res["mIoU"] < 0.95


def test_camvid_overclustering_split_class(camvid_val, tmp_path):
    root, items = camvid_val
    split_px = sky_px = valid = 0

    def split_sky(_image_id, raw):
        nonlocal split_px, sky_px, valid
        out = raw.copy()
        part = np.zeros(raw.shape, bool)
        part[::3] = True  # every third row of the sky becomes cluster 12
        part &= raw == 0
        out[part] = 12
        split_px += int(part.sum())
        sky_px += int((raw == 0).sum())
        valid += int((raw != CAMVID_VOID).sum())
        return out

    _write_preds(tmp_path / "pred", items, split_sky)
    res = evaluate_folders(tmp_path / "pred", dataset="camvid", split="val", root=root)
    assert res["n_clusters"] == 13
    assert res["mapping"][12] == -1  # the smaller sky part stays unmatched (its pixels count as errors)
    assert res["pixel_accuracy"] == pytest.approx(1 - split_px / valid)
    assert res["per_class_iou"]["Sky"] == pytest.approx((sky_px - split_px) / sky_px)
    major = evaluate_folders(
        tmp_path / "pred", dataset="camvid", split="val", root=root, overcluster="majority"
    )
    assert major["mIoU"] == pytest.approx(1.0)


def test_camvid_predictions_resized_nearest(camvid_val, tmp_path):
    root, items = camvid_val
    sub = items[:12]
    gt_dir = tmp_path / "gt"
    for image_id, raw in sub:
        _write(gt_dir / f"{image_id}.png", raw)
    # half-size predictions (pixel centres of the odd rows/columns); nearest upsampling repeats them
    _write_preds(tmp_path / "pred", sub, lambda _i, raw: raw[1::2, 1::2])
    res = evaluate_folders(tmp_path / "pred", gt_dir, n_classes=11, ignore_index=CAMVID_VOID)
    assert res["n_resized_predictions"] == 12 and "nearest" in res["resize_policy"]
    up = [raw[1::2, 1::2].repeat(2, 0).repeat(2, 1) for _, raw in sub]
    gts = [raw for _, raw in sub]
    total = sum(int((g != CAMVID_VOID).sum()) for g in gts)
    correct = sum(int(((g == p) & (g != CAMVID_VOID)).sum()) for g, p in zip(gts, up))
    assert res["pixel_accuracy"] == pytest.approx(correct / total)  # identity mapping is optimal here
    with pytest.raises(ValueError, match="ground truth"):
        evaluate_folders(tmp_path / "pred", gt_dir, n_classes=11, ignore_index=CAMVID_VOID, resize="error")


# ------------------------------------------------------------------------------------ errors and CLI


def test_missing_predictions_listed_or_recorded(tmp_path):
    for name in ("a", "b", "c"):
        _write(tmp_path / "gt" / f"{name}.png", np.array([[0, 1]]))
    _write(tmp_path / "pred" / "a.png", np.array([[1, 0]]))
    with pytest.raises(MissingPredictionsError, match=r"2 of 3.*\n  b\n  c"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", n_classes=2)
    res = evaluate_folders(tmp_path / "pred", tmp_path / "gt", n_classes=2, allow_missing=True)
    assert res["missing_predictions"] == ["b", "c"] and res["n_images"] == 1 and res["mIoU"] == 1.0


def test_bad_ids_are_errors(tmp_path):
    _write(tmp_path / "gt" / "a.png", np.array([[0, 5]]))
    _write(tmp_path / "pred" / "a.png", np.array([[0, 9]]))
    with pytest.raises(LabelMapError, match=r"a\.png.*\[5\]"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", n_classes=3)
    with pytest.raises(ValueError, match="n_clusters"):
        evaluate_folders(tmp_path / "pred", tmp_path / "gt", n_classes=6, n_clusters=4)
    with pytest.raises(DatasetError, match="no labels"):
        evaluate_folders(tmp_path / "pred", dataset="folder", root=tmp_path)
    with pytest.raises(ValueError, match="gt_dir"):
        evaluate_folders(tmp_path / "pred")


def test_main_writes_json_and_table(tmp_path, capsys):
    _write(tmp_path / "gt" / "sub" / "a.png", np.array([[0, 0, 1, 255]]))
    _write(tmp_path / "pred" / "a.png", np.array([[3, 3, 4, 0]]))  # matched by bare file name
    (tmp_path / "classes.txt").write_text("0 road\n1 car\n")
    out = tmp_path / "eval" / "metrics.json"
    argv = [
        str(tmp_path / "pred"),
        "--gt-dir",
        str(tmp_path / "gt"),
        "--class-names",
        str(tmp_path / "classes.txt"),
    ]
    assert main([*argv, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "road" in printed and "mIoU" in printed and "100.00" in printed
    data = json.loads(out.read_text())
    assert data["mIoU"] == 1.0 and data["per_class_iou"] == {"road": 1.0, "car": 1.0}
    assert data["n_clusters"] == 5 and data["mapping"][3:] == [0, 1]
    assert main([str(tmp_path / "pred"), "--gt-dir", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
