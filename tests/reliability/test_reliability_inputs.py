"""Reliability, bad inputs (issue 5 item 1): broken and odd files through the real one-process pipeline.

One shared run over a crafted CamVid-layout folder holds every bad input at once: the odd-but-valid files must be
decoded correctly (asserted on their pixels and, for the EXIF photo, on its features), the broken ones recorded as
(file, stage, reason) in ``<run>/errors.jsonl`` and counted in the manifest, and every good image must still reach
the features, the label bank, training and evaluation. The pixel-level unit tests of each decoder path are in
``tests/unit/test_data.py``; here the point is that the pipeline survives them end to end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.configs import tiny_config
from PIL import Image

from transfgu.data.io import load_rgb
from transfgu.errors import ErrorBudgetExceeded
from transfgu.pipeline import run_pipeline
from transfgu.store.formats import read_features, read_label_bank

torch.set_num_threads(2)

# image id -> what it is; all decodable.
GOOD_TRAIN = {
    "plain_a": "a CamVid JPEG as it is",
    "plain_b": "a CamVid JPEG as it is",
    "rgb_ref": "lossless PNG of CamVid image 0 (reference for the EXIF photo)",
    "exif_rot6": "PNG stored rotated, EXIF orientation 6: displays as rgb_ref",
    "gray": "8-bit grayscale JPEG",
    "rgba": "RGBA PNG with an alpha gradient",
    "palette": "palette (P) PNG",
    "gray16": "16-bit grayscale PNG",
    "cmyk": "CMYK JPEG",
    "tiny": "5x7 pixels: smaller than one patch and than the smallest window",
    "huge": "8000x6000 JPEG",
    "straße ü 日本": "non-ASCII name with spaces",
    "with space": "name with a space",
}
BAD_TRAIN = {
    "zero_bytes.jpg": "empty",
    "truncated.jpg": "truncated",
    "not_an_image.jpg": "not a recognised image format",
}
GOOD_VAL = 3
BAD_VAL = {  # file blamed in errors.jsonl -> reason fragment
    "labels/val/size_mismatch.png": "label",
    "labels/val/unknown_ids.png": "77",
    "labels/val/missing_label.png": "label file missing",
    "images/val/val_zero_bytes.jpg": "empty",
}


def _src(camvid: Path, split: str, i: int) -> tuple[Path, Path]:
    img = sorted((camvid / "images" / split).glob("*.jpg"))[i]
    return img, camvid / "labels" / split / (img.stem + ".png")


def build_bad_folder(root: Path, camvid: Path) -> Path:
    """A CamVid-layout folder (images/<split>, labels/<split>, classes.txt) full of odd and broken files."""
    tr, va, lv, lt = (root / "images" / "train", root / "images" / "val", root / "labels" / "val",
                      root / "labels" / "train")
    for d in (tr, va, lv, lt):
        d.mkdir(parents=True)
    shutil.copy(camvid / "classes.txt", root / "classes.txt")
    srcs = [np.asarray(Image.open(_src(camvid, "train", i)[0]).convert("RGB")) for i in range(8)]
    for i, name in enumerate(("plain_a", "plain_b")):  # the other training images have no label file
        shutil.copy(_src(camvid, "train", i)[0], tr / f"{name}.jpg")
        shutil.copy(_src(camvid, "train", i)[1], lt / f"{name}.png")
    Image.fromarray(srcs[2]).save(tr / "rgb_ref.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    Image.fromarray(np.ascontiguousarray(np.rot90(srcs[2], k=1))).save(tr / "exif_rot6.png", exif=exif.tobytes())
    Image.fromarray(srcs[3]).convert("L").save(tr / "gray.jpg", quality=95)
    alpha = np.broadcast_to(np.linspace(0, 255, srcs[4].shape[1]).astype(np.uint8), srcs[4].shape[:2])
    Image.fromarray(np.dstack([srcs[4], alpha]), "RGBA").save(tr / "rgba.png")
    Image.fromarray(srcs[5]).quantize(colors=64).save(tr / "palette.png")
    gray16 = (srcs[6][..., 1].astype(np.uint16) * 257) // 3 + 1000
    Image.fromarray(gray16).save(tr / "gray16.png")
    Image.fromarray(srcs[7]).convert("CMYK").save(tr / "cmyk.jpg", quality=95)
    Image.fromarray(srcs[0][:5, :7]).save(tr / "tiny.png")
    Image.fromarray(srcs[1]).resize((8000, 6000), Image.BILINEAR).save(tr / "huge.jpg", quality=85)
    shutil.copy(_src(camvid, "train", 3)[0], tr / "straße ü 日本.jpg")
    shutil.copy(_src(camvid, "train", 4)[0], tr / "with space.jpg")
    (tr / "zero_bytes.jpg").write_bytes(b"")
    whole = _src(camvid, "train", 5)[0].read_bytes()
    (tr / "truncated.jpg").write_bytes(whole[: len(whole) // 3])
    (tr / "not_an_image.jpg").write_text("this is a text file with an image's name\n")

    for i in range(GOOD_VAL):
        img, lab = _src(camvid, "val", i)
        shutil.copy(img, va / img.name)
        shutil.copy(lab, lv / lab.name)
    img, lab = _src(camvid, "val", 3)
    shutil.copy(img, va / "size_mismatch.jpg")
    Image.open(lab).crop((0, 0, 200, 100)).save(lv / "size_mismatch.png")
    shutil.copy(img, va / "unknown_ids.jpg")
    raw = np.asarray(Image.open(lab)).copy()
    raw[:10, :10] = 77  # CamVid has ids 0..11 (+255)
    Image.fromarray(raw).save(lv / "unknown_ids.png")
    shutil.copy(img, va / "missing_label.jpg")
    (va / "val_zero_bytes.jpg").write_bytes(b"")
    shutil.copy(lab, lv / "val_zero_bytes.png")
    return root


def _errors(run: Path) -> list[dict]:
    path = run / "errors.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory, camvid):
    base = tmp_path_factory.mktemp("bad_inputs")
    data = build_bad_folder(base / "data", camvid)
    cfg = tiny_config(
        base / "runs", "bad",
        **{"data.root": str(data), "data.max_train_images": "null", "data.max_val_images": "null",
           # Training never reads labels; the evaluation records and skips a missing one (DatasetError).
           "data.options": "{on_missing_label: keep}", "run.error_budget": "0.6", "train.epochs": "1",
           "mlflow.enabled": "true"},
    )
    run_pipeline(cfg)
    return cfg.run_dir, data


def test_every_good_image_is_processed(bad_run):
    run, _ = bad_run
    meta, cls = read_features(run / "features")
    assert set(meta["image_id"].to_pylist()) == set(GOOD_TRAIN)
    bank = read_label_bank(run / "label_bank")
    assert set(bank) == set(GOOD_TRAIN) and all(m.shape[0] == 4 for m in bank.values())
    stages = json.loads((run / "_manifest.json").read_text())["stages"]
    assert all(s["status"] == "done" for s in stages.values())
    assert stages["extract"]["extra"]["images"] == len(GOOD_TRAIN)
    assert stages["train"]["rows"] == len(GOOD_TRAIN)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["n_images"] == GOOD_VAL  # the four bad validation samples were left out, not fatal
    assert np.isfinite(cls).all()


def test_broken_files_are_recorded_and_counted(bad_run):
    run, data = bad_run
    errors = _errors(run)
    for stage in ("extract", "label_bank"):
        got = {Path(e["file"]).name: e["reason"] for e in errors if e["stage"] == stage}
        assert set(got) == set(BAD_TRAIN), stage
        for name, needle in BAD_TRAIN.items():
            assert needle in got[name] and name in got[name]  # the reason names the file
        assert all(Path(e["file"]).is_absolute() and Path(e["file"]).parent == data / "images" / "train"
                   for e in errors if e["stage"] == stage)
    stages = json.loads((run / "_manifest.json").read_text())["stages"]
    assert stages["extract"]["extra"]["errors"] == len(BAD_TRAIN)
    assert stages["label_bank"]["extra"]["errors"] == len(BAD_TRAIN)


def _mlflow_stage_metric(run: Path, metric: str) -> dict[str, float]:
    from mlflow import MlflowClient

    from transfgu.config import load_config
    from transfgu.tracking import resolve_tracking_uri

    cfg = load_config(run / "config.yaml")
    client = MlflowClient(resolve_tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string="tags.pipeline_stage != ''")
    return {r.data.tags["pipeline_stage"]: r.data.metrics[metric] for r in runs if metric in r.data.metrics}


def test_broken_files_are_counted_in_mlflow(bad_run):
    run, _ = bad_run
    errors = _mlflow_stage_metric(run, "errors")
    assert errors["extract"] == errors["label_bank"] == len(BAD_TRAIN)


def test_bad_validation_samples_are_recorded_and_counted(bad_run):
    run, data = bad_run
    got = {str(Path(e["file"]).relative_to(data)): e["reason"] for e in _errors(run) if e["stage"] == "evaluate"}
    assert set(got) == set(BAD_VAL)
    for f, needle in BAD_VAL.items():
        assert needle in got[f]
    stages = json.loads((run / "_manifest.json").read_text())["stages"]
    assert stages["evaluate"]["extra"]["errors"] == len(BAD_VAL)
    assert _mlflow_stage_metric(run, "errors")["evaluate"] == len(BAD_VAL)


def test_odd_formats_decode_to_the_right_pixels(bad_run, camvid):
    _, data = bad_run
    tr = data / "images" / "train"
    src = [np.asarray(Image.open(_src(camvid, "train", i)[0]).convert("RGB")).astype(np.int32) for i in range(8)]
    # EXIF orientation applied: the rotated file displays exactly as the reference PNG.
    np.testing.assert_array_equal(load_rgb(tr / "exif_rot6.png"), load_rgb(tr / "rgb_ref.png"))
    # CMYK converted back to the source colours (JPEG loss only; inverted or raw CMYK would be off by ~100).
    assert np.abs(load_rgb(tr / "cmyk.jpg").astype(np.int32) - src[7]).mean() < 4
    gray = load_rgb(tr / "gray.jpg")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    luma = np.asarray(Image.fromarray(src[3].astype(np.uint8)).convert("L"), dtype=np.int32)
    assert np.abs(gray[..., 0].astype(np.int32) - luma).mean() < 2
    rgba = load_rgb(tr / "rgba.png").astype(np.int32)
    assert (rgba[:, 0] == 0).all()  # alpha 0 on the left edge: composited on black
    np.testing.assert_allclose(rgba[:, -1], src[4][:, -1], atol=1)  # opaque on the right edge
    pal = Image.open(tr / "palette.png")
    assert pal.mode == "P"
    np.testing.assert_array_equal(load_rgb(tr / "palette.png"), np.asarray(pal.convert("RGB")))
    g16 = np.asarray(Image.open(tr / "gray16.png")).astype(np.int64)
    assert g16.max() > 255  # really 16-bit content
    np.testing.assert_array_equal(load_rgb(tr / "gray16.png")[..., 0], (g16 * 255 + 32767) // 65535)
    assert load_rgb(tr / "tiny.png").shape == (5, 7, 3)
    assert load_rgb(tr / "huge.jpg").shape == (6000, 8000, 3)


def test_exif_photo_gives_the_features_of_its_upright_twin(bad_run):
    """End to end: the EXIF-rotated file's crops and concept maps equal those of the upright reference."""
    run, _ = bad_run
    meta, cls = read_features(run / "features")
    ids = np.asarray(meta["image_id"].to_pylist())
    ref, rot = ids == "rgb_ref", ids == "exif_rot6"
    assert ref.sum() == rot.sum() > 0
    np.testing.assert_allclose(cls[rot], cls[ref], rtol=0, atol=1e-5)
    assert meta.filter(pq_mask(rot))["box"].to_pylist() == meta.filter(pq_mask(ref))["box"].to_pylist()
    bank = read_label_bank(run / "label_bank")
    np.testing.assert_allclose(bank["exif_rot6"].astype(np.float32), bank["rgb_ref"].astype(np.float32), atol=1e-3)
    assert not np.allclose(bank["gray"].astype(np.float32), bank["rgb_ref"].astype(np.float32), atol=1e-3)


