"""Tests of transfgu.crops against naive oracles, the reference's window counts and real images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.data import require_shared_data
from PIL import Image

from transfgu.crops import (
    DROPPED,
    crop_and_resize,
    embed_crops,
    extract_crops_batch,
    foreground_prior,
    select_windows,
    window_layout,
)

COCO_BETAS = (0.5, 0.4, 0.3, 0.2)
VOC_BETAS = (0.6, 0.5, 0.4, 0.3)
SMALL_BETAS = (0.5, 0.4, 0.3)  # 74 windows on a 16x16 grid: keeps the one-crop-at-a-time oracles fast


@pytest.fixture(autouse=True)
def _few_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def _naive_layout(h: int, w: int, betas) -> list[tuple[int, int, int, int, int]]:
    """The reference's rule literally: loop over every grid position and test the acceptance rules with a float b/2."""
    out = []
    for s, beta in enumerate(betas):
        b = int(min(h * beta, w * beta))
        r = b / 2
        for y in range(h):
            for x in range(w):
                inside = x - r >= 0 and y - r >= 0 and x + r < w and y + r < h
                mult_y, mult_x = y % r == 0, x % r == 0
                snap_y, snap_x = y + r == h - 1, x + r == w - 1
                ok = (mult_y and mult_x) or (snap_x and mult_y) or (snap_y and mult_x) or (snap_x and snap_y)
                if inside and ok:
                    # window mask: every patch with |dy| <= b/2 and |dx| <= b/2
                    ys = [yy for yy in range(h) if abs(yy - y) <= r]
                    xs = [xx for xx in range(w) if abs(xx - x) <= r]
                    out.append((s, min(ys), min(xs), max(ys), max(xs)))
    return out


# ----------------------------------------------------------------------------------------------------------
# window layout
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("grid", "betas", "per_scale"),
    [
        ((80, 80), COCO_BETAS, [9, 16, 36, 81]),
        ((80, 80), VOC_BETAS, [9, 9, 16, 36]),
        ((80, 160), COCO_BETAS, [21, 36, 78, 171]),
        ((160, 80), COCO_BETAS, [21, 36, 78, 171]),
    ],
)
def test_window_counts_match_reference(grid, betas, per_scale):
    lay = window_layout(*grid, betas)
    assert np.bincount(lay.scale_index).tolist() == per_scale
    assert len(lay) == sum(per_scale)
    assert len(lay) in (142, 70, 306)


@pytest.mark.parametrize("grid", [(80, 80), (80, 160), (160, 80)])
def test_crop_sides_in_pixels(grid):
    lay = window_layout(*grid, COCO_BETAS)
    box = lay.boxes_pixel(8)
    side_x, side_y = box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]
    assert np.array_equal(side_x, side_y)  # square everywhere, also on non-square grids
    for s, side in enumerate([327, 263, 199, 135]):
        assert set(side_x[lay.scale_index == s].tolist()) == {side}
    full = lay.boxes_pixel(8, trim_last_pixel=False)
    assert set((full[:, 2] - full[:, 0]).tolist()) == {328, 264, 200, 136}
    assert box.dtype == np.int32 and box.min() >= 0
    assert box[:, 2].max() == grid[1] * 8 - 1 and box[:, 3].max() == grid[0] * 8 - 1
    voc = window_layout(80, 80, VOC_BETAS).boxes_pixel(8)
    assert (voc[:, 2] - voc[:, 0]).max() == 391


