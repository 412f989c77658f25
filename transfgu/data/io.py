"""Image and label decoding (PIL) and resizing.

:func:`load_rgb` always returns ``uint8 (H, W, 3)`` RGB in display orientation:

- EXIF orientation is applied (``ImageOps.exif_transpose``) unless ``exif_transpose=False``;
- grayscale (``1``, ``L``), palette (``P``), ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` -> RGB by PIL's conversion;
- images with alpha (``RGBA``, ``LA``, ``PA``, palette with transparency) are **composited on black**
  (``rgb * alpha / 255``): transparent pixels often hold arbitrary colours, black is a deterministic fill;
- 16-bit grayscale (``I;16*``, ``I``) is rescaled ``0..65535 -> 0..255`` (``/ 257``, rounded), never clipped;
  float (``F``) images are taken as ``0..1`` when their maximum is at most 1, else clipped to ``0..255``;
- multi-frame files (GIF, TIFF) give their first frame.

Images larger than :data:`MAX_IMAGE_PIXELS` (``data.max_image_pixels``, 64 MP by default) are refused from the
header, before any pixel is decoded: a 492 KB PNG can declare 13000 x 13000 pixels and take 8 GB to decode, and
PIL's own decompression-bomb error only starts at 179 MP.

Zero-byte, truncated and non-image files raise :class:`DecodeError` (a ``ValueError``) naming the file;
PIL's ``LOAD_TRUNCATED_IMAGES`` is left off, so a truncated file is an error rather than a grey-filled image.

:func:`load_label` returns ``int64 (H, W)`` class-index maps: palette PNGs give their indices (not the
colours), 16-bit PNGs their values; files with more than one channel are rejected.

Nearest-neighbour resizing samples pixel centres (``src = floor((dst + 0.5) * in / out)``, i.e. torch's
``nearest-exact`` and PIL's ``NEAREST``), not torch's legacy ``nearest`` which shifts by half a pixel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DecodeError", "ImageTooLarge", "decode_rgb", "load_rgb", "load_label", "resize_image", "resize_label",
    "nearest_indices", "set_max_image_pixels",
]

#: Largest image (width x height) :func:`load_rgb` decodes; set from ``data.max_image_pixels`` by
#: :func:`set_max_image_pixels`.
MAX_IMAGE_PIXELS = 64_000_000


def set_max_image_pixels(n: int) -> None:
    """Set the pixel limit of this process (each Ray worker sets it from the run's config)."""
    global MAX_IMAGE_PIXELS
    if int(n) < 1:
        raise ValueError(f"max image pixels must be >= 1, got {n}")
    MAX_IMAGE_PIXELS = int(n)


class DecodeError(ValueError):
    """An image or label file could not be decoded."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot decode {self.path}: {reason}")


class ImageTooLarge(DecodeError):
    """An image whose header announces more pixels than the caller allows (checked before decoding)."""


_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    UnidentifiedImageError,
    Image.DecompressionBombError,
    EOFError,
)


def _open_loaded(path: str | Path) -> Image.Image:
    """Open and fully decode ``path``; every failure becomes a :class:`DecodeError`."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file not found: {path}")
    if path.is_dir():
        raise DecodeError(path, "is a directory")
    if os.path.getsize(path) == 0:
        raise DecodeError(path, "file is empty (0 bytes)")
    try:
        img = Image.open(path)  # reads the header only
        w, h = img.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ImageTooLarge(path, f"image of {w} x {h} = {w * h:,} pixels is larger than data.max_image_pixels="
                                    f"{MAX_IMAGE_PIXELS:,}; refused before decoding (raise the limit to read it)")
        img.load()  # decode now: truncation is only detected when pixels are read
    except DecodeError:
        raise
    except _DECODE_ERRORS as exc:
        reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DecodeError(path, reason or type(exc).__name__) from exc
    return img


