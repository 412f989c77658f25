"""Prediction API and ``transfgu predict`` on the tiny whole-method run, with real CamVid images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from transfgu.data.io import load_label, load_rgb
from transfgu.data.transforms import to_model_input
from transfgu.engine.step import predict_logits
from transfgu.predict import CheckpointError, collect_inputs, load, main, save_label_png, upsampled_argmax

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def predictor(tiny_run_dir):
    return load(tiny_run_dir, device="cpu")


def _val_images(camvid: Path, n: int = 3) -> list[Path]:
    return sorted((camvid / "images" / "val").glob("*.jpg"))[:n]


def _oracle(predictor, img: np.ndarray) -> np.ndarray:
    """The engine's own path: pipeline resize + normalise at the eval size, predict_logits at the original size."""
    x = to_model_input(img, predictor.eval_size)[None]
    logits = predict_logits(predictor.decoder, predictor.backbone, x, (img.shape[0], img.shape[1]))
    return logits.argmax(dim=1)[0].numpy()


def test_api_equals_engine_argmax_on_real_images(predictor, camvid):
    imgs = [load_rgb(p) for p in _val_images(camvid, 3)]
    imgs[1] = np.ascontiguousarray(imgs[1][17:300, 5:431])  # another size: labels must come back at it
    expected = [_oracle(predictor, im) for im in imgs]
    got = predictor.predict(imgs, batch_size=2)
    assert isinstance(got, list) and len(got) == 3
    for g, e, im in zip(got, expected, imgs):
        assert g.shape == im.shape[:2]
        np.testing.assert_array_equal(g, e)
    assert len(np.unique(np.concatenate([g.ravel() for g in got]))) > 1  # not a constant map
    single = predictor.predict(imgs[0])
    np.testing.assert_array_equal(single, expected[0])
    stacked = predictor.predict(np.stack([imgs[0], imgs[2]]))
    assert stacked.shape == (2, *imgs[0].shape[:2])
    np.testing.assert_array_equal(stacked[1], expected[2])


def test_as_classes_uses_the_stored_matching(predictor, tiny_run_dir, camvid):
    img = load_rgb(_val_images(camvid, 1)[0])
    clusters = predictor.predict(img)
    classes = predictor.predict(img, as_classes=True)
    mapping = np.asarray(json.loads((tiny_run_dir / "model" / "model.json").read_text())["cluster_to_class"])
    np.testing.assert_array_equal(classes, mapping[clusters])


def test_as_classes_without_matching_is_a_clear_error(tiny_run_dir, tmp_path, camvid):
    ckpt = tmp_path / "model"
    shutil.copytree(tiny_run_dir / "model", ckpt)
    meta = json.loads((ckpt / "model.json").read_text())
    meta["cluster_to_class"] = None
    (ckpt / "model.json").write_text(json.dumps(meta))
    p = load(ckpt, device="cpu")
    with pytest.raises(ValueError, match="no cluster -> class matching"):
        p.predict(load_rgb(_val_images(camvid, 1)[0]), as_classes=True)


def test_cli_folder_list_and_file_inputs(predictor, tiny_run_dir, camvid, tmp_path):
    src = _val_images(camvid, 4)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(src[0], folder / src[0].name)
    small = load_rgb(src[1])[::2, ::3]  # 180 x 160: sizes must follow each input
    Image.fromarray(np.ascontiguousarray(small)).save(folder / "sub" / "small.png")
    (folder / "sub" / "broken.jpg").write_bytes(b"not an image at all")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{src[2]}\n\n{src[3].name}\n")
    shutil.copy(src[3], tmp_path / src[3].name)  # relative entries resolve against the list's folder
    out = tmp_path / "out"
    rc = main([str(tiny_run_dir), str(folder), str(listing), str(src[1]), "--out", str(out), "--batch-size", "2",
               "--overlay"])
    assert rc == 0
    expect = {
        src[0].stem: (360, 480), "sub/small": (180, 160), src[2].stem: (360, 480), src[3].stem: (360, 480),
        src[1].stem: (360, 480),
    }
    for stem, hw in expect.items():
        lab = load_label(out / f"{stem}.png")
        assert lab.shape == hw, stem
        assert lab.min() >= 0 and lab.max() < predictor.n_clusters
        assert (out / "overlay" / f"{stem}.jpg").is_file()
    with Image.open(out / f"{src[0].stem}.png") as im:
        assert im.mode == "L"
    np.testing.assert_array_equal(load_label(out / f"{src[0].stem}.png"), _oracle(predictor, load_rgb(src[0])))
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 1 and errors[0]["file"].endswith("broken.jpg") and errors[0]["stage"] == "predict"
    summary = json.loads((out / "predict.json").read_text())
    assert summary["n_images"] == 5 and summary["n_errors"] == 1 and summary["pretrained_backbone"] is False


