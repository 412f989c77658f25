"""The one-process pipeline end to end on real CamVid images: every file of the run directory, resume, determinism."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from helpers.configs import tiny_config
from safetensors.torch import load_file

from transfgu.pipeline import run_pipeline
from transfgu.stages import STAGES
from transfgu.store.manifest import Manifest


def test_run_directory_has_every_file(tiny_run_dir):
    run = tiny_run_dir
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["backbone"]["arch"] == "vit_test_tiny"
    feats = pq.read_table(run / "features")
    assert set(feats.column_names) >= {"image_id", "split", "crop_index", "scale", "box", "pool", "cls"}
    assert feats.num_rows > 0 and set(feats["pool"].to_pylist()) == {"all"}
    assert len(set(feats["image_id"].to_pylist())) == 6
    assert np.load(run / "concepts" / "centroids.npy").shape == (4, 48)
    bank = pq.read_table(run / "label_bank")
    assert bank.num_rows == 6 and set(bank["K"].to_pylist()) == {4}
    rounds = sorted(p.name for p in (run / "train").glob("round_*"))
    assert rounds == ["round_000", "round_001"]  # epoch 0 without teacher, reboot at epoch 1 (start 1)
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 1 and 0 <= metrics["pixel_accuracy"] <= 1
    assert metrics["pretrained"] is False and "random backbone" in metrics["warning"]
    assert len(metrics["per_class_iou"]) == 11 and "Sky" in metrics["per_class_iou"]
    model = json.loads((run / "model" / "model.json").read_text())
    assert model["backbone"]["pretrained"] is False and len(model["cluster_to_class"]) == 4
    assert (run / "model" / "backbone.safetensors").is_file() and (run / "backbone_random.safetensors").is_file()
    manifest = json.loads((run / "_manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in STAGES)
    assert manifest["stages"]["extract"]["rows"] == feats.num_rows
    assert "RUN WITHOUT PRETRAINED WEIGHTS" in (run / "pipeline.log").read_text()


def _mtimes(run):
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*.parquet")} | {
        str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*.safetensors")
    }


def test_rerun_recomputes_nothing_and_config_change_reruns_downstream_only(tiny_run_dir, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run_dir, run)
    before = _mtimes(run)
    run_pipeline(tiny_config(tmp_path, "tiny"))
    assert _mtimes(run) == before
    # A training setting changes: features, concepts and label bank are kept, training and evaluation rerun.
    run_pipeline(tiny_config(tmp_path, "tiny", **{"train.lr": "0.001"}))
    after = _mtimes(run)
    kept = [k for k in before if k.startswith(("features", "label_bank")) or k == "backbone_random.safetensors"]
    assert kept and all(after[k] == before[k] for k in kept)
    assert after["model/decoder.safetensors"] != before["model/decoder.safetensors"]


def test_interrupted_training_resumes_to_the_same_weights(tiny_run_dir, tmp_path):
    """Drop the last round's state (as if the process died after round 0): the resumed run ends bit-identical."""
    run = tmp_path / "tiny"
    shutil.copytree(tiny_run_dir, run)
    shutil.rmtree(run / "train" / "round_001")
    m = Manifest.load(run)
    m.mark_running("train")
    torch.set_num_threads(2)  # as tiny_run_dir: the thread count sets the order of float reductions
    run_pipeline(tiny_config(tmp_path, "tiny"))
    full = load_file(str(tiny_run_dir / "model" / "decoder.safetensors"))
    resumed = load_file(str(run / "model" / "decoder.safetensors"))
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)


def test_same_seed_same_results(tiny_run_dir, tmp_path):
    run_pipeline(tiny_config(tmp_path, "again"))
    a = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    b = json.loads((tmp_path / "again" / "eval" / "metrics.json").read_text())
    assert a["mIoU"] == b["mIoU"] and a["pixel_accuracy"] == b["pixel_accuracy"]


def test_things_variant_with_fg_prior_runs(tmp_path):
    """The object-centric setting (VOC / COCO-80 / LIP): fg crops only, K+1 channels with background (eq. 8)."""
    cfg = tiny_config(
        tmp_path, "things",
        **{"data.name": "weizmann_horse", "data.root": str(tiny_config(tmp_path).data.root.parent / "weizmann_horse"),
           "crops.selection": "fg", "concepts.k_per_pool": "{fg: 2}", "train.variant": "things"},
    )
    run_pipeline(cfg)
    feats = pq.read_table(cfg.run_dir / "features")
    assert set(feats["pool"].to_pylist()) == {"fg"}
    metrics = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    assert len(metrics["mapping"]) == 3 and len(metrics["per_class_iou"]) == 2


def test_error_budget_stops_a_run_with_too_many_bad_images(tmp_path):
    from transfgu.errors import ErrorBudgetExceeded

    data = tmp_path / "data"
    src = tiny_config(tmp_path).data.root
    for split in ("train", "val"):
        (data / "images" / split).mkdir(parents=True)
        (data / "labels" / split).mkdir(parents=True)
        for img in sorted((src / "images" / split).glob("*.jpg"))[:4]:
            shutil.copy(img, data / "images" / split / img.name)
            shutil.copy(src / "labels" / split / (img.stem + ".png"), data / "labels" / split / (img.stem + ".png"))
    shutil.copy(src / "classes.txt", data / "classes.txt")
    bad = sorted((data / "images" / "train").glob("*.jpg"))
    bad[0].write_bytes(b"")
    bad[1].write_bytes(bad[1].read_bytes()[:200])
    cfg = tiny_config(tmp_path, "budget", **{"data.root": str(data), "run.error_budget": "0.1"})
    with pytest.raises(ErrorBudgetExceeded, match="2 of 4"):
        run_pipeline(cfg)
    errors = [json.loads(line) for line in (cfg.run_dir / "errors.jsonl").read_text().splitlines()]
    assert {e["stage"] for e in errors} == {"extract"} and len(errors) == 2
    # Within budget the same data trains on the good images and records the bad ones.
    cfg = tiny_config(tmp_path, "budget_ok", **{"data.root": str(data), "run.error_budget": "0.5"})
    run_pipeline(cfg)
    assert json.loads((cfg.run_dir / "_manifest.json").read_text())["stages"]["extract"]["extra"]["errors"] == 2