def test_window_centres_of_the_reference_table():
    lay = window_layout(80, 80, COCO_BETAS)
    expected = {0: [20, 40, 59], 1: [16, 32, 48, 63], 2: [12, 24, 36, 48, 60, 67], 3: [*range(8, 65, 8), 71]}
    for s, centres in expected.items():
        bp = lay.boxes_patch[lay.scale_index == s]
        cy = sorted({int(v) for v in (bp[:, 0] + bp[:, 2]) // 2})
        cx = sorted({int(v) for v in (bp[:, 1] + bp[:, 3]) // 2})
        assert cy == centres and cx == centres
        assert set((bp[:, 2] - bp[:, 0] + 1).tolist()) == {lay.sides[s] + 1}


@pytest.mark.parametrize(
    ("grid", "betas"),
    [
        ((80, 80), COCO_BETAS),
        ((80, 80), VOC_BETAS),
        ((80, 160), COCO_BETAS),
        ((160, 80), COCO_BETAS),
        ((40, 40), COCO_BETAS),
        ((20, 40), (0.5, 0.4, 0.2)),
        ((50, 30), (0.4, 0.2)),
        ((41, 41), (0.5,)),
    ],
)
def test_window_layout_equals_naive_rules(grid, betas):
    lay = window_layout(*grid, betas)
    got = sorted((int(s), *map(int, box)) for s, box in zip(lay.scale_index, lay.boxes_patch))
    assert got == sorted(_naive_layout(*grid, betas))
    masks = lay.window_masks()
    assert masks.sum(axis=(1, 2)).tolist() == [(lay.sides[s] + 1) ** 2 for s in lay.scale_index]
    assert np.allclose(lay.beta, np.asarray(betas, dtype=np.float32)[lay.scale_index])


def test_odd_window_side_uses_floor_half():
    lay = window_layout(30, 30, (0.5,))  # b = 15, half-side 7
    assert lay.sides == (15,)
    assert set((lay.boxes_patch[:, 2] - lay.boxes_patch[:, 0] + 1).tolist()) == {15}
    # centres 7, 14, 21 (multiples of 7) and 22 (flush with the border)
    assert sorted(set(lay.boxes_patch[:, 0].tolist())) == [0, 7, 14, 15]
    assert len(lay) == 16 and lay.boxes_patch[:, 2].max() == 29


@pytest.mark.parametrize("beta", [0.0, -0.1, 1.01, 2.0])
def test_window_layout_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        window_layout(80, 80, (0.5, beta))


def test_window_layout_rejects_tiny_and_oversized_windows():
    with pytest.raises(ValueError, match="window side"):
        window_layout(4, 4, (0.2,))  # b = 0
    with pytest.raises(ValueError, match="window side"):
        window_layout(8, 8, (0.2,))  # b = 1
    with pytest.raises(ValueError, match="no window fits"):
        window_layout(80, 80, (1.0,))  # b + 1 = 81 patches > 80
    with pytest.raises(ValueError):
        window_layout(80, 80, ())


# ----------------------------------------------------------------------------------------------------------
# foreground prior and selection
# ----------------------------------------------------------------------------------------------------------
def test_foreground_prior_equals_naive_loop():
    g = torch.Generator().manual_seed(0)
    attn = torch.rand(3, 6, 12 * 10, generator=g)
    fg = foreground_prior(attn, (12, 10))
    assert fg.shape == (3, 12, 10) and fg.dtype == torch.bool
    for b in range(3):
        m = [sum(float(attn[b, hd, j]) for hd in range(6)) / 6 for j in range(120)]
        thr = sum(m) / len(m)
        naive = torch.tensor([v > thr for v in m]).view(12, 10)
        assert torch.equal(fg[b], naive)
        assert torch.equal(foreground_prior(attn[b], (12, 10)), naive)
    with pytest.raises(ValueError):
        foreground_prior(attn, (10, 10))


def _pixel_oracle(fg_patch: np.ndarray, lay, mode, th_fg, th_bg, p: int = 8) -> list[str]:
    """The reference's way: upsample the patch masks x p (nearest) and count pixels."""
    fg_px = np.kron(fg_patch.astype(np.int64), np.ones((p, p), dtype=np.int64)).astype(bool)
    out = []
    for win in lay.window_masks():
        win_px = np.kron(win.astype(np.int64), np.ones((p, p), dtype=np.int64)).astype(bool)
        n = win_px.sum()
        fg_frac = (fg_px & win_px).sum() / n
        bg_frac = (~fg_px & win_px).sum() / n
        if mode == "all":
            out.append("all")
        elif fg_frac > th_fg:
            out.append("fg")
        elif mode == "fg_bg" and bg_frac > th_bg:
            out.append("bg")
        else:
            out.append(DROPPED)
    return out


def _blob_mask(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.standard_normal((1, 1, h // 8 + 1, w // 8 + 1)))
    smooth = F.interpolate(noise, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    return smooth > 0.3


@pytest.mark.parametrize("mode", ["fg_bg", "fg", "all"])
@pytest.mark.parametrize("seed", [0, 1])
def test_select_windows_equals_pixel_oracle(mode, seed):
    h, w = 40, 60
    lay = window_layout(h, w, COCO_BETAS)
    fg = _blob_mask(h, w, seed)
    got = select_windows(torch.from_numpy(fg), lay, mode, 0.5, 0.8)
    want = _pixel_oracle(fg, lay, mode, 0.5, 0.8)
    assert got.tolist() == want
    if mode == "fg_bg":  # the test must exercise every outcome
        assert {"fg", "bg", DROPPED} <= set(got.tolist())


def test_select_windows_on_real_mask_and_trivial_masks():
    root = require_shared_data("weizmann_horse")
    lab = sorted((root / "labels" / "train").glob("*.png"))[0]
    mask = np.asarray(Image.open(lab).resize((80, 80), Image.NEAREST)) == 1
    lay = window_layout(80, 80, COCO_BETAS)
    for th_fg, th_bg in [(0.5, 0.8), (0.3, 0.6)]:
        got = select_windows(mask, lay, "fg_bg", th_fg, th_bg)
        assert got.tolist() == _pixel_oracle(mask, lay, "fg_bg", th_fg, th_bg)
    assert set(select_windows(np.ones((80, 80), bool), lay, "fg_bg").tolist()) == {"fg"}
    assert set(select_windows(np.zeros((80, 80), bool), lay, "fg_bg").tolist()) == {"bg"}
    assert set(select_windows(np.zeros((80, 80), bool), lay, "fg").tolist()) == {DROPPED}
    # exactly half foreground is not "> 0.5": a window split down the middle is dropped
    half = np.zeros((80, 80), bool)
    half[:, :40] = True
    lay1 = window_layout(80, 80, (0.5,))
    assert select_windows(half, lay1, "fg_bg")[4] != "fg"
    with pytest.raises(ValueError):
        select_windows(np.ones((10, 10), bool), lay, "fg_bg")
    with pytest.raises(ValueError):
        select_windows(np.ones((80, 80), bool), lay, "things")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------
# crop and resize
# ----------------------------------------------------------------------------------------------------------
def _naive_crops(images, boxes_per_image, out_size):
    out = []
    for i, boxes in enumerate(boxes_per_image):
        for x0, y0, x1, y1 in np.asarray(boxes).reshape(-1, 4).tolist():
            sl = images[i : i + 1, :, y0:y1, x0:x1]
            out.append(
                F.interpolate(
                    sl, size=(out_size, out_size), mode="bilinear", align_corners=False, antialias=False
                )
            )
    return torch.cat(out)


def _real_images(n: int, size: int) -> torch.Tensor:
    root = require_shared_data("weizmann_horse")
    paths = sorted((root / "images" / "train").glob("*.jpg"))[:n]
    imgs = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return (x - mean) / std


def test_crop_and_resize_is_interpolate_exactly_in_float64():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 3, 160, 240, generator=g, dtype=torch.float64)
    lay = window_layout(20, 30, COCO_BETAS)
    boxes = lay.boxes_pixel(8)
    per_image = [boxes[::3], boxes[1::5]]
    for out_size in (40, 80, 97):  # down- and upsampled crops, odd output size
        got = crop_and_resize(img, per_image, out_size)
        want = _naive_crops(img, per_image, out_size)
        assert got.shape == want.shape
        assert (got - want).abs().max() < 1e-10


def test_crop_and_resize_float32_real_images():
    img = _real_images(2, 640)
    boxes = window_layout(80, 80, COCO_BETAS).boxes_pixel(8)
    per_image = [boxes[[0, 9, 30, 141]], boxes[[8, 25, 60]]]  # one crop per scale, corners and interior
    got = crop_and_resize(img, per_image, 320)
    want = _naive_crops(img, per_image, 320)
    # float32 sample coordinates differ by ~1e-5 px between grid_sample and interpolate
    assert (got - want).abs().max() < 2e-3
    assert (got - want).abs().mean() < 1e-5


def test_roi_align_backend_matches_except_upsampled_edges():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 3, 160, 160, generator=g, dtype=torch.float64)
    down = np.array([[8, 16, 111, 119]])  # 103 px -> 80: downsampled
    up = np.array([[40, 48, 103, 111]])  # 63 px -> 80: upsampled, away from the border
    ra = crop_and_resize(img, [down], 80, method="roi_align")
    assert (ra - _naive_crops(img, [down], 80)).abs().max() < 1e-10
    ra = crop_and_resize(img, [up], 80, method="roi_align")
    want = _naive_crops(img, [up], 80)
    diff = (ra - want).abs()
    assert diff[..., 1:-1, 1:-1].max() < 1e-10  # interior identical
    # roi_align reads the neighbour pixel beyond the slice where F.interpolate clamps to the slice edge
    assert diff[..., 0, :].max() > 1e-3 and diff[..., :, -1].max() > 1e-3


def test_crop_and_resize_validates_boxes():
    img = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError):
        crop_and_resize(img, [np.array([[0, 0, 40, 8]])], 8)
    with pytest.raises(ValueError):
        crop_and_resize(img, [np.array([[8, 0, 8, 8]])], 8)
    with pytest.raises(ValueError):
        crop_and_resize(img, [], 8)
    assert crop_and_resize(img, [np.zeros((0, 4), int)], 8).shape == (0, 3, 8, 8)


# ----------------------------------------------------------------------------------------------------------
# embedding and the stage function
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_backbone():
    from transfgu.models.backbone import build_backbone

    torch.manual_seed(0)
    return build_backbone("vit_test_tiny", weights="none")


def test_embed_crops_batched_equals_one_at_a_time(tiny_backbone):
    crops = _real_images(7, 64)
    batched = embed_crops(tiny_backbone, crops, batch_size=3, autocast_dtype=None)
    with torch.inference_mode():
        single = torch.cat([tiny_backbone(crops[i : i + 1]).cls for i in range(7)])
    assert batched.shape == (7, tiny_backbone.embed_dim) and batched.dtype == torch.float32
    assert (batched - single).abs().max() < 1e-5
    assert embed_crops(tiny_backbone, crops[:0], 4).shape == (0, tiny_backbone.embed_dim)
    bf = embed_crops(tiny_backbone, crops, batch_size=4, autocast_dtype=torch.bfloat16)
    assert bf.dtype == torch.float32 and torch.nn.functional.cosine_similarity(bf, single).min() > 0.98


def _naive_extract(backbone, image, betas, mode, crop_size):
    """One image, one crop at a time, pixel-level selection: the reference's procedure."""
    p = backbone.patch_size
    with torch.inference_mode():
        out = backbone(image[None])
    h, w = out.grid
    a = out.attn_cls[0].mean(0)
    fg = (a > a.mean()).view(h, w).numpy()
    lay = window_layout(h, w, betas)
    pools = _pixel_oracle(fg, lay, mode, 0.5, 0.8, p)
    rows = []
    for j, (pool, box) in enumerate(zip(pools, lay.boxes_pixel(p))):
        if pool == DROPPED:
            continue
        crop = _naive_crops(image[None], [box[None]], crop_size)
        with torch.inference_mode():
            cls = backbone(crop).cls[0]
        rows.append((j, pool, box.tolist(), cls))
    return rows


@pytest.mark.parametrize(
    ("mode", "size", "betas"),
    [("fg_bg", 160, COCO_BETAS), ("fg", 128, SMALL_BETAS), ("all", 128, SMALL_BETAS)],
)
def test_extract_one_image_equals_naive_reference(tiny_backbone, mode, size, betas):
    image = _real_images(1, size)[0]  # 160 px: 20x20 patch grid, 142 windows, 80 px crops
    rec = extract_crops_batch(tiny_backbone, image[None], betas, mode, 0.5, 0.8, None, 32, None)[0]
    naive = _naive_extract(tiny_backbone, image, betas, mode, size // 2)
    assert len(rec) == len(naive) > 0
    assert rec.crop_index.tolist() == [r[0] for r in naive]
    assert rec.pool.tolist() == [r[1] for r in naive]
    assert rec.box.tolist() == [r[2] for r in naive]
    assert rec.crop_index.dtype == np.int32 and rec.box.dtype == np.int32 and rec.cls.dtype == np.float32
    lay = window_layout(size // 8, size // 8, betas)
    assert np.array_equal(rec.scale, lay.beta[rec.crop_index])
    assert np.abs(rec.cls - torch.stack([r[3] for r in naive]).numpy()).max() < 1e-4
    if mode == "all":
        assert len(rec) == len(lay) == 74


def test_extract_batch_equals_per_image(tiny_backbone):
    images = _real_images(3, 128)
    batch = extract_crops_batch(tiny_backbone, images, SMALL_BETAS, "fg_bg", 0.5, 0.8, 64, 50, None)
    for i, rec in enumerate(batch):
        single = extract_crops_batch(tiny_backbone, images[i : i + 1], SMALL_BETAS, "fg_bg", 0.5, 0.8, 64, 7, None)[0]
        assert rec.crop_index.tolist() == single.crop_index.tolist()
        assert rec.pool.tolist() == single.pool.tolist()
        assert np.abs(rec.cls - single.cls).max() < 1e-5
    with pytest.raises(ValueError):
        extract_crops_batch(tiny_backbone, images[:1, :, :100], COCO_BETAS, "fg_bg")  # not whole patches
