"""Ray Train with two DDP workers (gloo) trains the tiny config exactly like the one-process pipeline.

The one-process run and the 2-worker Ray Train run share extraction, concepts and label bank (the run directory is
copied); only the training stage differs. Per epoch (two teacher updates) the global loss and its terms, the number
of optimizer steps and of skipped steps agree, and so do the final decoder weights. Five training images in global
batches of 4 give worker pieces of 2 + 2 and then 1 + a placeholder (weight 0).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import tiny_config

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]

TRAIN = {
    "data.max_train_images": "5",
    "train.epochs": "3",  # teacher updates before epochs 1 and 2
    "train.dropout": "0",  # dropout masks are per rank by design: the one draw DDP cannot share with one process
    "ray.num_workers": "2",
    "ray.cpus_per_worker": "0.5",
    "ray.cpus_per_actor": "0.5",
    "ray.extract_actors": "[1, 1]",
    "ray.kmeans_shards": "1",
    "ray.fit_per_round": "false",
    "ray.num_cpus": "2",
}


def _history(run_dir) -> list[dict]:
    out = []
    for d in sorted((run_dir / "train").glob("round_*")):
        out.append(json.loads((d / "state.json").read_text()))
    return out


def test_two_ray_train_workers_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    from transfgu.distributed.cluster import init_ray
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(1)
    one = tiny_config(tmp_path / "runs", name="one", **TRAIN)
    run_pipeline(one, only=["extract", "concepts", "label_bank", "train"])
    two = tiny_config(tmp_path / "runs", name="two", **TRAIN)
    shutil.copytree(one.run_dir, two.run_dir, ignore=shutil.ignore_patterns("train", "model", "pipeline.log"))
    if ray.is_initialized():
        ray.shutdown()
    init_ray(two, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                            **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}})
    try:
        manifest = run_pipeline_ray(two, only=["train"], force=["train"])
    finally:
        ray.shutdown()
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
