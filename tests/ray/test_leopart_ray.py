"""Leopart on Ray: the Ray executor writes the same files as the one-process executor, bit for bit.

Both executors run the stage definitions of :mod:`transfgu.leopart.pipeline`; the Ray one extracts with a Ray Data
actor pool, fits the PCA from per-file tasks and runs k-means, CBFE precision and co-occurrence on actors that hold
groups of dense files. Per-file statistics are reduced in file order, so the results must be identical.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.configs import leopart_config

ray = pytest.importorskip("ray")

# 424-692 s at load average 25-30 on the 2-core VM (mostly actor start-up)
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]


def test_ray_run_gives_the_one_process_maps(ray_local, tmp_path):
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.leopart.pipeline import read_segments
    from transfgu.pipeline import run_pipeline

    over = {"data.max_train_images": "40", "data.max_val_images": "6",  # 40 train images: two dense shards
            "ray.cpus_per_actor": "0.5", "ray.extract_actors": "[1, 2]", "ray.kmeans_shards": "2",
            "leopart.overcluster_k": "[5]",
            # the authors' protocol: CBFE threshold and a tiny community-detection grid chosen with train labels
            # (the label-free path's steps are the grid's steps at one point); plus the linear probe (driver)
            "leopart.protocol": "paper", "leopart.paper_grid.k_community": "[6, 8]",
            "leopart.paper_grid.markov_time": "[1.5]", "leopart.paper_grid.edge_threshold": "[0.02, 0.05]",
            "leopart.linear_probe.enabled": "true", "leopart.linear_probe.epochs": "3",
            "leopart.linear_probe.batch_size": "8", "leopart.linear_probe.eval_size": "[32, 32]"}
    one = leopart_config(tmp_path, "one", **over)
    run_pipeline(one)
    dist = leopart_config(tmp_path, "ray", **over)
    manifest = run_pipeline_ray(dist)
    assert all(manifest["stages"][s]["status"] == "done" for s in manifest["stages"])
    assert len(list((dist.run_dir / "dense" / "train").glob("*.parquet"))) == 2
    for rel in ("pca/pca.safetensors", "cbfe/cbfe.safetensors", "communities/communities.safetensors",
                "model/leopart.safetensors"):
        assert (one.run_dir / rel).read_bytes() == (dist.run_dir / rel).read_bytes(), rel
    for split in ("train", "val"):
        a, b = read_segments(one.run_dir, split), read_segments(dist.run_dir, split)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    m1 = json.loads((one.run_dir / "eval" / "metrics.json").read_text())
    m2 = json.loads((dist.run_dir / "eval" / "metrics.json").read_text())
    assert m1["mIoU"] == m2["mIoU"] and m1["overclustering"] == m2["overclustering"]
    # the authors' evaluation: 10 Infomap seeds (mean +- std) on IoU matching, val's own CBFE flags
    assert m1["infomap_seeds"] == m2["infomap_seeds"] and len(m1["infomap_seeds"]["mIoU"]["per_seed"]) == 10
    assert m1["linear_probe"] == m2["linear_probe"] and m1["hyperparameters"] == m2["hyperparameters"]
    c1 = json.loads((one.run_dir / "communities" / "communities.json").read_text())
    c2 = json.loads((dist.run_dir / "communities" / "communities.json").read_text())
    assert c1["selection"]["selected_with"] == "train labels" and len(c1["selection"]["trials"]) == 4
    assert c1["selection"] == c2["selection"]


def test_ray_run_of_the_msrc_preset_under_the_paper_protocol(ray_local, tmp_path):
    """conf/leopart_msrc.yaml (21 classes, no background class: a fixed CBFE threshold and unmatched segments as
    errors) under ``protocol: paper``, shrunk like the horse run: Ray writes the one-process files."""
    from helpers.data import REPO, require_shared_data

    from transfgu.config import load_config
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.pipeline import run_pipeline

    msrc = require_shared_data("msrc_v2")

    def cfg(name):
        over = {"data.root": str(msrc), "data.max_train_images": "24", "data.max_val_images": "8",
                "backbone.arch": "vit_test_tiny", "leopart.input_size": "[64, 64]", "leopart.pca_dim": "16",
                "leopart.k_cbfe": "12", "leopart.cbfe_niter": "10", "leopart.cbfe_nredo": "2",
                "leopart.community_niter": "10", "leopart.cooc_size": "[32, 32]", "leopart.eval_size": "[32, 32]",
                "leopart.overcluster_k": "[5]", "leopart.protocol": "paper", "leopart.precision_threshold": "0.3",
                "leopart.paper_grid.k_community": "[6]", "leopart.paper_grid.markov_time": "[1.5]",
                "leopart.paper_grid.edge_threshold": "[0.02]", "ray.cpus_per_actor": "0.5",
                "ray.extract_actors": "[1, 2]", "ray.kmeans_shards": "2",
                "run.root": str(tmp_path), "run.name": name, "mlflow.enabled": "false", "run.report": "false"}
        return load_config(REPO / "conf" / "leopart_msrc.yaml", [f"{k}={v}" for k, v in over.items()])

    one, dist = cfg("one"), cfg("ray")
    run_pipeline(one)
    manifest = run_pipeline_ray(dist)
    assert all(manifest["stages"][s]["status"] == "done" for s in manifest["stages"])
    for rel in ("pca/pca.safetensors", "cbfe/cbfe.safetensors", "communities/communities.safetensors",
                "model/leopart.safetensors"):
        assert (one.run_dir / rel).read_bytes() == (dist.run_dir / rel).read_bytes(), rel
    m1 = json.loads((one.run_dir / "eval" / "metrics.json").read_text())
    m2 = json.loads((dist.run_dir / "eval" / "metrics.json").read_text())
    assert m1["mIoU"] == m2["mIoU"] and m1["infomap_seeds"] == m2["infomap_seeds"]
    assert m1["unmatched"] == "error" and m1["match"] == "iou"  # nothing to merge into without a background class
    cb = json.loads((one.run_dir / "cbfe" / "cbfe.json").read_text())
    assert cb["threshold"] == 0.3 and "background class" in cb["threshold_rule"]
    assert cb["val_split"] == "val" and "n_foreground_clusters_val" in cb  # val's own CBFE flags
