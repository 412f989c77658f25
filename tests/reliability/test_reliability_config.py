"""Reliability, bad configuration and environment (issue 5 item 3): fail before any work, say what to change.

Schema errors (unknown keys, wrong types, K < 1, beta outside (0, 1], bad sizes) are caught by ``load_config``;
``tests/unit/test_config.py::test_bad_values_fail_with_the_key_named`` covers the dotted-override forms, this file adds
the YAML-file and CLI forms. Everything that needs the disk, the device or the backbone's patch size is
:func:`transfgu.preflight.preflight`'s job; its checks are tested directly here, and through ``run_pipeline``
(no ``features/`` directory may appear), which ``run_pipeline`` calls before its first stage.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers.configs import tiny_config
from PIL import Image

from transfgu.cli import run_main
from transfgu.config import ConfigError, load_config
from transfgu.pipeline import run_pipeline
from transfgu.preflight import PreflightError, patch_size_of, preflight
from transfgu.store.manifest import Manifest

torch.set_num_threads(2)


# -- schema: YAML files and the CLI ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("yaml_text", "needles"),
    [
        ("train:\n  epochs: two\n", ["train.epochs", "integer"]),
        ("train:\n  lr: [1]\n", ["train.lr"]),
        ("concepts:\n  k_per_pool: {fg: 0, bg: 3}\n", ["concepts.k_per_pool", "K must be >= 1"]),
        ("crops:\n  betas: [0.5, 0]\n", ["crops.betas", "(0, 1]"]),
        ("crops:\n  betas: [1.5]\n", ["crops.betas", "(0, 1]"]),
        ("crops:\n  betas: []\n", ["crops.betas", "empty"]),
        ("run:\n  error_budget: 2\n", ["run.error_budget"]),
        ("run:\n  device: gpu\n", ["run.device", "cuda"]),
        ("data:\n  root: /x\n  roots: /y\n", ["roots"]),
        ("trian:\n  lr: 1\n", ["trian"]),
        ("- a list\n", ["mapping"]),
    ],
)
def test_bad_yaml_fails_with_the_key_named(tmp_path, yaml_text, needles):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for needle in needles:
        assert needle in str(info.value)


def test_cli_rejects_a_bad_config_before_creating_anything(tmp_path, capsys):
    root = tmp_path / "runs"
    assert run_main([f"run.root={root}", "train.epocs=3"]) == 2
    err = capsys.readouterr().err
    assert "train.epocs" in err and "epochs" in err  # names the typo and lists the known keys
    assert run_main([f"run.root={root}", "crops.betas=[0.5, 2]"]) == 2
    assert "crops.betas" in capsys.readouterr().err
    assert not root.exists()


# -- preflight, called directly ---------------------------------------------------------------------------------
def _copy_set(tmp_path: Path, camvid: Path, n: int = 2) -> Path:
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / "images" / split).mkdir(parents=True)
        (data / "labels" / split).mkdir(parents=True)
        for img in sorted((camvid / "images" / split).glob("*.jpg"))[:n]:
            shutil.copy(img, data / "images" / split / img.name)
            shutil.copy(camvid / "labels" / split / f"{img.stem}.png", data / "labels" / split / f"{img.stem}.png")
    shutil.copy(camvid / "classes.txt", data / "classes.txt")
    return data


def _missing_val_label(data: Path) -> None:
    next((data / "labels" / "val").glob("*.png")).unlink()


def _duplicate_id(data: Path) -> None:
    img = next((data / "images" / "train").glob("*.jpg"))
    Image.open(img).save(img.with_suffix(".png"))


# name -> (overrides, data mutation, key named in the message, a fragment of the advice)
CASES = {
    "missing data root": ({"data.root": "/nonexistent/camvid"}, None, "data.root", "folder not found"),
    "empty data root": ({}, "empty", "data.train_split", "no labelled images"),
    "missing val label": ({}, _missing_val_label, "data.val_split", "on_missing_label=skip"),
    "duplicate image ids": ({}, _duplicate_id, "data.train_split", "duplicate image id"),
    "missing weights": ({"backbone.weights": "/nonexistent/dino_vits8.pth"}, None, "backbone.weights",
                        "file not found"),
    "window below a patch": ({"crops.betas": "[0.5, 0.05]"}, None, "crops.betas", "b >= 2"),
    "window larger than the grid": ({"crops.betas": "[1.0]", "crops.input_size": "[64, 64]"}, None, "crops.betas",
                                    "no window fits"),
    "input not whole patches": ({"crops.input_size": "[90, 124]"}, None, "crops.input_size", "[88, 128]"),
    "pseudo input not whole patches": ({"pseudo.input_size": "[60, 76]"}, None, "pseudo.input_size", "multiple"),
    "train crops not whole patches": ({"train.train_size": "[72, 80]"}, None, "train.train_size", "[64, 80]"),
    "crop size not whole patches": ({"crops.crop_size": "30"}, None, "crops.crop_size", "32"),
}


def _case_config(tmp_path: Path, camvid: Path, case: str):
    over, mutate, _, _ = CASES[case]
    data = _copy_set(tmp_path, camvid)
    if mutate == "empty":
        shutil.rmtree(data / "images" / "train")
        (data / "images" / "train").mkdir()
    elif mutate is not None:
        mutate(data)
    base = {"data.root": str(data), "data.max_train_images": "2", "data.max_val_images": "2", "train.epochs": "1"}
    return tiny_config(tmp_path / "runs", case.replace(" ", "_"), **{**base, **over})


@pytest.mark.parametrize("case", sorted(CASES))
def test_preflight_names_the_key_and_the_fix(tmp_path, camvid, case):
    cfg = _case_config(tmp_path, camvid, case)
    _, _, key, advice = CASES[case]
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    msg = str(info.value)
    assert f" {key}: " in msg and advice in msg and "\n" not in msg, msg  # one line
    assert not cfg.run_dir.exists()  # preflight writes nothing


def test_preflight_passes_a_good_config_and_counts_images(tmp_path, camvid):
    cfg = tiny_config(tmp_path / "runs")
    assert preflight(cfg) == {"train": 367, "val": 101}
    assert not cfg.run_dir.exists()
    assert patch_size_of("vit_small_patch8") == 8 and patch_size_of("dinov2_vits14") == 14
    assert patch_size_of("vit_base_patch16") == 16 and patch_size_of("vit_test_tiny") == 8


def test_preflight_lists_every_problem_at_once(tmp_path):
    cfg = tiny_config(tmp_path / "runs", **{"data.root": str(tmp_path / "nope"), "backbone.weights": "/no/w.pth",
                                           "crops.betas": "[0.01]"})
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    msg = str(info.value)
    assert "3 problem(s)" in msg and all(k in msg for k in ("data.root", "backbone.weights", "crops.betas"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_a_gpu(tmp_path):
    cfg = tiny_config(tmp_path / "runs", **{"run.device": "cuda"})
    with pytest.raises(PreflightError, match=r"run\.device: cuda was requested.*set run\.device=cpu"):
        preflight(cfg)
    # Through the pipeline it already fails before any stage (Context resolves the device first).
    with pytest.raises((RuntimeError, PreflightError), match=r"run\.device"):
        run_pipeline(cfg)
    assert not (cfg.run_dir / "features").exists()
    assert Manifest.load(cfg.run_dir).stages == {}


# -- through the pipeline: nothing may start --------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing data root", "missing weights", "window below a patch",
                                  "missing val label", "duplicate image ids", "train crops not whole patches"])
def test_pipeline_fails_before_any_stage(tmp_path, camvid, case):
    cfg = _case_config(tmp_path, camvid, case)
    try:
        with pytest.raises(PreflightError, match=CASES[case][2].replace(".", r"\.")):
            run_pipeline(cfg)
    finally:
        assert not (cfg.run_dir / "features").exists()
        assert Manifest.load(cfg.run_dir).stages == {}
