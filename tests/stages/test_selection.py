"""Per-epoch validation history and ``train.select`` (issue 12 item 3), on the tiny one-process run of real images."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers.configs import tiny_config
from safetensors.torch import load_file

from transfgu.checkpoint import load_train_state
from transfgu.pipeline import run_pipeline
from transfgu.selection import SELECTION_WARNING, Validator
from transfgu.store.manifest import Manifest


def _copy(tiny_run_dir, tmp_path, name):
    """The finished tiny run (features, concepts, label bank reused: only train and evaluate run again)."""
    shutil.copytree(tiny_run_dir, tmp_path / name)
    shutil.rmtree(tmp_path / name / "train")  # else training resumes from the copied round states


def test_best_val_keeps_the_best_epoch_and_says_so(tiny_run_dir, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    _copy(tiny_run_dir, tmp_path, "best")
    scripted = iter([0.2, 0.6, 0.4])  # validation "mIoU" after epochs 0, 1, 2: epoch 1 is the best

    def fake(self, decoder):
        m = next(scripted)
        return {"mIoU": m, "pixel_accuracy": 0.5}

    monkeypatch.setattr(Validator, "__call__", fake)
    cfg = tiny_config(tmp_path, "best", **{"train.epochs": "3", "train.select": "best_val"})
    run_pipeline(cfg)
    run = cfg.run_dir
    hist = [json.loads(x) for x in (run / "train" / "val_history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["round"], h["mIoU"]) for h in hist] == [(0, 0, 0.2), (1, 1, 0.6), (2, 2, 0.4)]
    # The run's model is the student after epoch 1 (round 1 ends there), not the last one.
    model = load_file(str(run / "model" / "decoder.safetensors"))
    at_best = load_train_state(run / "train" / "round_001")[0]["student"]
    last = load_train_state(run / "train" / "round_002")[0]["student"]
    assert all(torch.equal(model[k], at_best[k].cpu()) for k in model)
    assert not all(torch.equal(model[k], last[k].cpu()) for k in model)
    # Every output says validation labels chose the model.
    meta = json.loads((run / "model" / "model.json").read_text())
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    man = Manifest.load(run)
    for rec in (meta, metrics, man.stage("train")["extra"], man.stage("evaluate")["extra"]):
        assert rec["selection"] == "best_val" and rec["selected_epoch"] == 1
        assert rec["selection_warning"] == SELECTION_WARNING
    html = (run / "report" / "index.html").read_text()
    assert "MODEL SELECTED ON VALIDATION LABELS" in html and "Validation history" in html


def test_validation_history_is_the_real_evaluation_and_reaches_mlflow(tiny_run_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from transfgu.tracking import resolve_tracking_uri

    torch.set_num_threads(2)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _copy(tiny_run_dir, tmp_path, "hist")
    cfg = tiny_config(tmp_path, "hist", **{"train.validate_every": "1", "mlflow.enabled": "true",
                                           "run.report": "false"})
    run_pipeline(cfg)
    run = cfg.run_dir
    hist = [json.loads(x) for x in (run / "train" / "val_history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [0, 1]
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    # select=last: the model is the last epoch's, so its evaluation is the last history entry.
    assert metrics["selection"] == "last" and "selection_warning" not in metrics
    assert hist[-1]["mIoU"] == pytest.approx(metrics["mIoU"], abs=1e-12)
    assert hist[-1]["pixel_accuracy"] == pytest.approx(metrics["pixel_accuracy"], abs=1e-12)
    assert not (run / "train" / "best").exists()
    client = MlflowClient(resolve_tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    train_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("pipeline_stage") == "train"
                  and "round" not in r.data.tags]
    points = client.get_metric_history(train_runs[0].info.run_id, "train/val_mIoU")
    assert sorted((p.step, p.value) for p in points) == [(h["epoch"], pytest.approx(h["mIoU"])) for h in hist]


def test_best_val_without_labelled_val_is_a_clear_error(tmp_path):
    from transfgu.config import ConfigError

    with pytest.raises(ConfigError, match="labelled validation split"):
        tiny_config(tmp_path, **{"train.select": "best_val", "data.val_split": "null"})