def pq_mask(mask: np.ndarray):
    import pyarrow as pa

    return pa.array(mask)


def test_folder_source_keeps_duplicate_ids_apart(tmp_path, camvid):
    """``folder``: a.jpg and a.png are two images (ids keep their extension); odd names survive; broken ones are
    recorded."""
    root = tmp_path / "photos"
    (root / "sub dir").mkdir(parents=True)
    shutil.copy(_src(camvid, "train", 0)[0], root / "a.jpg")
    Image.open(_src(camvid, "train", 1)[0]).save(root / "a.png")
    shutil.copy(_src(camvid, "train", 2)[0], root / "sub dir" / "ü b.jpeg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cfg = tiny_config(tmp_path / "runs", "folder",
                      **{"data.name": "folder", "data.root": str(root), "data.val_split": "null",
                         "run.error_budget": "0.5"})
    run_pipeline(cfg, only=["extract"])
    meta, cls = read_features(cfg.run_dir / "features")
    ids = meta["image_id"].to_pylist()
    assert set(ids) == {"a.jpg", "a.png", "sub dir/ü b"}
    a_jpg = cls[np.asarray(ids) == "a.jpg"]
    a_png = cls[np.asarray(ids) == "a.png"]
    assert not np.allclose(a_jpg.mean(0), a_png.mean(0))  # two different images, not one twice
    errors = _errors(cfg.run_dir)
    assert [(Path(e["file"]).name, e["stage"]) for e in errors] == [("broken.png", "extract")]


