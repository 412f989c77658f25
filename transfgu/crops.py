"""Stage 1: sliding-window crops, the foreground prior and crop CLS features (paper §3.1, eq. 1-2).

Everything here follows the authors' code (docs/fidelity.md rows 3-4):

* :func:`window_layout` enumerates the square multi-scale windows of the reference on the ViT patch grid;
* :func:`foreground_prior` binarises the head-mean last-block CLS attention at its mean;
* :func:`select_windows` sorts windows into the fg / bg / all pools by their foreground fraction;
* :func:`crop_and_resize` cuts and resizes the crops in one batched call (the reference slices and calls
  ``F.interpolate`` once per crop);
* :func:`embed_crops` embeds crops in batches (the reference embeds COCO/VOC crops one at a time);
* :func:`extract_crops_batch` chains them into the per-image stage function (one image: a batch of one).

Conventions
-----------
Patch boxes are ``(y0, x0, y1, x1)`` with inclusive ends. Pixel boxes are ``(x0, y0,
x1, y1)`` with an *exclusive* end, i.e. the crop is ``image[:, y0:y1, x0:x1]``. With the reference's
convention (``trim_last_pixel=True``) a window of ``b + 1`` patches gives a crop of ``(b + 1) * p - 1`` pixels
(327/263/199/135 px at 640 px, patch 8): the reference takes the min/max of the upsampled window mask and then
slices with the max as an exclusive bound, losing one pixel row and column. ``trim_last_pixel=False`` gives
the full ``(b + 1) * p`` window.

Odd window sides: the reference states the stride as ``b/2``; for odd ``b`` that is not a whole number of
patches. Here the half-side is ``b // 2`` everywhere (stride and window radius), so a window is always ``2 *
(b // 2) + 1`` patches wide; for even ``b`` (all the published settings) this is exactly the reference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = [
    "DROPPED",
    "CropRecords",
    "WindowLayout",
    "crop_and_resize",
    "embed_crops",
    "extract_crops_batch",
    "foreground_prior",
    "select_windows",
    "window_layout",
]

SelectMode = Literal["fg_bg", "fg", "all"]

#: Pool label of a window that is not kept.
DROPPED = ""


# ----------------------------------------------------------------------------------------------------------
# Window layout (the reference implementation's sliding windows)
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowLayout:
    """Square sliding windows on a ``grid_h x grid_w`` patch grid, all scales (scale-major, row-major)."""

    grid: tuple[int, int]
    betas: tuple[float, ...]
    sides: tuple[int, ...]  # window side b per scale, in patches (the window spans 2 * (b // 2) + 1 patches)
    boxes_patch: np.ndarray  # (n, 4) int64, (y0, x0, y1, x1) inclusive patch coordinates
    scale_index: np.ndarray  # (n,) int64, index into ``betas``
    beta: np.ndarray  # (n,) float32, the window's scale

    def __len__(self) -> int:
        return int(self.boxes_patch.shape[0])

    def boxes_pixel(self, patch_size: int, trim_last_pixel: bool = True) -> np.ndarray:
        """``(n, 4)`` int32 pixel boxes ``(x0, y0, x1, y1)``, exclusive ends (see the module docstring)."""
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1, got {patch_size}")
        y0, x0, y1, x1 = (self.boxes_patch[:, i] for i in range(4))
        trim = 1 if trim_last_pixel else 0
        out = np.stack(
            [x0 * patch_size, y0 * patch_size, (x1 + 1) * patch_size - trim, (y1 + 1) * patch_size - trim],
            axis=1,
        )
        return out.astype(np.int32)

    def window_masks(self) -> np.ndarray:
        """``(n, h, w)`` bool patch masks of every window (for tests and visualisation; O(n*h*w))."""
        h, w = self.grid
        m = np.zeros((len(self), h, w), dtype=bool)
        for i, (y0, x0, y1, x1) in enumerate(self.boxes_patch):
            m[i, y0 : y1 + 1, x0 : x1 + 1] = True
        return m


def _axis_centres(length: int, half: int) -> list[int]:
    """Centres along one axis: the multiples of ``half`` that fit, plus the one flush with the far border."""
    last = length - 1 - half  # largest centre whose window still lies inside the grid
    centres = list(range(half, last + 1, half))
    if not centres or centres[-1] != last:
        centres.append(last)
    return centres


def window_layout(grid_h: int, grid_w: int, betas: Sequence[float]) -> WindowLayout:
    """Enumerate the reference's sliding windows (the authors' ``generate_box_anchors_by_scale``).

    For each scale ``beta`` the side is ``b = int(min(h * beta, w * beta))`` patches (square even on
    non-square grids) and the stride is ``b / 2``. A centre ``(y, x)`` is kept when its window lies inside the
    grid and both coordinates are multiples of ``b / 2``, or one of them is a multiple and the other is
    snapped flush to the bottom/right border, or it is the bottom-right corner window. That set is the product
    of the per-axis centre sets (multiples of ``b/2`` plus the border-snapped centre), which is what is built
    here. A window covers every patch within ``b / 2`` of its centre, i.e. ``b + 1`` patches per side.

    On an 80x80 grid, betas (0.5, 0.4, 0.3, 0.2) give 9 + 16 + 36 + 81 = 142 windows; on 80x160 they give 306.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be positive, got {grid_h}x{grid_w}")
    if len(betas) == 0:
        raise ValueError("betas must name at least one scale")
    boxes: list[tuple[int, int, int, int]] = []
    scale_index: list[int] = []
    sides: list[int] = []
    for s, beta in enumerate(betas):
        beta = float(beta)
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"window scale beta must lie in (0, 1], got {beta}")
        # Same float expression as the reference so that int() truncates identically (e.g. 80 * 0.3).
        b = int(min(grid_h * beta, grid_w * beta))
        half = b // 2
        if half < 1:
            raise ValueError(
                f"beta={beta} on a {grid_h}x{grid_w} patch grid gives a window side of b={b} patch(es); "
                "a window needs b >= 2 (stride b/2 >= 1 patch). Use a larger beta or a larger input."
            )
        if 2 * half + 1 > min(grid_h, grid_w):
            raise ValueError(
                f"beta={beta} on a {grid_h}x{grid_w} patch grid gives windows of {2 * half + 1} patches, "
                "larger than the grid: no window fits. Use a smaller beta."
            )
        sides.append(b)
        for y in _axis_centres(grid_h, half):
            for x in _axis_centres(grid_w, half):
                boxes.append((y - half, x - half, y + half, x + half))
                scale_index.append(s)
    si = np.asarray(scale_index, dtype=np.int64)
    return WindowLayout(
        grid=(int(grid_h), int(grid_w)),
        betas=tuple(float(b) for b in betas),
        sides=tuple(sides),
        boxes_patch=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        scale_index=si,
        beta=np.asarray(betas, dtype=np.float32)[si],
    )


