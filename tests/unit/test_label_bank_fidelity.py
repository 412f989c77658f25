"""The label bank keeps every decision of the float32 definition (issue 12, item 1).

Real CamVid images, the ViT-S/8 shape (random weights: no DINO weights on this machine), K = 27 and 171 at the
presets' grad scales (COCO 1/8, Cityscapes/LIP 1/2), the default configuration (``pseudo.precision=fp32``). The
bank is written by the stage code to Parquet and read back by the one reader training uses; at every position the
argmax over concepts and the gate must equal those of the float32 definition (:func:`concept_map_parts`), and the
maps must be the same bits. The old float16 storage is run through the same comparison to show the test can fail.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.data import require_shared_data

from transfgu.config import load_config
from transfgu.data.io import load_rgb
from transfgu.data.loaders import BankDataset
from transfgu.data.train_store import open_packed_bank
from transfgu.data.transforms import to_model_input
from transfgu.models.backbone import build_backbone
from transfgu.pseudo_labels import concept_map_parts, naive_concept_maps
from transfgu.stages import build_label_maps
from transfgu.store.formats import LabelMaps, label_bank_table, read_label_bank, write_parquet_atomic

SIZE = (64, 80)  # small input, ViT-S/8 shape: an 8 x 10 token grid


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    bb = build_backbone("vit_small_patch8", "none")
    files = sorted((require_shared_data("camvid") / "images" / "train").glob("*.jpg"))[:3]
    images = [load_rgb(f) for f in files]
    # Concepts near CLS tokens of the images' own crops, so objectives have both gradient signs (as real ones do).
    x = torch.stack([to_model_input(im, (128, 160)) for im in images])
    crops = torch.cat([x[:, :, :64, :80], x[:, :, 64:, 80:], x[:, :, 32:96, 40:120], x[:, :, :64, 80:]])
    with torch.no_grad():
        cls = bb(crops).cls
    g = torch.Generator().manual_seed(1)
    base = cls[torch.arange(171) % cls.shape[0]]
    cents = (base + 0.3 * base.std() * torch.randn(base.shape, generator=g)).numpy()
    return bb, images, [f.stem for f in files], cents


@pytest.mark.parametrize(("preset", "k", "grad_scale"), [
    ("coco_stuff27", 27, 0.125), ("coco_stuff171", 171, 0.125), ("cityscapes27", 171, 0.5)
])
def test_bank_read_back_keeps_every_float32_decision(setting, tmp_path, preset, k, grad_scale):
    bb, images, ids, cents = setting
    cfg = load_config(f"conf/{preset}.yaml", [f"pseudo.input_size=[{SIZE[0]}, {SIZE[1]}]"])
    assert cfg.pseudo.grad_scale == grad_scale and cfg.pseudo.precision == "fp32"  # the preset, default precision
    c = cents[:k]

    # The stage: compute, write Parquet, read back through the reader training uses (compact and dense).
    table = label_bank_table(ids, build_label_maps(bb, images, c, cfg.pseudo, torch.device("cpu")))
    write_parquet_atomic(table, tmp_path / "part-00000.parquet")
    assert pq.read_schema(tmp_path / "part-00000.parquet").metadata[b"format"] == b"transfgu.label_bank/2"
    compact = read_label_bank(tmp_path, dense=False)
    dense = read_label_bank(tmp_path)

    # The float32 definition, computed independently of the storage code.
    x = torch.stack([to_model_input(im, SIZE, cfg.pseudo.resize_mode) for im in images])
    parts, (h, w) = concept_map_parts(bb, x, torch.from_numpy(c), grad_scale, cfg.pseudo.mass)
    ref = parts.maps().reshape(len(images), k, h, w).numpy()
    ref_gate = parts.gate.reshape(len(images), k, h, w).numpy()
    ds = BankDataset([], compact, (64, 80))  # the in-memory expansion of one compact entry
    packed = open_packed_bank(tmp_path, None)  # and the streaming reader training uses
    rows = packed.rows_of(ids)
    for i, image_id in enumerate(ids):
        got = dense[image_id]
        assert isinstance(compact[image_id], LabelMaps)
        assert got.dtype == np.float32 and got.shape == (k, h, w)
        np.testing.assert_array_equal(got.argmax(0), ref[i].argmax(0))  # every position's concept decision
        np.testing.assert_array_equal(compact[image_id].gate, ref_gate[i])  # every gate decision
        assert np.array_equal(got.view(np.uint32), ref[i].view(np.uint32))  # and in fact the same bits
        assert ds.bank[image_id].dense().tobytes() == got.tobytes()
        assert packed.row(int(rows[i])).dense().tobytes() == got.tobytes()

    # The previous float16 storage loses decisions at these settings: this comparison does catch a lossy bank.
    f16 = ref.astype(np.float16).astype(np.float32)
    assert (f16.argmax(1) == ref.argmax(1)).mean() < 0.95


def test_precision_default_is_float32_and_bf16_is_opt_in():
    cfg = load_config("conf/coco_stuff171.yaml")
    assert cfg.pseudo.precision == "fp32"
    assert load_config("conf/coco_stuff171.yaml", ["pseudo.precision=bf16"]).pseudo.precision == "bf16"
    from transfgu.stages import pseudo_autocast_dtype

    assert pseudo_autocast_dtype(cfg.pseudo) is None
    assert pseudo_autocast_dtype(load_config(None, ["pseudo.precision=bf16"]).pseudo) is torch.bfloat16


@pytest.mark.slow
def test_float32_definition_matches_the_k_backward_oracle_decisions(setting):
    """The definition the bank is compared with is the reference's (K full backward passes), decision for decision
    (slow: K full backward passes through ViT-S/8; tests/unit/test_pseudo_labels.py checks the values at small K)."""
    bb, images, _, cents = setting
    k = 12
    x = torch.stack([to_model_input(im, SIZE, "nearest") for im in images[:1]])
    c = torch.from_numpy(cents[:k])
    parts, (h, w) = concept_map_parts(bb, x, c, 0.125)
    fast = parts.maps().reshape(1, k, h, w)
    naive = naive_concept_maps(bb, x, c, 0.125)
    np.testing.assert_array_equal(fast.argmax(1).numpy(), naive.argmax(1).numpy())
    np.testing.assert_array_equal(parts.gate.reshape(1, k, h, w).numpy(), (naive > 0).numpy())


def test_label_maps_encoding_roundtrip_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    a_hat = rng.random((4, 5), dtype=np.float32)
    gate = rng.random((6, 4, 5)) < 0.5
    bonus = np.where(gate & (rng.random((6, 4, 5)) < 0.3), rng.random((6, 4, 5), dtype=np.float32) * 1e-3, 0)
    bonus = bonus.astype(np.float32)
    maps = np.where(gate, a_hat[None] + bonus, np.float32(0)).astype(np.float32)
    lm = LabelMaps.from_parts(a_hat, gate, bonus, maps)
    assert lm.dense().tobytes() == maps.tobytes()
    arbitrary = rng.standard_normal((3, 2, 2)).astype(np.float32)
    write_parquet_atomic(label_bank_table(["a", "b"], [lm, arbitrary]), tmp_path / "p.parquet")
    back = read_label_bank(tmp_path / "p.parquet")
    assert back["a"].tobytes() == maps.tobytes() and back["b"].tobytes() == arbitrary.tobytes()
    with pytest.raises(ValueError, match=r"\(K, h, w\)"):
        label_bank_table(["a"], [np.zeros((4, 4), np.float32)])
