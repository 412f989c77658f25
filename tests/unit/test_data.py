"""transfgu.data: decoding, label maps and data set readers (real stand-in sets + synthetic layouts)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.data import REPO, require_shared_data
from PIL import Image

from transfgu.data import (
    IGNORE_INDEX,
    DatasetError,
    DecodeError,
    ImageRecord,
    LabelMapError,
    dataset_info,
    list_records,
    load_label,
    load_rgb,
    load_sample,
    resize_image,
    resize_label,
)
from transfgu.data.labelmaps import (
    cityscapes_label_map,
    coco_stuff_label_map,
    label_map_from_classes_file,
    lip_label_map,
    voc_label_map,
)

torch.set_num_threads(1)

SHARED_CSV = REPO.parent / "shared" / "docs" / "coco_stuff_labels.csv"
PACKAGE_CSV = REPO / "transfgu" / "data" / "coco_stuff_labels.csv"


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _save(path: Path, arr: np.ndarray, mode: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path, **kw)
    return path


def _rgb(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    return _rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ===== decoding


def test_load_rgb_png_roundtrip_exact(tmp_path):
    img = _rgb()
    out = load_rgb(_save(tmp_path / "a.png", img))
    assert out.dtype == np.uint8 and out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out, img)


def test_load_rgb_grayscale_replicated(tmp_path):
    gray = _rng().integers(0, 256, (5, 7), dtype=np.uint8)
    out = load_rgb(_save(tmp_path / "g.png", gray))
    assert out.shape == (5, 7, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_load_rgb_alpha_composited_on_black(tmp_path, mode):
    rng = _rng(1)
    if mode == "RGBA":
        arr = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
        color = arr[..., :3].astype(np.float64)
    else:
        arr = rng.integers(0, 256, (4, 5, 2), dtype=np.uint8)
        color = np.repeat(arr[..., :1].astype(np.float64), 3, axis=2)
    arr[0, 0, -1] = 0  # fully transparent -> black
    arr[0, 1, -1] = 255  # opaque -> colour kept
    out = load_rgb(_save(tmp_path / "a.png", arr, mode))
    expected = np.floor(color * arr[..., -1:].astype(np.float64) / 255.0 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert (out[0, 0] == 0).all()
    np.testing.assert_array_equal(out[0, 1], color[0, 1].astype(np.uint8))


def test_load_rgb_palette_gives_colours(tmp_path):
    idx = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = [255, 0, 0, 0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 9)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette)
    im.save(tmp_path / "p.png")
    out = load_rgb(tmp_path / "p.png")
    table = np.array(palette, dtype=np.uint8).reshape(256, 3)
    np.testing.assert_array_equal(out, table[idx])


def test_load_rgb_16bit_rescaled_not_clipped(tmp_path):
    arr = np.array([[0, 257, 65535, 32896, 1000]], dtype=np.uint16)
    path = tmp_path / "d.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_rgb(path)
    np.testing.assert_array_equal(out[..., 0], [[0, 1, 255, 128, 4]])  # 1000 * 255 / 65535 = 3.89


def test_load_rgb_cmyk(tmp_path):
    cmyk = Image.fromarray(_rng(2).integers(0, 256, (5, 7, 4), dtype=np.uint8), "CMYK")
    cmyk.save(tmp_path / "c.tif")
    out = load_rgb(tmp_path / "c.tif")
    np.testing.assert_array_equal(out, np.asarray(cmyk.convert("RGB")))
    cmyk.save(tmp_path / "c.jpg", quality=95)  # a CMYK JPEG decodes to 3 channels too
    assert load_rgb(tmp_path / "c.jpg").shape == (5, 7, 3)


@pytest.mark.parametrize(("orientation", "k"), [(6, -1), (8, 1), (3, 2)])
def test_load_rgb_exif_orientation(tmp_path, orientation, k):
    img = _rgb(4, 6, seed=3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "e.png"
    Image.fromarray(img).save(path, exif=exif.tobytes())
    np.testing.assert_array_equal(load_rgb(path), np.rot90(img, k=k))  # k=-1: 90 degrees clockwise
    np.testing.assert_array_equal(load_rgb(path, exif_transpose=False), img)


def test_load_rgb_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("this is not an image")
    good = _save(tmp_path / "good.jpg", _rgb(64, 64), quality=95)
    truncated = tmp_path / "trunc.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    good_png = _save(tmp_path / "good.png", _rgb(64, 64))
    truncated_png = tmp_path / "trunc.png"
    truncated_png.write_bytes(good_png.read_bytes()[: good_png.stat().st_size // 2])
    for path, reason in [
        (empty, "empty"),
        (text, "not a recognised"),
        (truncated, "truncated"),
        (truncated_png, None),
    ]:
        with pytest.raises(DecodeError, match=reason) as info:
            load_rgb(path)
        assert isinstance(info.value, ValueError)
        assert info.value.path == path and str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_rgb(tmp_path / "nope.jpg")


def test_load_label_palette_gives_indices_and_16bit_values(tmp_path):
    idx = np.array([[0, 1, 255], [20, 3, 0]], dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(list(_rng(4).integers(0, 256, 768)))
    im.save(tmp_path / "voc.png")
    out = load_label(tmp_path / "voc.png")
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, idx)
    big = np.array([[0, 300, 65535]], dtype=np.uint16)
    Image.fromarray(big).save(tmp_path / "b.png")
    np.testing.assert_array_equal(load_label(tmp_path / "b.png"), big)


def test_load_label_rejects_multichannel(tmp_path):
    path = _save(tmp_path / "rgb_label.png", _rgb())
    with pytest.raises(DecodeError, match="3 channel") as info:
        load_label(path)
    assert "rgb_label.png" in str(info.value)
    empty = tmp_path / "e.png"
    empty.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty"):
        load_label(empty)


def test_resize_label_matches_nearest_exact_oracle():
    lab = _rng(5).integers(0, 50, (37, 53)).astype(np.int64)
    for size in [(37, 53), (18, 26), (80, 111), (5, 200), (1, 1)]:
        got = resize_label(lab, size)
        oracle = F.interpolate(torch.from_numpy(lab)[None, None].double(), size=size, mode="nearest-exact")
        np.testing.assert_array_equal(got, oracle[0, 0].long().numpy())
        assert got.dtype == np.int64 and got.shape == size
    # upscaling by 2 repeats every pixel, downscaling by 2 takes the odd rows/columns (pixel centres)
    np.testing.assert_array_equal(resize_label(lab, (74, 106)), lab.repeat(2, 0).repeat(2, 1))
    np.testing.assert_array_equal(resize_label(lab[:36, :52], (18, 26)), lab[1:36:2, 1:52:2])


def test_resize_image_nearest_and_bilinear():
    img = _rgb(40, 60, seed=6)
    near = resize_image(img, (20, 30), mode="nearest")
    np.testing.assert_array_equal(near, img[1::2, 1::2])
    bil = resize_image(img, (23, 41), mode="bilinear")
    assert bil.dtype == np.uint8 and bil.shape == (23, 41, 3)
    pil = np.asarray(Image.fromarray(img).resize((41, 23), Image.BILINEAR)).astype(int)
    assert np.abs(bil.astype(int) - pil).max() <= 2  # torch antialias=True follows PIL's filter
    const = np.full((30, 30, 3), 77, np.uint8)
    assert (resize_image(const, (13, 51)) == 77).all()
    with pytest.raises(ValueError, match="mode"):
        resize_image(img, (5, 5), mode="bicubic")


# ===== label maps


def _csv_oracle(granularity: int) -> dict[int, int]:
    """raw id -> class id straight from the shared CSV (empty cell = ignore)."""
    column = {27: "coarse27", 171: "fine171", 80: "coco80"}[granularity]
    out = {}
    with SHARED_CSV.open() as f:
        for row in csv.DictReader(f):
            raw = int(row["stuffthingmap_id"])
            out[raw] = int(row[column]) if row[column].strip() else IGNORE_INDEX
    return out


def test_package_csv_is_the_shared_csv():
    if not SHARED_CSV.exists():
        pytest.skip("shared docs not present")
    assert PACKAGE_CSV.read_bytes() == SHARED_CSV.read_bytes()


@pytest.mark.parametrize("granularity", [27, 171, 80])
def test_coco_maps_equal_csv(granularity):
    if not SHARED_CSV.exists():
        pytest.skip("shared docs not present")
    lm = coco_stuff_label_map(granularity)
    oracle = _csv_oracle(granularity)
    raw = np.array(sorted(oracle), dtype=np.int64)
    np.testing.assert_array_equal(lm.apply(raw), [oracle[r] for r in raw])
    assert lm.n_classes == {27: 27, 171: 171, 80: 81}[granularity]
    assert lm.apply(np.array([-1]))[0] == IGNORE_INDEX
    with pytest.raises(LabelMapError, match="bad.png"):
        lm.apply(np.array([182], dtype=np.uint8), source="bad.png")


def test_coco_maps_hand_checked_values():
    c27, c171, c80 = coco_stuff_label_map(27), coco_stuff_label_map(171), coco_stuff_label_map(80)
    raw = np.array([0, 1, 12, 89, 91, 156, 181, 11, 255], dtype=np.uint8)
    # person, bicycle, stop sign, toothbrush, banner, sky-other, wood, street sign (unused), unlabeled
    np.testing.assert_array_equal(c27.apply(raw), [9, 11, 8, 4, 17, 23, 24, 8, 255])
    np.testing.assert_array_equal(c171.apply(raw), [0, 1, 11, 79, 80, 145, 170, 255, 255])
    np.testing.assert_array_equal(c80.apply(raw), [1, 2, 12, 80, 0, 0, 0, 255, 255])
    assert (
        c27.class_names[9] == "person" and c27.class_names[23] == "sky" and c27.class_names[0] == "electronic"
    )
    assert c171.class_names[0] == "person" and c171.class_names[170] == "wood"
    assert c80.class_names[0] == "background" and c80.class_names[80] == "toothbrush"


def test_cityscapes_map():
    lm = cityscapes_label_map()
    assert lm.n_classes == 27 and lm.class_names[0] == "road" and lm.class_names[26] == "bicycle"
    raw = np.array([0, 6, 7, 8, 24, 26, 33, 255, -1])
    np.testing.assert_array_equal(lm.apply(raw), [255, 255, 0, 1, 17, 19, 26, 255, 255])
    with pytest.raises(LabelMapError, match="34"):
        lm.apply(np.array([34]), source="x_gtFine_labelIds.png")
    np.testing.assert_array_equal(lm.apply(np.array([34]), on_unknown="ignore"), [255])


# supplementary Table 3: raw LIP id -> (16-level, 5-level)
LIP_TABLE3 = [
    (0, 0, 0), (1, 1, 1), (2, 2, 1), (3, 3, 3), (4, 4, 1), (5, 5, 2), (6, 6, 2), (7, 7, 2), (8, 8, 5),
    (9, 9, 4), (10, 10, 2), (11, 11, 2), (12, 12, 2), (13, 13, 1), (14, 14, 3), (15, 14, 3), (16, 15, 4),
    (17, 15, 4), (18, 16, 5), (19, 16, 5),
]  # fmt: skip


def test_lip_maps_follow_table3():
    raw = np.array([r for r, _, _ in LIP_TABLE3], dtype=np.uint8)
    np.testing.assert_array_equal(lip_label_map(19).apply(raw), raw)
    np.testing.assert_array_equal(lip_label_map(16).apply(raw), [a for _, a, _ in LIP_TABLE3])
    np.testing.assert_array_equal(lip_label_map(5).apply(raw), [b for _, _, b in LIP_TABLE3])
    assert [lip_label_map(g).n_classes for g in (19, 16, 5)] == [20, 17, 6]
    with pytest.raises(LabelMapError):
        lip_label_map(5).apply(np.array([20], dtype=np.uint8))
    with pytest.raises(ValueError, match="granularity"):
        lip_label_map(7)


def test_voc_map_and_unknown_ids():
    lm = voc_label_map()
    raw = np.array([[0, 5, 20, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(lm.apply(raw), [[0, 5, 20, 255]])
    assert lm.n_classes == 21 and lm.class_names[15] == "person"
    with pytest.raises(LabelMapError, match=r"2007_000032\.png.*\[21, 100\]"):
        lm.apply(np.array([21, 100, 1], dtype=np.uint8), source="2007_000032.png")
    np.testing.assert_array_equal(lm.apply(np.array([21, 1]), on_unknown="ignore"), [255, 1])


def test_classes_file_parsing_of_stand_ins():
    camvid = label_map_from_classes_file(require_shared_data("camvid") / "classes.txt")
    assert camvid.n_classes == 11 and camvid.class_names[0] == "Sky"
    np.testing.assert_array_equal(camvid.apply(np.array([0, 10, 11, 255], np.uint8)), [0, 10, 255, 255])
    msrc = label_map_from_classes_file(require_shared_data("msrc_v2") / "classes.txt")
    assert msrc.n_classes == 21 and "void" not in msrc.class_names
    coarse = label_map_from_classes_file(require_shared_data("ccp") / "classes_coarse.txt")
    assert coarse.n_classes == 15 and coarse.class_names[:2] == ("background", "skin")


# ===== real stand-in sets

COUNTS = {
    "camvid": {"train": 367, "val": 101, "test": 233},
    "msrc_v2": {"train": 286, "val": 305},
    "ccp": {"train": 495, "val": 509},
    "weizmann_horse": {"train": 168, "val": 160},
    "coco_stuff_samples": {"train2017": 13, "val2017": 8},
}
N_CLASSES = {"camvid": 11, "msrc_v2": 21, "ccp": 59, "weizmann_horse": 2, "coco_stuff_samples": 27}


@pytest.mark.parametrize("name", list(COUNTS))
def test_stand_in_counts_and_label_ranges(name):
    root = require_shared_data(name)
    class_names, ignore, lm = dataset_info(name, root)
    assert len(class_names) == N_CLASSES[name] and ignore == IGNORE_INDEX
    for split, count in COUNTS[name].items():
        recs = list_records(name, root, split)
        assert len(recs) == count
        assert len({r.image_id for r in recs}) == count
        assert [r.image_id for r in recs] == sorted(r.image_id for r in recs)
        for r in recs:
            assert r.image_path.is_file() and r.label_path is not None and r.label_path.stem == r.image_id
        for r in recs[:: max(1, count // 6)]:  # a spread of real files through load_sample
            img, lab = load_sample(r, lm)
            assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
            assert lab.shape == img.shape[:2] and lab.dtype == np.int64
            ok = ((lab >= 0) & (lab < len(class_names))) | (lab == IGNORE_INDEX)
            assert ok.all()
            assert (lab != IGNORE_INDEX).any()


def test_camvid_void_becomes_ignore():
    root = require_shared_data("camvid")
    _, _, lm = dataset_info("camvid", root)
    rec = list_records("camvid", root, "val")[0]
    raw = load_label(rec.label_path)
    _, lab = load_sample(rec, lm)
    np.testing.assert_array_equal(lab == IGNORE_INDEX, raw == 11)
    np.testing.assert_array_equal(lab[raw != 11], raw[raw != 11])


def test_ccp_coarse_labels():
    root = require_shared_data("ccp")
    names, _, lm = dataset_info("ccp", root, coarse=True)
    assert len(names) == 15
    recs = list_records("ccp", root, "val", coarse=True)
    assert len(recs) == 509 and recs[0].label_path.parent.parent.name == "labels_coarse"
    _, lab = load_sample(recs[0], lm)
    assert lab.max() < 15


@pytest.mark.parametrize("granularity", [27, 171, 80])
def test_coco_samples_through_maps(granularity):
    root = require_shared_data("coco_stuff_samples")
    names, _, lm = dataset_info("coco_stuff_samples", root, granularity=granularity)
    assert len(names) == {27: 27, 171: 171, 80: 81}[granularity]
    oracle = _csv_oracle(granularity) if SHARED_CSV.exists() else None
    assert len(list_records("coco_stuff_samples", root, "train")) == 13  # "train" finds train2017
    seen_person = False
    for split in ("train2017", "val2017"):
        for rec in list_records("coco_stuff_samples", root, split):
            img, lab = load_sample(rec, lm)
            raw = load_label(rec.label_path)
            assert lab.shape == raw.shape == img.shape[:2]
            if oracle is not None:
                table = np.full(256, -7, dtype=np.int64)
                for r, c in oracle.items():
                    table[r] = c
                np.testing.assert_array_equal(lab, table[raw])
            person = raw == 0
            if person.any():
                seen_person = True
                assert (lab[person] == {27: 9, 171: 0, 80: 1}[granularity]).all()
            assert (lab[raw == 255] == IGNORE_INDEX).all()
            if granularity == 80:
                assert (lab[(raw >= 91) & (raw <= 181)] == 0).all()  # stuff -> background
    assert seen_person


# ===== synthetic layouts


def _label_png(path: Path, arr: np.ndarray, palette: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8), "P" if palette else "L")
    if palette:
        im.putpalette(list(_rng(9).integers(0, 256, 768)))
    im.save(path)
    return path


def _voc_tree(tmp_path: Path, ids=("2007_000001", "2007_000002"), with_labels=None) -> Path:
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    with_labels = ids if with_labels is None else with_labels
    for i, image_id in enumerate(ids):
        _save(voc / "JPEGImages" / f"{image_id}.jpg", _rgb(6, 8, seed=i))
        if image_id in with_labels:
            lab = np.zeros((6, 8), np.uint8)
            lab[2:4, 2:6] = 15
            lab[1, :] = 255
            _label_png(voc / "SegmentationClass" / f"{image_id}.png", lab, palette=True)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids) + "\n")
    return voc


def test_voc_layout(tmp_path):
    voc = _voc_tree(tmp_path)
    for root in (voc, voc.parent):  # VOC2012 or its VOCdevkit parent
        recs = list_records("pascal_voc", root, "train")
        assert [r.image_id for r in recs] == ["2007_000001", "2007_000002"]
    names, ignore, lm = dataset_info("pascal_voc")
    img, lab = load_sample(recs[0], lm)
    assert img.shape == (6, 8, 3) and len(names) == 21 and ignore == 255
    assert lab[3, 3] == 15 and lab[0, 0] == 0 and (lab[1] == 255).all()


def test_voc_split_file_cannot_escape_root(tmp_path):
    voc = _voc_tree(tmp_path)
    split = voc / "ImageSets" / "Segmentation" / "train.txt"
    for bad in ("../../secret", "/etc/passwd", "a/../../b", "C:\\x"):
        split.write_text(f"2007_000001\n{bad}\n")
        with pytest.raises(DatasetError, match="relative name inside the data root"):
            list_records("pascal_voc", voc, "train")


def test_missing_label_error_or_recorded_skip(tmp_path):
    voc = _voc_tree(tmp_path, with_labels=("2007_000001",))
    with pytest.raises(DatasetError, match=r"2007_000002\.png"):
        list_records("pascal_voc", voc, "train")
    recs = list_records("pascal_voc", voc, "train", on_missing_label="skip")
    assert [r.image_id for r in recs] == ["2007_000001"]
    assert recs.skipped[0][0] == "2007_000002" and "2007_000002.png" in recs.skipped[0][1]


def test_cityscapes_layout(tmp_path):
    base = "aachen_000000_000019"
    _save(tmp_path / "leftImg8bit" / "val" / "aachen" / f"{base}_leftImg8bit.png", _rgb(4, 8))
    _save(tmp_path / "leftImg8bit" / "val" / "bonn" / "bonn_000001_000019_leftImg8bit.png", _rgb(4, 8))
    raw = np.array([[0, 7, 26, 33] * 2] * 4, dtype=np.uint8)
    _label_png(tmp_path / "gtFine" / "val" / "aachen" / f"{base}_gtFine_labelIds.png", raw)
    _label_png(tmp_path / "gtFine" / "val" / "bonn" / "bonn_000001_000019_gtFine_labelIds.png", raw)
    recs = list_records("cityscapes", tmp_path, "val")
    assert [r.image_id for r in recs] == [base, "bonn_000001_000019"]
    names, _, lm = dataset_info("cityscapes")
    _, lab = load_sample(recs[0], lm)
    np.testing.assert_array_equal(lab[0, :4], [255, 0, 19, 26])
    assert names[19] == "car"


def test_lip_layout(tmp_path):
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            _save(tmp_path / "TrainVal_images" / f"{split}_images" / f"{i}_{split}.jpg", _rgb(5, 4, seed=i))
            raw = np.arange(20, dtype=np.uint8).reshape(5, 4)
            _label_png(
                tmp_path / "TrainVal_parsing_annotations" / f"{split}_segmentations" / f"{i}_{split}.png", raw
            )
    assert len(list_records("lip", tmp_path, "train")) == 2
    rec = list_records("lip", tmp_path, "val")[0]
    _, _, lm5 = dataset_info("lip", granularity=5)
    _, lab = load_sample(rec, lm5)
    np.testing.assert_array_equal(lab.ravel(), [b for _, _, b in LIP_TABLE3])


def _coco_tree(tmp_path: Path, label_top: str = "stuffthingmaps_trainval2017") -> Path:
    for i in (139, 285, 632):
        _save(tmp_path / "images" / "val2017" / f"{i:012d}.jpg", _rgb(4, 6, seed=i))
        raw = np.full((4, 6), 123, np.uint8)  # grass
        raw[0, 0], raw[0, 1] = 0, 255
        _label_png(tmp_path / label_top / "val2017" / f"{i:012d}.png", raw)
    return tmp_path


@pytest.mark.parametrize("label_top", ["stuffthingmaps_trainval2017", "annotations"])
def test_coco_stuff_layout_and_curated_list(tmp_path, label_top):
    root = _coco_tree(tmp_path / "coco", label_top)
    recs = list_records("coco_stuff", root, "val")
    assert [r.image_id for r in recs] == ["000000000139", "000000000285", "000000000632"]
    _, _, lm = dataset_info("coco_stuff", granularity=27)
    _, lab = load_sample(recs[0], lm)
    assert lab[0, 0] == 9 and lab[0, 1] == 255 and lab[1, 1] == 22  # person, unlabeled, grass -> plant
    curated = tmp_path / "curated_val.txt"
    curated.write_text("# curated\n000000000632.jpg\n000000000139\n")
    recs = list_records("coco_stuff", root, "val2017", curated_list=curated)
    assert [r.image_id for r in recs] == ["000000000139", "000000000632"]
    curated.write_text("000000000632\n../../000000000139.jpg\n")
    with pytest.raises(DatasetError, match="inside the data root"):
        list_records("coco_stuff", root, "val", curated_list=curated)
    curated.write_text("000000999999\n")
    with pytest.raises(DatasetError, match="000000999999"):
        list_records("coco_stuff", root, "val", curated_list=curated)


def test_folder_source_recursive_and_deduplicated(tmp_path):
    _save(tmp_path / "a.jpg", _rgb())
    _save(tmp_path / "a.png", _rgb())
    _save(tmp_path / "sub" / "b.webp", _rgb())
    _save(tmp_path / "sub" / "deeper" / "c.BMP", _rgb())
    (tmp_path / "notes.txt").write_text("not an image")
    recs = list_records("folder", tmp_path)
    assert [r.image_id for r in recs] == ["a.jpg", "a.png", "sub/b", "sub/deeper/c"]
    assert all(r.label_path is None for r in recs)
    img, lab = load_sample(recs[2], None)
    assert img.shape == (6, 8, 3) and lab is None
    assert dataset_info("folder") == ((), IGNORE_INDEX, None)


def _simple_tree(tmp_path: Path, label_value: int = 1) -> Path:
    root = tmp_path / "simple"
    _save(root / "images" / "val" / "x.jpg", _rgb(4, 4))
    _label_png(root / "labels" / "val" / "x.png", np.full((4, 4), label_value))
    (root / "classes.txt").write_text("# toy set\n0 background\n1 thing\n")
    return root


def test_error_paths(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        list_records("camvid", tmp_path / "missing_root", "val")
    root = _simple_tree(tmp_path)
    with pytest.raises(DatasetError, match=r"available splits: \['val'\]"):
        list_records("camvid", root, "test")
    with pytest.raises(DatasetError, match="unknown data set"):
        list_records("nope", root, "val")
    with pytest.raises(DatasetError, match="coarse"):
        list_records("camvid", root, "val", coarse=True)
    # duplicate ids: x.jpg and x.png in one split
    _save(root / "images" / "val" / "x.png", _rgb(4, 4))
    with pytest.raises(DatasetError, match="duplicate image id 'x'"):
        list_records("camvid", root, "val")


def test_label_id_outside_map_names_the_file(tmp_path):
    root = _simple_tree(tmp_path, label_value=7)
    _, _, lm = dataset_info("weizmann_horse", root)
    rec = list_records("weizmann_horse", root, "val")[0]
    with pytest.raises(LabelMapError, match=r"x\.png.*\[7\]"):
        load_sample(rec, lm)
    _, lab = load_sample(rec, lm, on_unknown="ignore")
    assert (lab == IGNORE_INDEX).all()


def test_broken_image_in_a_data_set(tmp_path):
    root = _simple_tree(tmp_path)
    (root / "images" / "val" / "x.jpg").write_bytes(b"")
    _, _, lm = dataset_info("weizmann_horse", root)
    rec = list_records("weizmann_horse", root, "val")[0]
    with pytest.raises(DecodeError, match=r"x\.jpg.*empty"):
        load_sample(rec, lm)


def test_load_sample_exif_auto_keeps_label_grid(tmp_path):
    img = _rgb(4, 6, seed=11)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "i.png", exif=exif.tobytes())
    _label_png(tmp_path / "l.png", np.ones((4, 6)))
    rec = ImageRecord("i", tmp_path / "i.png", tmp_path / "l.png")
    out, lab = load_sample(rec, None)  # label drawn on the stored grid: EXIF is not applied
    np.testing.assert_array_equal(out, img)
    assert lab.shape == (4, 6)
    with pytest.raises(DatasetError, match="6x4"):
        load_sample(rec, None, exif="apply")
    unlabeled, _ = load_sample(ImageRecord("i", tmp_path / "i.png"), None)
    assert unlabeled.shape == (6, 4, 3)
