"""Ray Tune sweep (two trials, shared stages, the MLflow run tree read back) and Ray Train DDP on two workers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers.configs import tiny_config
from helpers.data import REPO

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.mark.timeout(1200)  # two sweeps (the second restores the first) on a 2-core machine
def test_two_trial_sweep_mlflow_tree_and_shared_stages(ray_local, tmp_path, capsys):
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
    assert sweep.data.tags["sweep"] == "sw" and sweep.data.tags["run_name"] == "sw"  # not the base config's name
    assert all(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in runs), [
        (r.info.run_name, r.info.status) for r in runs if r.info.status == "RUNNING"]
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

    # the best trial's run directory (with its model) is named, and its model registered under the sweep's name
    best_dir = Path(summary["best_run_dir"])
    assert best_dir.parent == tmp_path / "runs" / "sw" / "trials" and (best_dir / "model").is_dir()
    assert summary["registered_model"] == "transfgu-sw/1"
    version = client.get_model_version("transfgu-sw", "1")
    best_run = next(t for t in trial_runs if t.data.tags["run_name"] == best_dir.name)
    assert version.run_id == best_run.info.run_id and version.description.startswith("# Model card")
    assert len(client.search_registered_models()) == 1  # trials log their models without registering them

    # the sweep script, re-run with the same name, restores the sweep (no new trial, no new sweep run) and prints
    # the best trial's outputs, not those of the base config's run
    import importlib.util

    from helpers.configs import TINY_CONFIG

    spec = importlib.util.spec_from_file_location("tune_sweep", REPO / "ray_jobs" /
                                                  "tune_sweep.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    mtimes = {p: p.stat().st_mtime_ns for p in trials}
    over = {"data.root": cfg.data.root, "run.root": cfg.run.root, "run.name": cfg.run.name,
            "ray.cpus_per_actor": "0.5", "ray.num_workers": "0", "ray.trial_cpus": "0.5", "run.report": "false",
            "mlflow.enabled": "true"}
    assert script.main(["--config", str(TINY_CONFIG), "--name", "sw", "--num-samples", "1", "--grace-period",
                        str(cfg.train.epochs), *(f"{k}={v}" for k, v in over.items())]) == 0
    out = capsys.readouterr().out
    import re

    start = re.search(r"^\{$", out, flags=re.M).start()  # the summary (log lines may come before it)
    again, end = json.JSONDecoder().raw_decode(out, start)
    assert again["trials"] == 2 and again["best_metric"] == pytest.approx(summary["best_metric"])
    printed = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out[end:].strip().splitlines()}
    assert printed["run directory"] == str(best_dir)
    assert printed["model"] == str(best_dir / "model") and printed["metrics"] == str(best_dir / "eval" / "metrics.json")
    assert printed["registered"] == "models:/transfgu-sw/1"  # the same model: no second version
    assert sorted((tmp_path / "runs" / "sw" / "trials").iterdir()) == trials  # no new trial was started
    assert {p: p.stat().st_mtime_ns for p in trials} == mtimes
    runs = client.search_runs([exp.experiment_id], max_results=500)
    assert [r.info.run_id for r in runs if r.data.tags.get("kind") == "sweep"] == [sweep.info.run_id]
    assert client.get_run(sweep.info.run_id).info.status == "FINISHED"


def test_stopped_trials_runs_end_killed_with_the_reason(tmp_path):
    """Tune kills a trial ASHA stops, so its runs cannot end themselves: the sweep ends them."""
    from mlflow import MlflowClient
    from ray.tune import Result

    from transfgu.distributed.tune import close_trial_runs
    from transfgu.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="sweeps")
    sweep = tracker.start_run("sweep s", tags={"kind": "sweep"})
    runs = {}
    for trial in ("trial_driver_ab_00000", "trial_driver_ab_00001"):
        runs[trial] = tracker.start_run(f"trial {trial}", parent_id=sweep, tags={"run_name": trial})
        runs[trial + "/train"] = tracker.start_run("stage train", parent_id=runs[trial])
        runs[trial + "/round"] = tracker.start_run("train/round=0", parent_id=runs[trial + "/train"])
    runs["extract"] = tracker.start_run("stage extract", parent_id=runs["trial_driver_ab_00000"])
    tracker.end_run(runs["extract"])
    for key in ("trial_driver_ab_00001/round", "trial_driver_ab_00001/train", "trial_driver_ab_00001"):
        tracker.end_run(runs[key])  # the trial that ran to its end closed its own runs
    results = [Result(metrics={"trial_id": "ab_00000", "training_iteration": 1, "val_mIoU": 0.1}, checkpoint=None,
                      error=None, path=str(tmp_path)),
               Result(metrics={"trial_id": "ab_00001", "training_iteration": 3, "val_mIoU": 0.2}, checkpoint=None,
                      error=None, path=str(tmp_path))]
    ended = close_trial_runs(tracker, sweep, results, epochs=3)
    stopped = ["trial_driver_ab_00000", "trial_driver_ab_00000/train", "trial_driver_ab_00000/round"]
    assert sorted(ended) == sorted(runs[k] for k in stopped)
    client = MlflowClient(tracker.tracking_uri)
    for key, rid in runs.items():
        run = client.get_run(rid)
        if key in stopped:
            assert run.info.status == "KILLED"
            assert run.data.tags["stop_reason"] == "stopped early by the ASHA scheduler after 1 of 3 epochs"
        else:
            assert run.info.status == "FINISHED" and "stop_reason" not in run.data.tags


def test_train_ddp_two_workers(ray_local, tiny_run_dir, tmp_path):
    """Two Ray Train workers (gloo DDP, half a CPU each) train from the one-process label bank."""
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.store.manifest import Manifest

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