def test_cli_classes_writes_matched_ids(predictor, tiny_run_dir, camvid, tmp_path):
    src = _val_images(camvid, 1)[0]
    assert main([str(tiny_run_dir / "model"), str(src), "--out", str(tmp_path / "c"), "--classes"]) == 0
    assert main([str(tiny_run_dir / "model"), str(src), "--out", str(tmp_path / "k")]) == 0
    classes = load_label(tmp_path / "c" / f"{src.stem}.png")
    clusters = load_label(tmp_path / "k" / f"{src.stem}.png")
    mapping = np.asarray(predictor.meta["cluster_to_class"])
    np.testing.assert_array_equal(classes, np.where(mapping[clusters] < 0, 255, mapping[clusters]))


def test_missing_checkpoint_files_are_clear_errors(tiny_run_dir, tmp_path, capsys):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no model checkpoint"):
        load(tmp_path)
    ckpt = tmp_path / "model"
    shutil.copytree(tiny_run_dir / "model", ckpt)
    (ckpt / "decoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="decoder.safetensors"):
        load(ckpt)
    shutil.copy(tiny_run_dir / "model" / "decoder.safetensors", ckpt)
    (ckpt / "backbone.safetensors").unlink()
    with pytest.raises(CheckpointError, match="random backbone but backbone.safetensors is missing"):
        load(ckpt)
    meta = json.loads((ckpt / "model.json").read_text())
    meta["backbone"].update(weights=str(tmp_path / "dino.pth"), pretrained=True)
    (ckpt / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="dino.pth"):
        load(ckpt)
    # --out outside the input folder (inside it is refused before the checkpoint is read)
    assert main([str(ckpt), str(tmp_path), "--out", str(tmp_path.parent / f"{tmp_path.name}-out")]) == 2
    assert "dino.pth" in capsys.readouterr().err


def test_collect_inputs_stems(tmp_path):
    (tmp_path / "d" / "x").mkdir(parents=True)
    for name in ("d/a.jpg", "d/a.png", "d/x/b.jpeg", "d/notes.txt", "c.jpg"):
        (tmp_path / name).write_bytes(b"")
    items = collect_inputs([tmp_path / "d", tmp_path / "c.jpg"])
    assert [s for _, s in items] == ["a_jpg", "a_png", "x/b", "c"]
    lst = tmp_path / "l.txt"
    lst.write_text("d/x/b.jpeg\nc.jpg\n")
    assert [(p, s) for p, s in collect_inputs([lst])] == [(tmp_path / "d/x/b.jpeg", "d/x/b"), (tmp_path / "c.jpg", "c")]
    with pytest.raises(FileNotFoundError, match="input not found"):
        collect_inputs([tmp_path / "missing"])


def test_label_png_dtype_follows_id_count(tmp_path):
    lab = np.array([[0, 3], [-1, 2]])
    save_label_png(lab, tmp_path / "a.png", n_ids=4)
    np.testing.assert_array_equal(load_label(tmp_path / "a.png"), [[0, 3], [255, 2]])
    big = np.array([[0, 300], [-1, 170]])
    save_label_png(big, tmp_path / "b.png", n_ids=301)
    with Image.open(tmp_path / "b.png") as im:
        assert im.mode.startswith("I")
    np.testing.assert_array_equal(load_label(tmp_path / "b.png"), [[0, 300], [65535, 170]])


def test_chunked_upsampled_argmax_equals_full():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(11, 5, 7, generator=g)
    full = torch.nn.functional.interpolate(logits[None], size=(37, 53), mode="bilinear", align_corners=False)
    want = full[0].argmax(dim=0)
    for budget in (37 * 53, 3 * 37 * 53, 10**9):
        torch.testing.assert_close(upsampled_argmax(logits, (37, 53), max_elements=budget), want, rtol=0, atol=0)
