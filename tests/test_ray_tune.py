"""Ray Tune sweep (two trials, shared stages, the MLflow run tree read back) and Ray Train DDP on two workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_config

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2)
    yield
    ray.shutdown()


def test_two_trial_sweep_mlflow_tree_and_shared_stages(ray_local, tmp_path):
    from mlflow import MlflowClient
    from ray import tune

    from transfgu.distributed.tune import run_sweep
    from transfgu.tracking import resolve_tracking_uri

    cfg = tiny_config(tmp_path / "runs", **{
        "ray.cpus_per_actor": "0.5", "ray.num_workers": "0", "ray.trial_cpus": "0.5", "run.report": "false",
        "mlflow.enabled": "true",
    })
    summary = run_sweep(cfg, space={"w_div": tune.grid_search([0.5, 1.0]), "K": 4}, name="sw", num_samples=1,
                        grace_period=cfg.train.epochs)
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert summary["best_config"]["w_div"] in (0.5, 1.0)

    # trials with the same betas and K computed features, concepts and label bank once
    cache = tmp_path / "runs" / "sw" / "cache"
    for stage in ("extract", "concepts", "label_bank"):
        keys = list(cache.glob(f"{stage}-*"))
        assert len(keys) == 1, keys
        assert (keys[0] / "_done.json").is_file()
    trials = sorted((tmp_path / "runs" / "sw" / "trials").iterdir())
    assert len(trials) == 2
    reused = [json.loads((t / "_manifest.json").read_text())["stages"]["extract"]["extra"]["reused"] for t in trials]
    assert sorted(reused) == [False, True]

    # the MLflow tree: sweep -> 2 trials -> 5 stages each -> rounds under train; best config on the sweep run
    client = MlflowClient(resolve_tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_id = {r.info.run_id: r for r in runs}

    def children(run_id: str) -> list:
        return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]

    sweeps = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    assert len(sweeps) == 1 and sweeps[0].info.run_id == summary["mlflow_run_id"]
    sweep = sweeps[0]
    assert sweep.info.status == "FINISHED"
    assert sweep.data.params["best.w_div"] == str(summary["best_config"]["w_div"])
    assert sweep.data.metrics["best_val_mIoU"] == pytest.approx(summary["best_metric"])
    trial_runs = children(sweep.info.run_id)
    assert len(trial_runs) == 2
    assert sorted(float(t.data.params["train.w_div"]) for t in trial_runs) == [0.5, 1.0]
    for t in trial_runs:
        assert t.info.status == "FINISHED" and t.data.tags["kind"] == "trial"
        assert t.data.params["pretrained"] == "False" and t.data.tags["pretrained"] == "false"
        stages = {c.data.tags["pipeline_stage"]: c for c in children(t.info.run_id)}
        assert set(stages) == {"extract", "concepts", "label_bank", "train", "evaluate"}
        rounds = children(stages["train"].info.run_id)
        assert sorted(r.data.tags["round"] for r in rounds) == ["0", "1"]
        hist = client.get_metric_history(stages["train"].info.run_id, "train/val_mIoU")
        assert sorted(m.step for m in hist) == [0, 1]  # one report per epoch
        assert "mIoU" in t.data.metrics
    assert all(by_id[r.data.tags["mlflow.parentRunId"]] for r in runs if "mlflow.parentRunId" in r.data.tags)

    # the best trial's run directory (with its model) is named; a re-run of the same sweep name restores it
    best_dir = Path(summary["best_run_dir"])
    assert best_dir.parent == tmp_path / "runs" / "sw" / "trials" and (best_dir / "model").is_dir()
    mtimes = {p: p.stat().st_mtime_ns for p in trials}
    again = run_sweep(cfg, space={"w_div": tune.grid_search([0.5, 1.0]), "K": 4}, name="sw", num_samples=1,
                      grace_period=cfg.train.epochs)
    assert again["trials"] == 2 and again["best_metric"] == pytest.approx(summary["best_metric"])
    assert sorted((tmp_path / "runs" / "sw" / "trials").iterdir()) == trials  # no new trial was started
    assert {p: p.stat().st_mtime_ns for p in trials} == mtimes


def test_train_ddp_two_workers(ray_local, tiny_run_dir, tmp_path):
    """Two Ray Train workers (gloo DDP, half a CPU each) train from the one-process label bank."""
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.store import Manifest

    cfg = tiny_config(tmp_path / "runs", **{
        "ray.num_workers": "2", "ray.cpus_per_worker": "0.5", "ray.fit_per_round": "false", "run.report": "false",
    })
    shutil.copytree(tiny_run_dir, cfg.run_dir, ignore=shutil.ignore_patterns("train", "model", "eval", "report"))
    manifest = run_pipeline_ray(cfg, only=["train"], force=["train"])
    rec = manifest["stages"]["train"]
    assert rec["status"] == "done" and rec["extra"]["workers"] == 2
    assert rec["extra"]["final_loss"] is not None and rec["extra"]["final_loss"] > 0
    assert (cfg.run_dir / "train" / "round_001" / "state.json").is_file()
    assert (cfg.run_dir / "model" / "decoder.safetensors").is_file()
    # the Ray checkpoint of the last epoch is registered under the deterministic run name
    ckpts = list((cfg.run_dir / "ray_results").glob("tiny-train-*/round_001_epoch_001"))
    assert ckpts, list((cfg.run_dir / "ray_results").rglob("*"))[:10]
    assert Manifest.load(cfg.run_dir).is_done("extract")
