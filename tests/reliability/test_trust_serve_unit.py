"""Serve's memory bounds, the parts that need no Ray: decoding straight to a reduced size, label maps computed in
row bands in the label PNG's dtype, the banded histogram and the pixel budget of an ``Api`` replica."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from transfgu.data.io import ImageTooLarge, decode_rgb, decode_rgb_bounded
from transfgu.predict import label_image, upsampled_argmax


def _encode(arr: np.ndarray, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _image(h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 255 // w), (y * 255 // h), ((x + y) % 256)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_large_images_are_decoded_reduced_small_ones_exactly(fmt):
    big = _encode(_image(1800, 2400), fmt)
    rgb, size = decode_rgb_bounded(big, max_pixels=10**8, work_pixels=10**6, min_size=(64, 80))
    assert size == (1800, 2400)
    f = min(1800 // 64, 2400 // 80)  # 28: the largest factor that keeps the model's input size
    assert rgb.shape[0] >= 64 and rgb.shape[1] >= 80 and rgb.shape[0] <= 1800 // (f // 2)
    small = _encode(_image(300, 400), fmt)
    rgb, size = decode_rgb_bounded(small, max_pixels=10**8, work_pixels=10**6, min_size=(64, 80))
    np.testing.assert_array_equal(rgb, decode_rgb(small))
    assert size == (300, 400)
    with pytest.raises(ImageTooLarge):
        decode_rgb_bounded(big, max_pixels=10**6, work_pixels=10**5, min_size=(64, 80))


def test_reduced_decode_keeps_the_exif_rotation():
    img = Image.fromarray(_image(1000, 3000))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    rgb, size = decode_rgb_bounded(buf.getvalue(), max_pixels=10**8, work_pixels=10**5, min_size=(64, 80))
    assert size == (3000, 1000)
    assert rgb.shape[0] > rgb.shape[1]


@pytest.mark.parametrize("c, h, w, size", [(5, 8, 10, (600, 700)), (27, 5, 7, (37, 53)), (3, 40, 30, (479, 641))])
def test_banded_label_image_equals_the_full_interpolation(c, h, w, size):
    g = torch.Generator().manual_seed(c)
    logits = torch.randn(c, h, w, generator=g)
    want = torch.nn.functional.interpolate(logits[None], size=size, mode="bilinear",
                                           align_corners=False)[0].argmax(0).numpy()
    lut = np.arange(c).astype(np.uint8)
    for budget in (10**9, 5000, c * size[1]):  # one piece, bands of a few rows, one row per band
        got = label_image(logits, size, lut, max_elements=budget)
        assert got.dtype == np.uint8 and got.shape == size
        assert (got != want).mean() < 1e-4  # only float-rounding near-ties may differ
    np.testing.assert_array_equal(label_image(logits, size, lut, max_elements=10**9),
                                  upsampled_argmax(logits, size).numpy())  # the small path is predict's


def test_label_image_maps_unmatched_clusters_to_the_top_value():
    logits = torch.zeros(3, 2, 2)
    logits[1] = 1
    lut = np.array([0, 255, 1], dtype=np.uint8)  # cluster 1 unmatched
    assert (label_image(logits, (4, 4), lut) == 255).all()


def test_banded_histogram_equals_bincount():
    from transfgu.distributed.serve import _histogram

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 6, size=(700, 333)).astype(np.uint8)
    lab[rng.random(lab.shape) < 0.1] = 255
    counts, unmatched = _histogram(lab, 6, rows=17)
    np.testing.assert_array_equal(counts, np.bincount(lab[lab != 255].ravel(), minlength=6))
    assert unmatched == int((lab == 255).sum())
    lab[0, 0] = 9
    with pytest.raises(ValueError, match="beyond the 6 ids"):
        _histogram(lab, 6)


def test_pixel_budget_holds_large_requests_in_turn():
    from transfgu.distributed.serve import PixelBudget

    async def run() -> int:
        budget = PixelBudget(10)
        peak = 0

        async def one(n: int) -> None:
            nonlocal peak
            held = await budget.acquire(n)
            peak = max(peak, budget.used)
            await asyncio.sleep(0.01)
            await budget.release(held)

        await asyncio.gather(*(one(n) for n in (6, 6, 25, 3, 4)))
        assert budget.used == 0
        return peak

    assert asyncio.run(run()) <= 10
