"""MLflow tracking of the one-process pipeline: the run tree, params, per-epoch metrics and artifacts (no Ray)."""

from __future__ import annotations

import pytest
from helpers.configs import tiny_config

from transfgu.tracking import resolve_tracking_uri


def test_tracking_uri_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path)
    assert resolve_tracking_uri(cfg) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve().as_posix()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert resolve_tracking_uri(cfg) == "http://mlflow.example:5000"
    cfg2 = tiny_config(tmp_path, **{"mlflow.tracking_uri": "sqlite:////x/y.db"})
    assert resolve_tracking_uri(cfg2) == "sqlite:////x/y.db"


def test_one_process_pipeline_run_tree(tmp_path, monkeypatch):
    import torch
    from mlflow import MlflowClient

    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(2)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path, **{"mlflow.enabled": "true", "run.report": "false"})
    run_pipeline(cfg)
    client = MlflowClient(resolve_tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["pretrained"] == "false" and parent.data.params["pretrained"] == "False"
    flat = cfg.flat()
    assert parent.data.params["train.epochs"] == str(flat["train.epochs"])
    assert parent.data.params["crops.betas"] == str(flat["crops.betas"])
    assert parent.data.metrics["mIoU"] >= 0
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "eval")}
    assert {"eval/per_class_iou.csv", "eval/metrics.json", "eval/confusion.csv", "eval/confusion.png"} <= arts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "config")} >= {"config/config.yaml"}

    def children(run_id):
        return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run_id]

    stages = {r.data.tags["pipeline_stage"]: r for r in children(parent.info.run_id)}
    assert set(stages) == {"extract", "concepts", "label_bank", "train", "evaluate"}
    rounds = sorted(children(stages["train"].info.run_id), key=lambda r: r.data.tags["round"])
    assert [r.data.tags["round"] for r in rounds] == ["0", "1"]  # teacher_intervals [1] from epoch 1: two rounds
    hist = client.get_metric_history(stages["train"].info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == [0, 1]  # one point per epoch
    assert stages["evaluate"].data.metrics["mIoU"] == pytest.approx(parent.data.metrics["mIoU"])

    # the model is registered under a name derived from the run, its card as the version's description
    models = client.search_logged_models(experiment_ids=[exp.experiment_id])
    assert len(models) == 1
    version = client.get_model_version("transfgu-tiny", "1")
    assert version.source == f"models:/{models[0].model_id}" and version.description.startswith("# Model card")

    # a re-run whose stages all skip opens no second parent run and logs no second model
    run_pipeline(cfg)
    assert len(client.search_runs([exp.experiment_id], max_results=100)) == len(runs)
    assert len(client.search_logged_models(experiment_ids=[exp.experiment_id])) == 1

    # a resumed run that does work is a new parent whose finished stages are marked skipped
    run_pipeline(cfg, force=["evaluate"])
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert len(parents) == 2
    second = {r.data.tags["pipeline_stage"]: r.data.tags["skipped"]
              for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[1].info.run_id}
    assert second == {"extract": "true", "concepts": "true", "label_bank": "true", "train": "true",
                      "evaluate": "false"}


def test_a_stage_shorter_than_the_sampling_interval_still_logs_system_metrics(tmp_path):
    """MLflow's sampler publishes only after a whole interval; a short stage must still get its end-of-stage sample."""
    from mlflow import MlflowClient

    from transfgu.tracking import start_system_metrics

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("sysm"))
    mon = start_system_metrics(uri, run.info.run_id, 60.0)  # far longer than this "stage"
    mon.finish()
    keys = client.get_run(run.info.run_id).data.metrics
    assert "system/cpu_utilization_percentage" in keys and "system/system_memory_usage_megabytes" in keys
    client.set_terminated(run.info.run_id)