# ----------------------------------------------------------------------------------------------------------
# Foreground prior and window selection (as the reference implementation)
# ----------------------------------------------------------------------------------------------------------
def foreground_prior(attn_cls: Tensor, grid: tuple[int, int]) -> Tensor:
    """Binary foreground prior from the last block's CLS attention (as the authors' code computes it).

    Args:
        attn_cls: ``(B, heads, h*w)`` (or unbatched ``(heads, h*w)``) softmax attention of the CLS query over
        the
            patch keys, as :class:`~transfgu.models.backbone.ViTFeatures` gives it.
        grid: the patch grid ``(h, w)``.

    Returns:
        bool ``(B, h, w)`` (or ``(h, w)``): the head-mean attention is above its mean over the image's
        patches.
    """
    unbatched = attn_cls.dim() == 2
    a = attn_cls[None] if unbatched else attn_cls
    if a.dim() != 3:
        raise ValueError(f"attn_cls must be (B, heads, h*w) or (heads, h*w), got {tuple(attn_cls.shape)}")
    h, w = grid
    if a.shape[-1] != h * w:
        raise ValueError(f"attn_cls has {a.shape[-1]} patch keys, grid {h}x{w} needs {h * w}")
    m = a.float().mean(dim=1)  # (B, N) head mean
    fg = (m > m.mean(dim=-1, keepdim=True)).view(-1, h, w)
    return fg[0] if unbatched else fg