def _to_rgb(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8)
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255  # composite on black, rounded
        return rgb.astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.int64)
        gray = ((np.clip(arr, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.rint(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def _rgb_array(rgb: np.ndarray, name: str | Path) -> np.ndarray:
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DecodeError(name, f"decoded to shape {rgb.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(rgb)


def load_rgb(path: str | Path, *, exif_transpose: bool = True) -> np.ndarray:
    """Decode an image file to ``uint8 (H, W, 3)`` RGB (see the module docstring for the conversions)."""
    img = _open_loaded(path)
    try:
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        rgb = _to_rgb(img)
    except _DECODE_ERRORS as exc:
        raise DecodeError(path, str(exc) or type(exc).__name__) from exc
    return _rgb_array(rgb, path)


def _decode_bytes(data: bytes, name: str, max_pixels: int | None,
                  load: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """The one decode path of encoded bytes: refuse empty input, refuse more than ``max_pixels`` from the header's
    size before any pixel is decoded, ``load`` the image (decode, rotate, maybe reduce), convert it to RGB; any
    decoder error becomes a :class:`DecodeError` naming ``name``."""
    import io

    if not data:
        raise DecodeError(name, "empty input (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(name, f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
        rgb = _to_rgb(load(img))
    except ImageTooLarge:
        raise
    except _DECODE_ERRORS as exc:
        reason = "not a recognised image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise DecodeError(name, reason or type(exc).__name__) from exc
    return _rgb_array(rgb, name)


def decode_rgb(data: bytes, *, max_pixels: int | None = None, exif_transpose: bool = True,
               name: str = "<bytes>") -> np.ndarray:
    """:func:`load_rgb` for encoded bytes held in memory (an HTTP body, an object-store read).

    ``max_pixels`` is checked against the size in the file's header, before any pixel is decoded, so a small
    file that would inflate to a huge image (a "decompression bomb") is refused cheaply with :class:`ImageTooLarge`.
    """

    def load(img: Image.Image) -> Image.Image:
        img.load()
        return ImageOps.exif_transpose(img) if exif_transpose else img

    return _decode_bytes(data, name, max_pixels, load)


def decode_rgb_bounded(data: bytes, *, max_pixels: int, work_pixels: int, min_size: tuple[int, int],
                       name: str = "<bytes>") -> tuple[np.ndarray, tuple[int, int]]:
    """:func:`decode_rgb` for a server: images over ``work_pixels`` are decoded straight to a smaller size, never
    held whole as RGB arrays. Returns the (possibly reduced) uint8 RGB image and the original ``(H, W)`` (after the
    EXIF rotation), the size the labels are wanted at.

    The reduction is by an integer factor ``f`` that keeps both sides at least ``min_size`` (the model's input
    size, which the model resizes to anyway): JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself
    (``Image.draft``, no full-size buffer at all); other formats are decoded, then box-reduced (``Image.reduce``)
    before any array is made. Images of at most ``work_pixels`` are decoded exactly as :func:`decode_rgb` does.
    """
    out_hw = [0, 0]

    def load(img: Image.Image) -> Image.Image:
        w, h = img.size
        orientation = int(img.getexif().get(0x0112, 1) or 1)
        out_hw[:] = (w, h) if orientation in (5, 6, 7, 8) else (h, w)  # rotated by 90 degrees: sides swap
        f = 1
        if w * h > work_pixels:
            mh, mw = (min_size[1], min_size[0]) if orientation in (5, 6, 7, 8) else (min_size[0], min_size[1])
            f = max(1, min(h // max(1, mh), w // max(1, mw)))
        if f > 1 and img.format == "JPEG":
            img.draft("RGB", (max(1, w // f), max(1, h // f)))  # DCT scaling: 1/2, 1/4 or 1/8, at least this size
            f = max(1, min(img.size[1] // max(1, (h // f)), img.size[0] // max(1, (w // f))))
        img.load()
        if f > 1:
            img = img.reduce(f)
        return ImageOps.exif_transpose(img)

    rgb = _decode_bytes(data, name, max_pixels, load)
    return rgb, (int(out_hw[0]), int(out_hw[1]))


def exif_orientation(path: str | Path) -> int:
    """The EXIF orientation tag of an image file (1 = as stored)."""
    with Image.open(path) as img:
        return int(img.getexif().get(0x0112, 1) or 1)


def load_label(path: str | Path) -> np.ndarray:
    """Decode a single-channel label file to ``int64 (H, W)`` raw ids.

    Palette PNGs give their palette indices (Pascal VOC), ``L``/``I;16``/``I`` their values, ``1`` gives 0/1.
    Multi-channel files (RGB colour-coded labels, alpha) raise :class:`DecodeError`: convert them to
    index maps first, the colour -> class table is data-set specific.
    """
    img = _open_loaded(path)
    if img.mode not in ("L", "P", "1", "I", "I;16", "I;16B", "I;16L"):
        bands = len(img.getbands())
        raise DecodeError(
            path,
            f"label file has {bands} channel(s) (PIL mode {img.mode}); expected a single-channel "
            "class-index image (mode L, P or 16-bit)",
        )
    return np.asarray(img).astype(np.int64)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output pixel for nearest-neighbour resizing (pixel-centre sampling)."""
    if n_in <= 0 or n_out <= 0:
        raise ValueError(f"sizes must be positive, got {n_in} -> {n_out}")
    idx = np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"target size must be positive (h, w), got {size}")
    return h, w


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``(H, W)`` label map to ``size = (h, w)``; dtype is kept."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label must be (H, W), got shape {label.shape}")
    h, w = _check_size(size)
    if label.shape == (h, w):
        return label
    return label[nearest_indices(label.shape[0], h)[:, None], nearest_indices(label.shape[1], w)[None, :]]


def resize_image(img: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> np.ndarray:
    """Resize a ``uint8 (H, W, C)`` or ``(H, W)`` image to ``size = (h, w)``.

    ``bilinear`` uses torch's anti-aliased bilinear interpolation (``align_corners=False``; anti-aliasing
    matters when shrinking), rounded back to uint8. ``nearest`` samples pixel centres.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be (H, W) or (H, W, C), got shape {img.shape}")
    h, w = _check_size(size)
    if img.shape[:2] == (h, w):
        return img
    if mode == "nearest":
        return img[nearest_indices(img.shape[0], h)[:, None], nearest_indices(img.shape[1], w)[None, :]]
    if mode != "bilinear":
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    x = torch.from_numpy(np.ascontiguousarray(img)).to(torch.float32)
    x = x[None, None] if img.ndim == 2 else x.permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    y = y[0, 0] if img.ndim == 2 else y[0].permute(1, 2, 0)
    if img.dtype == np.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8).numpy()
    return y.numpy().astype(img.dtype, copy=False)
