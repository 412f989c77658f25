"""Exported models (TorchScript and torch.export) give the eager model's labels on real CamVid images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transfgu.data.io import load_rgb
from transfgu.data.transforms import to_model_input
from transfgu.engine.step import predict_logits
from transfgu.export import export_program, export_torchscript, load_exported, main
from transfgu.predict import load

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def predictor(tiny_run_dir):
    return load(tiny_run_dir, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def batch(predictor, camvid) -> torch.Tensor:
    """Three real val images, normalised at the eval size (what the exported model takes)."""
    paths = sorted((camvid / "images" / "val").glob("*.jpg"))[::25][:3]
    return torch.stack([to_model_input(load_rgb(p), predictor.eval_size) for p in paths])


def _eager_labels(predictor, x: torch.Tensor) -> torch.Tensor:
    return predict_logits(predictor.decoder, predictor.backbone, x).argmax(dim=1)


def test_torchscript_labels_equal_eager(predictor, batch, tmp_path):
    path = export_torchscript(predictor, tmp_path / "model.pt")
    module, info = load_exported(path)
    assert info["input"]["shape"] == ["B", 3, *predictor.eval_size] and info["pretrained"] is False
    eager = _eager_labels(predictor, batch)
    assert len(eager.unique()) > 1
    got = module(batch)
    assert got.dtype == torch.int64 and got.shape == (3, *predictor.eval_size)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch.testing.assert_close(module(batch[1:2]), eager[1:2], rtol=0, atol=0)  # another batch size
    with pytest.raises(Exception, match="expected a normalised"):
        module(torch.zeros(1, 3, 32, 32))


def test_torchscript_classes_and_logits(predictor, batch, tmp_path):
    module, info = load_exported(export_torchscript(predictor, tmp_path / "c.pt", classes=True))
    mapping = torch.as_tensor(predictor.cluster_to_class)
    torch.testing.assert_close(module(batch), mapping[_eager_labels(predictor, batch)], rtol=0, atol=0)
    assert info["ids"] == "classes" and info["class_names"] == predictor.class_names
    module, _ = load_exported(export_torchscript(predictor, tmp_path / "l.pt", output="logits"))
    ref = predict_logits(predictor.decoder, predictor.backbone, batch)
    torch.testing.assert_close(module(batch), ref, rtol=1e-4, atol=1e-5)


def test_torch_export_program_labels_equal_eager(predictor, batch, tmp_path):
    module, info = load_exported(export_program(predictor, tmp_path / "model.pt2"))
    assert info["format_kind"] == "export"
    eager = _eager_labels(predictor, batch)
    torch.testing.assert_close(module(batch), eager, rtol=0, atol=0)
    torch.testing.assert_close(module(batch[:1]), eager[:1], rtol=0, atol=0)


def test_cli(tiny_run_dir, tmp_path, capsys):
    assert main([str(tiny_run_dir), "--out", str(tmp_path / "m.pt")]) == 0
    assert (tmp_path / "m.pt").is_file()
    assert main([str(tiny_run_dir), "--out", str(tmp_path / "m.onnx"), "--format", "onnx"]) == 2
    assert "ONNX export is not supported" in capsys.readouterr().err
    assert main([str(tmp_path / "none"), "--out", str(tmp_path / "x.pt")]) == 2
    assert not np.any([p.name.startswith(".") for p in tmp_path.iterdir()])  # no temporary file left behind