def _small_set(tmp_path: Path, camvid: Path, n: int = 4) -> Path:
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / "images" / split).mkdir(parents=True)
        (data / "labels" / split).mkdir(parents=True)
        for i in range(n):
            img, lab = _src(camvid, split, i)
            shutil.copy(img, data / "images" / split / img.name)
            shutil.copy(lab, data / "labels" / split / lab.name)
    shutil.copy(camvid / "classes.txt", data / "classes.txt")
    return data


def test_error_budget_message_and_resume_after_raising_it(tmp_path, camvid):
    """Extends tests/stages/test_pipeline.py::test_error_budget_stops_a_run_with_too_many_bad_images: the message says
    what to change, the manifest records the failure, and a re-run with a larger budget keeps the finished shard
    and counts each bad file once."""
    data = _small_set(tmp_path, camvid)
    bad = sorted((data / "images" / "train").glob("*.jpg"))
    bad[0].write_bytes(b"")
    cfg = tiny_config(tmp_path, "budget", **{"data.root": str(data), "run.error_budget": "0.2"})
    with pytest.raises(ErrorBudgetExceeded) as info:
        run_pipeline(cfg, only=["extract"])
    msg = str(info.value)
    assert "1 of 4" in msg and "run.error_budget=20.0%" in msg and "errors.jsonl" in msg and "extract" in msg
    rec = json.loads((cfg.run_dir / "_manifest.json").read_text())["stages"]["extract"]
    assert rec["status"] == "failed" and "ErrorBudgetExceeded" in rec["error"]
    part = cfg.run_dir / "features" / "part-00000.parquet"
    mtime = part.stat().st_mtime_ns
    cfg = tiny_config(tmp_path, "budget", **{"data.root": str(data), "run.error_budget": "0.3"})
    run_pipeline(cfg, only=["extract"])
    assert part.stat().st_mtime_ns == mtime
    rec = json.loads((cfg.run_dir / "_manifest.json").read_text())["stages"]["extract"]
    assert rec["status"] == "done" and rec["extra"]["errors"] == 1 and rec["extra"]["images"] == 3
    assert pq.read_table(part)["image_id"].unique().to_pylist() == [p.stem for p in bad[1:]]
    assert len(_errors(cfg.run_dir)) == 1  # the kept shard is not decoded again: its failure is still counted


