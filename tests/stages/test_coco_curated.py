"""Curated COCO-Stuff (issue 12 item 2) and COCO's instance-annotated image lists (item 4), on a small tree in COCO's
layout built from the real samples of ../shared/data/coco_stuff_samples."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers.data import REPO, require_shared_data

from transfgu.config import load_config
from transfgu.data.datasets import DatasetError, list_records

PRESET = REPO / "conf" / "coco_stuff27_curated.yaml"


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory) -> Path:
    """``images/<split>2017``, ``annotations/<split>2017`` (stuffthingmaps), ``annotations/instances_*.json``, and the
    curated lists ``curated/<split>2017/Coco164kFull_Stuff_Coarse_7.txt`` (as the IIC/PiCIE release names them)."""
    src = require_shared_data("coco_stuff_samples")
    root = tmp_path_factory.mktemp("cocostuff")
    for split in ("train2017", "val2017"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        stems = sorted(p.stem for p in (src / "images" / split).glob("*.jpg"))
        for s in stems:
            shutil.copy(src / "images" / split / f"{s}.jpg", root / "images" / split)
            shutil.copy(src / "labels" / split / f"{s}.png", root / "annotations" / split)
        # instances: every image but the first has an object (the reference drops images without one)
        anns = [{"id": n, "image_id": int(s), "category_id": 1} for n, s in enumerate(stems[1:])]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": [{"id": int(s)} for s in stems], "annotations": anns})
        )
        (root / "curated" / split).mkdir(parents=True)
        keep = stems[1:7] if split == "train2017" else stems[2:5]
        (root / "curated" / split / "Coco164kFull_Stuff_Coarse_7.txt").write_text("\n".join(keep) + "\n")
    return root


def _cfg(root: Path, run_root: Path, **over: str):
    overrides = {
        "data.root": str(root),
        "data.options.curated_list_train": str(root / "curated/train2017/Coco164kFull_Stuff_Coarse_7.txt"),
        "data.options.curated_list_val": str(root / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt"),
        "backbone.arch": "vit_test_tiny", "backbone.weights": "none",
        "crops.input_size": "[96, 96]", "crops.betas": "[0.5]", "crops.selection": "all", "crops.crop_size": "32",
        "concepts.k_per_pool": "{all: 4}", "concepts.niter": "5",
        "pseudo.input_size": "[64, 64]", "train.train_size": "[64, 64]", "train.batch_size": "4",
        "train.epochs": "1", "eval.eval_size": "[64, 64]", "eval.batch_size": "4",
        "run.root": str(run_root), "run.name": "curated", "mlflow.enabled": "false", "run.report": "false",
    }
    overrides.update(over)
    return load_config(PRESET, [f"{k}={v}" for k, v in overrides.items()])


def test_curated_preset_passes_preflight_and_uses_full_train_for_the_bank(coco_tree, tmp_path):
    from transfgu.pipeline import run_pipeline
    from transfgu.preflight import preflight
    from transfgu.store.manifest import Manifest

    torch.set_num_threads(2)
    cfg = _cfg(coco_tree, tmp_path)
    n_train_all = len(list((coco_tree / "images" / "train2017").glob("*.jpg")))
    assert preflight(cfg) == {"train": 6, "val": 3}  # the curated subsets resolve in both splits
    run_pipeline(cfg)
    run = cfg.run_dir
    feats = pq.read_table(run / "features", columns=["image_id"])["image_id"].to_pylist()
    bank = pq.read_table(run / "label_bank", columns=["image_id"])["image_id"].to_pylist()
    assert len(set(feats)) == n_train_all and len(bank) == n_train_all  # crops, concepts, bank: the full split
    man = Manifest.load(run)
    assert man.stage("train")["rows"] == 6  # training: the curated train list
    assert json.loads((run / "eval" / "metrics.json").read_text())["n_images"] == 3  # evaluation: curated val list


def test_one_curated_list_for_both_splits_is_refused_by_preflight(coco_tree, tmp_path):
    from transfgu.preflight import PreflightError, preflight

    one = coco_tree / "curated/train2017/Coco164kFull_Stuff_Coarse_7.txt"
    cfg = _cfg(coco_tree, tmp_path, **{"data.options": f"{{granularity: 27, curated_list: {one}}}"})
    with pytest.raises(PreflightError, match="curated_list_train and curated_list_val"):
        preflight(cfg)


def test_changing_the_curated_lists_keeps_the_label_bank_stage(coco_tree, tmp_path):
    from transfgu.methods import stage_hashes

    a = stage_hashes(_cfg(coco_tree, tmp_path))
    b = stage_hashes(_cfg(coco_tree, tmp_path, **{"data.options.curated_list_train": str(
        coco_tree / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt")}))
    assert a["label_bank"] == b["label_bank"] and a["train"] != b["train"]


def test_with_instances_keeps_images_with_an_object(coco_tree):
    every = [r.image_id for r in list_records("coco_stuff", coco_tree, "train")]
    with_obj = [r.image_id for r in list_records("coco_stuff", coco_tree, "train", with_instances=True)]
    assert with_obj == every[1:]
    (coco_tree / "annotations" / "instances_val2017.json").rename(coco_tree / "x.json")
    try:
        with pytest.raises(DatasetError, match="instances_val2017.json"):
            list_records("coco_stuff", coco_tree, "val", with_instances=True)
    finally:
        (coco_tree / "x.json").rename(coco_tree / "annotations" / "instances_val2017.json")