def select_windows(
    fg_mask_patch: Tensor | np.ndarray,
    layout: WindowLayout,
    mode: SelectMode,
    th_fg: float = 0.5,
    th_bg: float = 0.8,
) -> np.ndarray:
    """Pool label of every window of ``layout``: ``"fg"``, ``"bg"``, ``"all"`` or :data:`DROPPED` (``""``).

    As the authors' code: ``"fg_bg"`` (COCO) keeps a window as fg when its fg fraction is ``> th_fg`` and
    as bg when its bg fraction is ``> th_bg`` (fg wins if overlapping thresholds allow both); ``"fg"`` (VOC)
    keeps fg windows only; ``"all"`` (Cityscapes, LIP) keeps every window with no prior. The fractions are
    taken over the window's patches, which equals the reference's pixel fractions after nearest x``p``
    upsampling of the mask (every patch contributes ``p*p`` pixels to both counts).
    """
    n = len(layout)
    if mode == "all":
        return np.full(n, "all", dtype="<U3")
    if mode not in ("fg_bg", "fg"):
        raise ValueError(f"mode must be 'fg_bg', 'fg' or 'all', got {mode!r}")
    fg = (
        fg_mask_patch.detach().cpu().numpy()
        if isinstance(fg_mask_patch, Tensor)
        else np.asarray(fg_mask_patch)
    )
    if fg.shape != layout.grid:
        raise ValueError(f"foreground mask has shape {fg.shape}, the layout's grid is {layout.grid}")
    # Summed-area table: fg count of every window in O(1).
    sat = np.zeros((fg.shape[0] + 1, fg.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = fg.astype(np.int64).cumsum(0).cumsum(1)
    y0, x0, y1, x1 = (layout.boxes_patch[:, i] for i in range(4))
    count = sat[y1 + 1, x1 + 1] - sat[y0, x1 + 1] - sat[y1 + 1, x0] + sat[y0, x0]
    total = (y1 - y0 + 1) * (x1 - x0 + 1)
    fg_frac = count / total
    bg_frac = (total - count) / total
    out = np.full(n, DROPPED, dtype="<U3")
    if mode == "fg_bg":
        out[bg_frac > th_bg] = "bg"
    out[fg_frac > th_fg] = "fg"
    return out


# ----------------------------------------------------------------------------------------------------------
# Crop, resize and embed (as the reference implementation)
# ----------------------------------------------------------------------------------------------------------
def _as_box_tensor(boxes: Tensor | np.ndarray) -> Tensor:
    # Boxes are checked on the host (a check of a device tensor in an ``if`` would synchronise the GPU).
    b = boxes.detach().cpu() if isinstance(boxes, Tensor) else torch.as_tensor(np.asarray(boxes))
    return b.reshape(-1, 4).to(torch.float64)


def _sample_grid(boxes: Tensor, out_size: int, height: int, width: int) -> Tensor:
    """``grid_sample`` grid ``(1, n*out, out, 2)`` reproducing ``F.interpolate`` of every box slice.

    ``F.interpolate(bilinear, align_corners=False)`` of a slice of ``S`` pixels samples at ``src = (i + 0.5) *
    S / out - 0.5``, clamped to ``[0, S - 1]`` (its edge handling), i.e. it never reads pixels outside the
    slice. Sampling the full image at ``x0 + clamp(src)`` is therefore the same bilinear value.
    """
    i = torch.arange(out_size, dtype=torch.float64, device=boxes.device) + 0.5
    x0, y0, x1, y1 = boxes.unbind(1)
    sx, sy = (x1 - x0)[:, None], (y1 - y0)[:, None]
    px = x0[:, None] + torch.minimum((i * sx / out_size - 0.5).clamp_min(0.0), sx - 1)  # (n, out)
    py = y0[:, None] + torch.minimum((i * sy / out_size - 0.5).clamp_min(0.0), sy - 1)
    gx = (2.0 * px + 1.0) / width - 1.0  # align_corners=False normalisation
    gy = (2.0 * py + 1.0) / height - 1.0
    n = boxes.shape[0]
    grid = torch.stack(
        torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1
    )  # (n, out_y, out_x, 2)
    return grid.reshape(1, n * out_size, out_size, 2)


def crop_and_resize(
    images: Tensor,
    boxes_pixel: Sequence[Tensor | np.ndarray],
    out_size: int,
    method: Literal["interpolate", "roi_align"] = "interpolate",
) -> Tensor:
    """Cut ``images[b, :, y0:y1, x0:x1]`` for every box and resize it bilinearly to ``out_size x out_size``.

    Args:
        images: ``(B, 3, H, W)`` float images (normalised or not).
        boxes_pixel: one ``(n_b, 4)`` array of ``(x0, y0, x1, y1)`` boxes (exclusive ends) per image.
        out_size: output side in pixels (the reference uses half the stage input, 320).
        method: ``"interpolate"`` (default) equals ``F.interpolate(slice, bilinear, align_corners=False,
            antialias=False)`` per crop up to float rounding (~1e-6), computed for all crops of an image in
            one ``grid_sample`` call. ``"roi_align"`` uses ``torchvision.ops.roi_align(aligned=True,
            sampling_ratio=1)``: identical for crops that are downsampled (side >= out_size) or touch the
            image border, but when a crop is *upsampled* roi_align's first/last output row/column reads the
            real neighbour pixel outside the slice where ``F.interpolate`` clamps to the slice edge (a
            replicate border), so the two differ there.

    Returns:
        ``(sum n_b, 3, out_size, out_size)`` crops, image-major, in box order.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    if len(boxes_pixel) != images.shape[0]:
        raise ValueError(f"got {len(boxes_pixel)} box arrays for {images.shape[0]} images")
    c, hh, ww = images.shape[1:]
    boxes = [_as_box_tensor(b) for b in boxes_pixel]
    for b in boxes:
        if b.numel() and (
            (b[:, 2] <= b[:, 0]).any()
            or (b[:, 3] <= b[:, 1]).any()
            or (b < 0).any()
            or (b[:, 2] > ww).any()
            or (b[:, 3] > hh).any()
        ):
            raise ValueError(f"boxes must satisfy 0 <= x0 < x1 <= {ww} and 0 <= y0 < y1 <= {hh}")
    n_total = sum(b.shape[0] for b in boxes)
    if n_total == 0:
        return images.new_empty((0, c, out_size, out_size))
    if images.device.type != "cpu":
        boxes = [b.to(images.device, non_blocking=True) for b in boxes]
    if method == "roi_align":
        rois = torch.cat(
            [torch.cat([b.new_full((b.shape[0], 1), i), b], dim=1) for i, b in enumerate(boxes)], dim=0
        ).to(images.dtype)
        # aligned=True shifts by -0.5 px so that bin centres land on F.interpolate's sample positions.
        return roi_align(
            images, rois, output_size=out_size, spatial_scale=1.0, sampling_ratio=1, aligned=True
        )
    if method != "interpolate":
        raise ValueError(f"method must be 'interpolate' or 'roi_align', got {method!r}")
    out = []
    for i, b in enumerate(boxes):
        if b.shape[0] == 0:
            continue
        grid = _sample_grid(b, out_size, hh, ww).to(images.dtype)
        r = F.grid_sample(
            images[i : i + 1], grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        out.append(r.view(c, b.shape[0], out_size, out_size).transpose(0, 1))
    return torch.cat(out, dim=0).contiguous()


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def embed_crops(
    backbone: torch.nn.Module,
    crops: Tensor,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
) -> Tensor:
    """Final-LayerNorm CLS token of every crop, ``(n, D)`` float32 (the reference's crop features), in batches.

    The reference embeds COCO/VOC crops one at a time; batching gives the same features (the ViT is per-sample
    in eval mode). ``autocast_dtype`` (e.g. ``torch.bfloat16`` on GPU) runs the backbone under autocast.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dim = int(getattr(backbone, "embed_dim", 0))
    # A compiled backbone (transfgu.throughput.compile.compile_forward) is specialised per input shape: pad a short last
    # chunk to the full batch (zeros, outputs dropped) instead of compiling one more graph per ragged tail.
    pad = bool(getattr(backbone, "_transfgu_compiled", False))
    feats = []
    with torch.inference_mode(), _autocast(crops.device, autocast_dtype):
        for start in range(0, crops.shape[0], batch_size):
            x = crops[start : start + batch_size]
            n = x.shape[0]
            if pad and n < batch_size:
                x = torch.cat([x, x.new_zeros((batch_size - n, *x.shape[1:]))])
            feats.append(backbone(x).cls[:n].float())
    if not feats:
        return torch.empty((0, dim), dtype=torch.float32, device=crops.device)
    return torch.cat(feats, dim=0)


# ----------------------------------------------------------------------------------------------------------
# The stage function
# ----------------------------------------------------------------------------------------------------------
@dataclass
class CropRecords:
    """The kept crops of one image (one row each in ``features/*.parquet``, see ``transfgu.store``)."""

    crop_index: np.ndarray  # (n,) int32: index of the window in the image's WindowLayout
    scale: np.ndarray  # (n,) float32: the window's beta
    box: np.ndarray  # (n, 4) int32: pixel box (x0, y0, x1, y1) in the stage-size image, exclusive end
    pool: np.ndarray  # (n,) str: "fg" | "bg" | "all"
    cls: np.ndarray  # (n, D) float32: final-LayerNorm CLS token of the resized crop

    def __len__(self) -> int:
        return int(self.crop_index.shape[0])


def _chunks(items: list[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def extract_crops_batch(
    backbone: torch.nn.Module,
    images: Tensor,
    betas: Sequence[float] = (0.5, 0.4, 0.3, 0.2),
    mode: SelectMode = "fg_bg",
    th_fg: float = 0.5,
    th_bg: float = 0.8,
    crop_size: int | None = None,
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    trim_last_pixel: bool = True,
) -> list[CropRecords]:
    """Crops + CLS features of several equal-size images (the reference's crop stage; docs/architecture.md, "Stages").

    Args:
        backbone: a frozen :class:`~transfgu.models.backbone.DinoViT` (or anything with the same outputs).
        images: ``(B, 3, H, W)`` ImageNet-normalised images already resized to the stage size (e.g. 640x640).
        betas: window scales (COCO 0.5-0.2; VOC 0.6-0.3). mode: ``"fg_bg"`` (COCO), ``"fg"`` (VOC) or
        ``"all"`` (Cityscapes, LIP; no prior pass is run). th_fg, th_bg: foreground / background fraction
        thresholds (0.5 / 0.8). crop_size: side of the resized crops; ``None`` = half the short side of the
        input (320 at 640). batch_size: crops per backbone call (also images per prior pass). autocast_dtype:
        autocast dtype for the backbone passes, ``None`` for full precision. trim_last_pixel: the reference's
        one-pixel-short crop (see module docstring); False gives full windows.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    bsz, _, hh, ww = images.shape
    p = int(backbone.patch_size)
    if hh % p or ww % p:
        raise ValueError(f"image size {hh}x{ww} is not a multiple of the patch size {p}")
    if crop_size is None:
        crop_size = min(hh, ww) // 2
    layout = window_layout(hh // p, ww // p, betas)
    boxes_px = layout.boxes_pixel(p, trim_last_pixel=trim_last_pixel)

    if mode == "all":
        pools = [select_windows(np.zeros(layout.grid, dtype=bool), layout, "all")] * bsz
    else:
        fgs = []
        with torch.inference_mode(), _autocast(images.device, autocast_dtype):
            for start in range(0, bsz, batch_size):
                out = backbone(images[start : start + batch_size])
                fgs.append(foreground_prior(out.attn_cls, out.grid))
        # One device -> host copy for all prior passes (not one synchronisation per batch).
        fg_all = torch.cat(fgs).cpu()
        pools = [select_windows(m, layout, mode, th_fg, th_bg) for m in fg_all]

    kept = [np.flatnonzero(pl != DROPPED) for pl in pools]
    # Global (image, window) list embedded in full batches across image boundaries.
    work = [(i, int(j)) for i in range(bsz) for j in kept[i]]
    dim = int(backbone.embed_dim)
    # Features stay on the device until every chunk is queued: the host never waits for the GPU between chunks
    # (cutting chunk i + 1 is queued while chunk i is embedded), and one copy brings all of them back.
    feats: list[Tensor] = []
    for chunk in _chunks(work, batch_size):
        per_image = [[j for (i, j) in chunk if i == b] for b in range(bsz)]
        crops = crop_and_resize(images, [boxes_px[idx].reshape(-1, 4) for idx in per_image], crop_size)
        feats.append(embed_crops(backbone, crops, batch_size, autocast_dtype))
    cls = (
        torch.cat(feats).cpu().numpy().astype(np.float32, copy=False)
        if feats
        else np.empty((0, dim), dtype=np.float32)
    )

    records = []
    offset = 0
    for b in range(bsz):
        idx = kept[b]
        records.append(
            CropRecords(
                crop_index=idx.astype(np.int32),
                scale=layout.beta[idx].astype(np.float32),
                box=boxes_px[idx].astype(np.int32).reshape(-1, 4),
                pool=pools[b][idx].astype(str),
                cls=cls[offset : offset + len(idx)],
            )
        )
        offset += len(idx)
    return records

