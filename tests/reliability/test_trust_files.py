"""Files read back from disk are untrusted input: ``model.json``, ``state.json``, ``concepts.json``, the manifest,
the MLflow model's copy of the checkpoint and the weight files are validated at load against their schemas
(:mod:`transfgu.schemas`), with one error naming the file and the field, in every reader (predict, export, the MLflow
model, Serve, resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from transfgu.schemas import FileSchemaError, check_leopart_arrays


@pytest.fixture
def ckpt(tiny_run_dir, tmp_path) -> Path:
    """A private copy of the session's tiny model checkpoint (with an evaluated cluster -> class mapping)."""
    out = tmp_path / "model"
    shutil.copytree(tiny_run_dir / "model", out)
    return out


def _edit(path: Path, **changes) -> None:
    meta = json.loads(path.read_text())
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(meta.get(k), dict):
            meta[k].update(v)
        else:
            meta[k] = v
    path.write_text(json.dumps(meta))


def test_mapping_of_the_wrong_length_is_refused_by_every_reader(ckpt, tmp_path, capsys):
    """Regression: a cluster -> class mapping one entry short loaded and failed later with a raw IndexError."""
    from transfgu import export, predict
    from transfgu.mlflow_model import _load_pyfunc

    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["cluster_to_class"] is not None
    _edit(ckpt / "model.json", cluster_to_class=meta["cluster_to_class"][:-1])
    with pytest.raises(FileSchemaError, match=r"model\.json: field 'cluster_to_class': has \d+ entries"):
        predict.load(ckpt, device="cpu")
    with pytest.raises(FileSchemaError, match="cluster_to_class"):
        _load_pyfunc(str(ckpt))  # what mlflow.pyfunc.load_model calls on the model's copy
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(img_dir / "a.png")
    assert predict.main([str(ckpt), str(img_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model.json" in err and "cluster_to_class" in err
    assert export.main([str(ckpt), "--out", str(tmp_path / "m.pt")]) == 2
    assert "cluster_to_class" in capsys.readouterr().err


def test_serve_refuses_a_bad_checkpoint_before_starting_replicas(ckpt):
    from transfgu.serve import app

    _edit(ckpt / "model.json", cluster_to_class=[999])
    with pytest.raises(FileSchemaError, match="cluster_to_class"):
        app({"model": str(ckpt)})


@pytest.mark.parametrize("changes, field", [
    ({"surprise": 1}, "surprise"),
    ({"backbone_file": "../../etc/passwd"}, "backbone_file"),
    ({"eval_size": [20000, 20000]}, "eval_size.0"),
    ({"decoder": {"n_classes": 10**9}}, "decoder.n_classes"),
    ({"decoder": {"n_classes": "many"}}, "decoder.n_classes"),
    ({"cluster_to_class": [10**6] * 4}, "cluster_to_class.0"),
    ({"format": "transfgu-model/9"}, "format"),
    ({"class_names": 5}, "class_names"),
])
def test_edited_model_json_fields_are_named(ckpt, changes, field):
    from transfgu.predict import load

    _edit(ckpt / "model.json", **changes)
    with pytest.raises(FileSchemaError) as info:
        load(ckpt, device="cpu")
    assert info.value.field == field and str(ckpt / "model.json") in str(info.value)


def test_model_json_that_is_not_an_object_or_not_json(ckpt):
    from transfgu.predict import load

    (ckpt / "model.json").write_text("[1, 2]")
    with pytest.raises(FileSchemaError, match="expected a JSON object"):
        load(ckpt, device="cpu")
    (ckpt / "model.json").write_text('{"format": NaN')
    with pytest.raises(FileSchemaError, match="not valid JSON"):
        load(ckpt, device="cpu")


def test_all_nan_decoder_is_refused(ckpt):
    """Regression: an all-NaN decoder loaded and predicted one class with no warning."""
    from transfgu.predict import load

    state = load_file(str(ckpt / "decoder.safetensors"))
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()},
              str(ckpt / "decoder.safetensors"))
    with pytest.raises(FileSchemaError, match=r"decoder\.safetensors: field '.+': \d+ of \d+ values are not finite"):
        load(ckpt, device="cpu")


def test_non_finite_backbone_weights_are_refused(ckpt):
    from transfgu.models.backbone import WeightsError
    from transfgu.predict import load

    state = load_file(str(ckpt / "backbone.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("inf")
    save_file(state, str(ckpt / "backbone.safetensors"))
    with pytest.raises(WeightsError, match=f"field '{name}'.*not finite"):
        load(ckpt, device="cpu")


def test_resume_state_json_is_validated(tiny_run_dir, tmp_path):
    from transfgu.checkpoint import load_train_state, read_state_info

    src = next((tiny_run_dir / "train").glob("round_*"))
    d = tmp_path / "round_0"
    shutil.copytree(src, d)
    assert read_state_info(d)["epoch"] >= 0
    _edit(d / "state.json", epoch=-3)
    with pytest.raises(FileSchemaError, match=r"state\.json: field 'epoch'"):
        read_state_info(d)
    _edit(d / "state.json", epoch=0, optimiser={})
    with pytest.raises(FileSchemaError, match="'optimiser': unknown field"):
        load_train_state(d)


def test_concepts_json_sizes_must_agree(tiny_run_dir, tmp_path):
    from transfgu.concepts import ConceptBank

    d = tmp_path / "concepts"
    shutil.copytree(tiny_run_dir / "concepts", d)
    assert ConceptBank.load(d).num_concepts > 0
    meta = json.loads((d / "concepts.json").read_text())
    _edit(d / "concepts.json", pools=meta["pools"][:-1])
    with pytest.raises(FileSchemaError, match=r"concepts\.json: field 'pools': has"):
        ConceptBank.load(d)


def test_manifest_is_validated(tmp_path):
    from transfgu.store.manifest import Manifest

    m = Manifest(tmp_path)
    m.mark_running("extract", input_hash="abc")
    m.mark_done("extract", rows=3, input_hash="abc", outputs=["x"], seconds=1.5)
    assert Manifest.load(tmp_path).is_done("extract", "abc")
    data = json.loads(m.path.read_text())
    data["stages"]["extract"]["status"] = "finished"
    m.path.write_text(json.dumps(data))
    with pytest.raises(FileSchemaError, match=r"_manifest\.json: field 'stages\.extract\.status'"):
        Manifest.load(tmp_path)


def _leopart_arrays(k: int = 5, kc: int = 4, d: int = 8, p: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"pca_mean": rng.normal(size=d).astype(np.float32), "pca_std": np.ones(d, np.float32),
            "pca_components": rng.normal(size=(p, d)).astype(np.float32),
            "pca_eigenvalues": np.ones(p, np.float32), "cbfe_centroids": rng.normal(size=(k, p)).astype(np.float32),
            "cbfe_foreground": np.array([1, 0, 1, 0, 1], np.uint8)[:k], "cd_centroids":
            rng.normal(size=(kc, p)).astype(np.float32), "cluster_to_segment": np.array([1, 1, 2, 3, 0])[: kc + 1]}


def test_leopart_arrays_agree_with_each_other_and_with_model_json(tmp_path):
    a = _leopart_arrays()
    check_leopart_arrays("leopart.safetensors", a, {"cluster_to_class": [0, 1, 2, 3]})  # 4 segments
    with pytest.raises(FileSchemaError, match="model.json: field 'cluster_to_class': has 3 entries"):
        check_leopart_arrays("leopart.safetensors", a, {"cluster_to_class": [0, 1, 2]}, "model.json")
    bad = {**a, "cluster_to_segment": np.array([0, 1, 2])}
    with pytest.raises(FileSchemaError, match="'cluster_to_segment': shape"):
        check_leopart_arrays("leopart.safetensors", bad)
    bad = {**a, "cd_centroids": np.full((4, 3), np.nan, np.float32)}
    with pytest.raises(FileSchemaError, match="'cd_centroids': 12 of 12 values are not finite"):
        check_leopart_arrays("leopart.safetensors", bad)