def test_eval_dataset_skips_and_records_and_its_cache_changes_nothing(bad_run, tmp_path):
    """EvalDataset on the crafted validation split: the in-memory cache (uint8 labels) gives exactly the samples
    of the uncached path, and the bad samples are recorded with the file to blame."""
    from transfgu.data.datasets import dataset_spec, list_records
    from transfgu.data.loaders import EvalDataset
    from transfgu.errors import ErrorLog

    _, data = bad_run
    spec = dataset_spec("camvid", data)
    records = list_records("camvid", data, "val", on_missing_label="keep")
    log = ErrorLog(tmp_path / "errors.jsonl")
    cached = EvalDataset(records, spec.label_map, (64, 80), spec.ignore_index, errors=log)
    plain = EvalDataset(records, spec.label_map, (64, 80), spec.ignore_index, cache_bytes=0)
    assert cached.cache is not None and plain.cache is None
    assert len(cached) == len(plain) == GOOD_VAL and len(cached.skipped) == len(BAD_VAL)
    for i in range(GOOD_VAL):
        a, b = cached[i], plain[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert a["label"].dtype == torch.int64 and (a["label"] == -1).any() and a["label"].max() < 11
    got = {str(Path(e["file"]).relative_to(data)) for e in log.entries("evaluate")}
    assert got == set(BAD_VAL)
