"""The trained model as an MLflow model (pyfunc, no pickle) and the experiment as `mlflow ui` shows it.

One tracked whole-method run (tiny random ViT, real CamVid images, SQLite store) serves every test here.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.configs import tiny_config
from helpers.data import REPO, require_shared_data

from transfgu.data.io import load_rgb
from transfgu.mlflow_model import decode_label_png, resolve_model_dir, save_mlflow_model
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
    printed = io.StringIO()  # what the run prints (MLflow prints some notices outside its loggers)
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        run_pipeline(cfg)
    uri = resolve_tracking_uri(cfg)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    return {"cfg": cfg, "uri": uri, "client": client, "exp": exp, "runs": runs, "parent": parent,
            "printed": printed.getvalue()}


def test_registering_the_model_prints_no_bare_mlflow_notice(tracked):
    # MLflow prints "Successfully registered model 'tiny-seg'." / "Created version '1' ..." with print(); the run
    # says it once, in its own line format
    printed = tracked["printed"]
    assert "Successfully registered model" not in printed and "Created version" not in printed, printed[-2000:]
    assert "registered as 'tiny-seg' version 1" in (tracked["cfg"].run_dir / "pipeline.log").read_text()


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
    # the model card, beside the model and in the run's model/ folder, says what the model is and is not
    card = (model_root / "MODEL_CARD.md").read_text()
    assert card == (tracked["cfg"].run_dir / "model" / "MODEL_CARD.md").read_text()
    for section in ("## Intended use", "## Data", "## Backbone prior", "## Metrics", "## Limitations"):
        assert section in card
    metrics = json.loads((tracked["cfg"].run_dir / "eval" / "metrics.json").read_text())
    assert f"mIoU {metrics['mIoU']:.4f}" in card and "**random**" in card and "`camvid`" in card
    assert "trained on split `train` (6 images)" in card
    version = tracked["client"].get_model_version("tiny-seg", "1")
    assert version.description == card


def test_requirements_install_where_the_model_is_served(tracked, tmp_path):
    """No `transfgu==...` line (no index serves it): the package travels as code; the rest is pinned as the lock."""
    import re

    from transfgu.mlflow_model import REQUIREMENTS

    local = resolve_model_dir(f"runs:/{tracked['parent'].info.run_id}/model", tracking_uri=tracked["uri"],
                              dst=tmp_path / "dl")
    model_root = local.parents[1]
    reqs = [r for r in (model_root / "requirements.txt").read_text().split() if not r.startswith("mlflow==")]
    lock = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "requirements" / "lock.txt")
                           .read_text(), flags=re.M))
    lock = {k.lower(): v for k, v in lock.items()}
    assert sorted(r.split("==")[0] for r in reqs) == sorted(REQUIREMENTS)
    for r in reqs:
        name, version = r.split("==")
        assert lock[name.lower()] == version, r
    assert (model_root / "code" / "transfgu" / "mlflow_model.py").is_file()
    assert not list((model_root / "code").rglob("__pycache__"))


@pytest.mark.slow
def test_model_loads_with_the_package_it_carries(tracked, tmp_path):
    """A fresh interpreter outside the repository (no PYTHONPATH) loads the model with the transfgu it carries."""
    import os
    import subprocess
    import sys

    local = resolve_model_dir(f"runs:/{tracked['parent'].info.run_id}/model", tracking_uri=tracked["uri"],
                              dst=tmp_path / "dl")
    model_root = local.parents[1]
    image = _images(1)[0]
    script = (
        "import sys, mlflow.pyfunc, pandas as pd\n"
        f"m = mlflow.pyfunc.load_model({str(model_root)!r})\n"
        f"out = m.predict(pd.DataFrame({{'image': [open({str(image)!r}, 'rb').read()]}}))\n"
        "import transfgu\n"
        "print(transfgu.__file__)\n"
        "print(out['label_png'][0])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["TRANSFGU_DEVICE"] = "cpu"
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    where, label_png = out.stdout.strip().splitlines()[-2:]
    assert Path(where).resolve().is_relative_to((model_root / "code").resolve()), where
    expected = load(tracked["cfg"].run_dir, device="cpu").predict(load_rgb(image))
    np.testing.assert_array_equal(decode_label_png(label_png), expected)


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

    path = save_mlflow_model(tiny_run_dir, tmp_path / "mlmodel")
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
    # its metrics are the evaluation's, on the validation split ("Datasets used"), without system metrics
    model_metrics = {m.key: m for m in models[0].metrics}
    assert not [k for k in model_metrics if k.startswith("system/")]
    val = inputs["camvid/val"].dataset
    assert model_metrics["mIoU"].value == pytest.approx(parent.data.metrics["mIoU"])
    for key in ("mIoU", "pixel_accuracy", "iou/Sky"):
        assert (model_metrics[key].dataset_name, model_metrics[key].dataset_digest) == (val.name, val.digest)


# -- the experiment in the MLflow UI, in headless Chromium ----------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def mlflow_ui(tracked, capsys):
    """``mlflow ui`` started as the run's printed outputs say (on a free port), and the URL they print."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    from transfgu.cli import print_outputs

    print_outputs(tracked["cfg"])
    printed = {line.split(":", 1)[0]: line.split(":", 1)[1].strip()
               for line in capsys.readouterr().out.splitlines() if ":" in line}
    assert "mlflow ui" in printed, printed
    assert "mlflow runs" in printed, f"no link to the experiment's runs among the outputs: {printed}"
    cmd = shlex.split(printed["mlflow ui"])
    assert cmd[:2] == ["mlflow", "ui"]
    port = _free_port()
    url = printed["mlflow runs"].replace("http://127.0.0.1:5000/", f"http://127.0.0.1:{port}/")
    assert url != printed["mlflow runs"]
    mlflow_exe = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_exe, *cmd[1:], "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300  # a loaded 2-core machine takes minutes to start it
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "mlflow ui exited"
            assert time.time() < deadline, "mlflow ui did not answer"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_mlflow_ui_opens_the_experiment_on_its_training_runs(tracked, mlflow_ui, browser, tmp_path):
    """The link the run prints opens the MLflow UI on the experiment's runs (with the pipeline run listed), not on
    the GenAI traces overview that MLflow 3 shows by default."""
    import io
    import os
    import time

    from PIL import Image

    target = browser.call("Target.createTarget", url=mlflow_ui)["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    run_name = tracked["parent"].info.run_name
    deadline = time.time() + 240
    text = ""
    while time.time() < deadline:
        href = browser.evaluate(session, "location.href") or ""
        text = browser.evaluate(session, "document.body ? document.body.innerText : ''") or ""
        if run_name in text and "matching run" in text:
            break
        time.sleep(0.5)
    assert run_name in text, f"{href}: the pipeline run is not listed:\n{text[:1500]}"
    exp_id = tracked["exp"].experiment_id
    assert f"/#/experiments/{exp_id}/runs" in href and "workflowType=machine_learning" in href, href
    assert "Token Usage" not in text and "Traces" in text  # the traces tab exists, its overview is not shown
    time.sleep(1.0)  # let the table settle for the picture
    shot = base64.b64decode(browser.call("Page.captureScreenshot", session, format="png")["data"])
    page = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    assert page.shape[0] > 500 and len(np.unique(page.reshape(-1, 3), axis=0)) > 50  # a rendered page, not blank
    (tmp_path / "mlflow_experiment.png").write_bytes(shot)
    if os.environ.get("TRANSFGU_SCREENSHOT_DIR"):  # docs/img/mlflow_experiment.png is made this way
        Path(os.environ["TRANSFGU_SCREENSHOT_DIR"], "mlflow_experiment.png").write_bytes(shot)
