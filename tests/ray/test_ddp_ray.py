"""Ray Train with two DDP workers (gloo) on two nodes trains the tiny config exactly like the one-process pipeline.

The one-process run and the 2-worker Ray Train run share extraction, concepts and label bank (the run directory is
copied, without the training input stores: the Ray driver writes its own); only the training stage differs. The Ray
side runs on a ``ray.cluster_utils.Cluster`` of a CPU-less head and two 1-CPU nodes, so the two Train workers (one
CPU each) are on different nodes and each streams its share of the training input (packed label bank and image
store, transfgu/data/train_store.py); Train's storage is a separate directory, from which the driver takes the
final model (``result.checkpoint``). Per epoch (two teacher updates) the global loss and its terms, the number
of optimizer steps and of skipped steps agree, and so do the final decoder weights. Five training images in global
batches of 4 give worker pieces of 2 + 2 and then 1 + a placeholder (weight 0).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.configs import tiny_config
from helpers.ray import multi_node_cluster, worker_env

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

TRAIN = {
    "data.max_train_images": "5",
    "train.epochs": "3",  # teacher updates before epochs 1 and 2
    "train.dropout": "0.1",  # the reference's: masks are keyed by global-batch position, so 2 workers = one process
    "ray.num_workers": "2",
    "ray.cpus_per_worker": "1",
    "ray.fit_per_round": "false",
    "ray.use_gpu": "false",
}


def _history(run_dir) -> list[dict]:
    out = []
    for d in sorted((run_dir / "train").glob("round_*")):
        out.append(json.loads((d / "state.json").read_text()))
    return out


def test_two_ray_train_workers_on_two_nodes_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    from transfgu.data.train_store import STORE_DIR
    from transfgu.distributed.cluster import init_ray
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(1)
    one = tiny_config(tmp_path / "runs", name="one", **TRAIN)
    run_pipeline(one, only=["extract", "concepts", "label_bank", "train"])
    assert (one.run_dir / "label_bank" / STORE_DIR).is_dir()  # the one-process run streams too
    with multi_node_cluster(0, [1, 1], connect=False) as cluster:
        two = tiny_config(tmp_path / "runs", name="two", **TRAIN, **{"ray.address": cluster.address,
                                                                       "ray.storage_path": str(tmp_path / "storage")})
        shutil.copytree(one.run_dir, two.run_dir,
                        ignore=shutil.ignore_patterns("train", "model", "pipeline.log", STORE_DIR))
        init_ray(two, runtime_env={"env_vars": worker_env()})
        # one CPU on each of two nodes and one CPU per Train worker: the two workers cannot share a node
        assert sorted(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]) == [0, 1, 1]
        manifest = run_pipeline_ray(two, only=["train"], force=["train"])
    assert any(p.suffix == ".u8" for p in (two.run_dir / "label_bank" / STORE_DIR).iterdir())
    train = manifest["stages"]["train"]
    assert train["status"] == "done" and train.get("extra", train).get("workers") == 2, train
    h1, h2 = _history(one.run_dir), _history(two.run_dir)
    assert [h["round"] for h in h1] == [h["round"] for h in h2] == [0, 1, 2]
    for a, b in zip(h1, h2, strict=True):
        m1, m2 = a["metrics"], b["metrics"]
        assert (m1["steps"], m1["skipped"], m1["batches"], m1["images"]) == (
            m2["steps"], m2["skipped"], m2["batches"], m2["images"]), (a["epoch"], m1, m2)
        for k in ("loss", "peer", "diversity", "uncertainty", "alpha"):
            assert m2[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), (a["epoch"], k)
    assert sum(h["metrics"]["steps"] for h in h1) >= 4
    w1 = load_file(str(one.run_dir / "model" / "decoder.safetensors"))
    w2 = load_file(str(two.run_dir / "model" / "decoder.safetensors"))
    for k, v in w1.items():
        torch.testing.assert_close(w2[k], v, rtol=1e-4, atol=2e-5, msg=k)
