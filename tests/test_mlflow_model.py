"""Issue 18 item 1: the trained model as an MLflow model (pyfunc, no pickle) and the experiment as `mlflow ui` shows it.

One tracked whole-method run (tiny random ViT, real CamVid images, SQLite store) serves every test here.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import require_shared_data, tiny_config

from transfgu.data.io import load_rgb
from transfgu.mlflow_model import decode_label_png, resolve_model_dir, save_model
from transfgu.predict import load
from transfgu.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, resolve_tracking_uri

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A finished pipeline run tracked in MLflow, its model registered as ``tiny-seg``."""
    from mlflow import MlflowClient

    from transfgu.pipeline import run_pipeline

    cfg = tiny_config(tmp_path_factory.mktemp("mlruns"), **{
        "mlflow.enabled": "true", "run.report": "false", "mlflow.registered_model": "tiny-seg",
        "mlflow.system_metrics_interval": "0.2",
    })
    run_pipeline(cfg)
    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    return {"cfg": cfg, "uri": uri, "client": client, "exp": exp, "runs": runs, "parent": parent}


def _images(n: int = 3) -> list[Path]:
    return sorted((require_shared_data("camvid") / "images" / "val").glob("*.jpg"))[:n]


def test_logged_model_predicts_the_checkpoints_labels(tracked, monkeypatch):
    import mlflow.pyfunc

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    run_id = tracked["parent"].info.run_id
    ckpt = load(tracked["cfg"].run_dir, device="cpu")
    paths = _images(3)
    df = pd.DataFrame({"image": [p.read_bytes() for p in paths]})  # the JPEG files as they are
    for uri in (f"runs:/{run_id}/model", "models:/tiny-seg/1"):
        model = mlflow.pyfunc.load_model(uri)
        out = model.predict(df)
        clusters = model.predict(df, params={"as_classes": False})
        classes = model.predict(df, params={"as_classes": True})
        assert list(out.columns) == ["height", "width", "label_png", "pixels", "unmatched"] and len(out) == 3
        for i, p in enumerate(paths):
            img = load_rgb(p)
            expected = ckpt.predict(img)
            got = decode_label_png(clusters["label_png"][i])
            np.testing.assert_array_equal(got, expected)
            np.testing.assert_array_equal(decode_label_png(out["label_png"][i]), expected)
            assert (out["height"][i], out["width"][i]) == img.shape[:2]
            assert json.loads(out["pixels"][i]) == np.bincount(expected.ravel(), minlength=ckpt.n_clusters).tolist()
            exp_cls = ckpt.predict(img, as_classes=True)
            got_cls = decode_label_png(classes["label_png"][i])
            np.testing.assert_array_equal(got_cls, exp_cls)
        assert len(np.unique(np.concatenate([decode_label_png(s).ravel() for s in out["label_png"]]))) > 1


def test_model_artifacts_hold_no_pickle_and_describe_the_model(tracked, tmp_path):
    from mlflow.models import Model

    local = resolve_model_dir(f"runs:/{tracked['parent'].info.run_id}/model", tracking_uri=tracked["uri"],
                              dst=tmp_path / "dl")
    model_root = local.parents[1]
    files = [p for p in model_root.rglob("*") if p.is_file()]
    assert files and not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".joblib")]
    assert {p.name for p in local.iterdir()} == {"model.json", "decoder.safetensors", "backbone.safetensors"}
    m = Model.load(str(model_root / "MLmodel"))
    assert m.flavors["python_function"]["loader_module"] == "transfgu.mlflow_model"
    meta = json.loads((tracked["cfg"].run_dir / "model" / "model.json").read_text())
    assert m.metadata["cluster_to_class"] == meta["cluster_to_class"] is not None
    assert m.metadata["n_clusters"] == 4 and m.metadata["backbone_weights"] == "none"
    assert m.metadata["pretrained"] is False and m.metadata["preprocessing"]["resize"] == [64, 80]
    assert m.signature.inputs.input_names() == ["image"]
    assert (model_root / "serving_input_example.json").is_file()


def test_serving_input_round_trip(tracked, monkeypatch):
    """What `mlflow models serve` does with a JSON request (binary column sent as base64)."""
    from mlflow.models import validate_serving_input

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked["uri"])
    p = _images(1)[0]
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p.read_bytes()).decode()]]},
            "params": {"as_classes": True}}
    out = validate_serving_input("models:/tiny-seg/1", json.dumps(body))
    expected = load(tracked["cfg"].run_dir, device="cpu").predict(load_rgb(p), as_classes=True)
    np.testing.assert_array_equal(decode_label_png(out["label_png"][0]), expected)


def test_saved_model_folder_loads_without_a_server(tiny_run_dir, tmp_path):
    import mlflow.pyfunc

    path = save_model(tiny_run_dir, tmp_path / "mlmodel")
    model = mlflow.pyfunc.load_model(str(path))
    img = load_rgb(_images(1)[0])
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")  # lossless: the same pixels as the array
    got = decode_label_png(model.predict(pd.DataFrame({"image": [buf.getvalue()]}))["label_png"][0])
    np.testing.assert_array_equal(got, load(tiny_run_dir, device="cpu").predict(img))
    assert resolve_model_dir(path) == (path / "data" / "transfgu_model")
    with pytest.raises(ValueError, match="image 0"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))


def test_experiment_kind_source_datasets_and_system_metrics(tracked):
    client, parent, runs = tracked["client"], tracked["parent"], tracked["runs"]
    assert tracked["exp"].tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    assert parent.data.tags["mlflow.source.name"] and parent.data.tags["mlflow.source.type"] == "LOCAL"
    inputs = {d.dataset.name: d for d in parent.inputs.dataset_inputs}
    assert set(inputs) == {"camvid/train", "camvid/val"}
    train = inputs["camvid/train"]
    assert {t.key: t.value for t in train.tags}["mlflow.data.context"] == "training"
    assert {t.key: t.value for t in train.tags}["images"] == "6"
    assert len(train.dataset.digest) == 16
    # the digest follows the images: a different subset has another one
    from transfgu.tracking import dataset_digest

    assert train.dataset.digest != dataset_digest(["0001TP_006690"])
    stage = next(r for r in runs if r.data.tags.get("pipeline_stage") == "train"
                 and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    sysm = [k for k in client.get_run(stage.info.run_id).data.metrics if k.startswith("system/")]
    assert "system/cpu_utilization_percentage" in sysm and "system/system_memory_usage_megabytes" in sysm
    # the Models tab: a logged model of this experiment whose source is the pipeline run
    models = client.search_logged_models(experiment_ids=[tracked["exp"].experiment_id])
    assert [m.source_run_id for m in models] == [parent.info.run_id]
    assert client.get_registered_model("tiny-seg").name == "tiny-seg"
