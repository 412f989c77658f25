"""Leopart's stages follow the one resume rule of every sharded stage (transfgu.integrity).

A re-run in the same run directory with one changed setting must give what a fresh run with that setting gives
(dense shards planned by image id and stamped with the stage hash; outputs of other inputs moved to ``_stale/``),
and a run started by one executor resumes in the other without redoing the shards it finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import leopart_config


def _dense_by_image(run: Path, split: str) -> dict[str, np.ndarray]:
    from transfgu.leopart.dense import read_dense
    from transfgu.store.formats import list_parquet_files

    return {im.image_id: im.feats for f in list_parquet_files(run / "dense" / split) for im in read_dense(f)}


def _assert_same_run(run: Path, fresh: Path, upto: str = "evaluate") -> None:
    """Every output of ``run`` equals ``fresh``'s, image by image (file names may differ: a grown list adds a piece)."""
    from transfgu.leopart.pipeline import read_segments

    for split in ("train", "val"):
        a, b = _dense_by_image(run, split), _dense_by_image(fresh, split)
        assert sorted(a) == sorted(b), split
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    files = ["pca/pca.safetensors"]
    if upto != "pca":
        files += ["cbfe/cbfe.safetensors", "communities/communities.safetensors", "model/leopart.safetensors"]
    for rel in files:
        assert (run / rel).read_bytes() == (fresh / rel).read_bytes(), rel
    if upto == "pca":
        return
    for split in ("train", "val"):
        a, b = read_segments(run, split), read_segments(fresh, split)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    m, fm = (json.loads((r / "eval" / "metrics.json").read_text()) for r in (run, fresh))
    for key in ("mIoU", "pixel_accuracy", "n_segments", "n_images", "overclustering", "mapping"):
        assert m[key] == fm[key], key


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    from transfgu.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("lp_resume")
    cfg = leopart_config(root, "base")
    run_pipeline(cfg)
    return cfg


# data.max_train_images 12 -> 10 (shard set aside) and -> 14 (kept shard + a piece for the two new images), the
# dense input size (every stage redone), the number of CBFE clusters (dense and pca kept)
CHANGES = [
    {"data.max_train_images": "10"},
    pytest.param({"data.max_train_images": "14"}, marks=pytest.mark.slow),
    pytest.param({"leopart.input_size": "[48, 48]"}, marks=pytest.mark.slow),
    pytest.param({"leopart.k_cbfe": "10"}, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("change", CHANGES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_rerun_with_one_changed_setting_equals_a_fresh_run(base_run, tmp_path, change):
    from transfgu.pipeline import run_pipeline

    shutil.copytree(base_run.run_dir, tmp_path / "again")
    cfg = leopart_config(tmp_path, "again", **change)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cfg.run_dir / "dense").rglob("*.parquet")}
    manifest = run_pipeline(cfg)
    fresh = leopart_config(tmp_path / "fresh", "fresh", **change)
    fresh_manifest = run_pipeline(fresh)
    _assert_same_run(cfg.run_dir, fresh.run_dir)
    for stage in ("dense", "segments"):
        for key in ("rows", "train_images", "val_images", "errors", "segments"):
            assert manifest["stages"][stage]["extra"].get(key) == fresh_manifest["stages"][stage]["extra"].get(key)
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (cfg.run_dir / "dense").rglob("*.parquet")}
    if "leopart.k_cbfe" in change:  # downstream of the dense stage: its shards are kept as they are
        assert after == before
    stale = cfg.run_dir / "_stale"
    if "leopart.k_cbfe" in change:
        assert (stale / "cbfe").is_dir() and not (stale / "dense").exists()
    else:
        assert (stale / "dense").is_dir() and (stale / "pca").is_dir()


def test_force_sets_a_stage_aside_and_recomputes_it(base_run, tmp_path):
    from transfgu.pipeline import run_pipeline

    shutil.copytree(base_run.run_dir, tmp_path / "forced")
    cfg = leopart_config(tmp_path, "forced")
    old = (cfg.run_dir / "dense" / "train" / "part-00000.parquet").stat().st_ino
    run_pipeline(cfg, only=["dense", "pca"], force=["dense"])
    kept = cfg.run_dir / "_stale" / "dense" / "unstamped" / "dense" / "train" / "part-00000.parquet"
    assert kept.stat().st_ino == old  # moved, not copied or deleted
    _assert_same_run(cfg.run_dir, base_run.run_dir, upto="pca")


def test_a_stage_refuses_inputs_of_other_settings(base_run, tmp_path):
    from transfgu.integrity import IntegrityError
    from transfgu.leopart.pipeline import run_cbfe
    from transfgu.local import LocalExecutor
    from transfgu.methods import run_context

    shutil.copytree(base_run.run_dir, tmp_path / "mixed")
    cfg = leopart_config(tmp_path, "mixed", **{"leopart.pca_dim": "12"})  # pca/ is the 16-dim one of base
    with pytest.raises(IntegrityError, match="the PCA"):
        run_cbfe(run_context(cfg), LocalExecutor())


def _interrupt_dense(run: Path) -> None:
    """What a run stopped during the dense stage's val split leaves: the training shards, no val, no record."""
    man = json.loads((run / "_manifest.json").read_text())
    for stage in list(man["stages"]):
        man["stages"].pop(stage)
    (run / "_manifest.json").write_text(json.dumps(man))
    shutil.rmtree(run / "dense" / "val")
    for name in ("pca", "cbfe", "communities", "model", "segments", "eval"):
        if (run / name).exists():
            shutil.rmtree(run / name)


def _identity(run: Path) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (run / "dense" / "train").glob("*.parquet")}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_run_resumes_in_the_other_executor_and_reruns_on_ray_equal_fresh_runs(base_run, tmp_path, ray_local):
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.pipeline import run_pipeline

    over = {"ray.cpus_per_actor": "0.5", "ray.extract_actors": "[1, 1]", "ray.kmeans_shards": "1"}
    # started in one process, stopped during the dense stage, resumed on Ray: the training shard is kept
    cfg = leopart_config(tmp_path, "one_then_ray", **over)
    run_pipeline(cfg, only=["dense"])
    _interrupt_dense(cfg.run_dir)
    kept = _identity(cfg.run_dir)
    manifest = run_pipeline_ray(cfg, only=["dense", "pca"])
    assert _identity(cfg.run_dir) == kept and not (cfg.run_dir / "_stale").exists()
    assert manifest["stages"]["dense"]["extra"]["val_images"] == 8
    _assert_same_run(cfg.run_dir, base_run.run_dir, upto="pca")

    # a re-run on Ray with another image list equals a fresh one-process run with it
    grown = leopart_config(tmp_path, "one_then_ray", **over, **{"data.max_train_images": "10"})
    run_pipeline_ray(grown, only=["dense", "pca"])
    fresh = leopart_config(tmp_path / "fresh", "ten", **over, **{"data.max_train_images": "10"})
    run_pipeline(fresh, only=["dense", "pca"])
    _assert_same_run(grown.run_dir, fresh.run_dir, upto="pca")

    # started on Ray, stopped during the dense stage, resumed in one process: the training shard is kept
    cfg = leopart_config(tmp_path, "ray_then_one", **over)
    run_pipeline_ray(cfg, only=["dense"])
    _interrupt_dense(cfg.run_dir)
    kept = _identity(cfg.run_dir)
    run_pipeline(cfg)
    assert _identity(cfg.run_dir) == kept and not (cfg.run_dir / "_stale").exists()
    _assert_same_run(cfg.run_dir, base_run.run_dir)
