"""Training-batch augmentation of the TransFGU decoder (as the authors' code; docs/fidelity.md row 6).

:func:`augment_batch`: colour augmentation, per-sample random crop resized to half resolution, RoI-Align of the pseudo
labels with the same boxes, horizontal flip. Every random decision is drawn on the host from an explicit
``torch.Generator`` (:func:`draw_step`) and applied on the device (:func:`apply_augment`), so data-parallel ranks can
share one draw and take their slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.ops import roi_align

from transfgu.models.backbone import IMAGENET_MEAN, IMAGENET_STD

ColourMode = Literal["batch", "per_sample"]

#: Crop scales of the random crop (an integer draw over [4, 10) / 10 in the reference: 1.0 never occurs).
CROP_SCALES: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=generator))


def _bernoulli(generator: torch.Generator | None, p: float) -> bool:
    return p > 0 and bool(torch.rand((), generator=generator) < p)


@dataclass(frozen=True)
class ColourDraw:
    """The colour decisions for one image (or for a whole batch in the reference's ``"batch"`` mode)."""

    jitter: tuple[tuple[int, ...], tuple[float, float, float, float]] | None  # (op order, factors) or None
    gray: bool
    blur_sigma: float | None


def draw_colour(
    generator: torch.Generator | None,
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
    p_jitter: float = 0.3,
    p_gray: float = 0.2,
    p_blur: float = 0.2,
    blur_sigma: tuple[float, float] = (1.0, 2.0),
) -> ColourDraw:
    """Draw a colour decision (docs/fidelity.md row 6); the draws and their order are those of applying it directly."""
    jit = None
    if _bernoulli(generator, p_jitter):
        # torchvision ColorJitter semantics: factors in [max(0, 1-v), 1+v], hue in [-v, v], random op order.
        b, c, s, h = jitter
        order = tuple(torch.randperm(4, generator=generator).tolist())
        factors = (
            _uniform(generator, max(0.0, 1 - b), 1 + b),
            _uniform(generator, max(0.0, 1 - c), 1 + c),
            _uniform(generator, max(0.0, 1 - s), 1 + s),
            _uniform(generator, -h, h),
        )
        jit = (order, factors)
    gray = _bernoulli(generator, p_gray)
    sigma = _uniform(generator, *blur_sigma) if _bernoulli(generator, p_blur) else None
    return ColourDraw(jitter=jit, gray=gray, blur_sigma=sigma)


def apply_colour(x: Tensor, draw: ColourDraw) -> Tensor:
    """Apply one :class:`ColourDraw` to every image of ``x`` (float in [0, 1])."""
    if draw.jitter is not None:
        order, factors = draw.jitter
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in order:
            x = ops[i](x, factors[i])
    if draw.gray:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if draw.blur_sigma is not None:
        x = TF.gaussian_blur(x, kernel_size=[3, 3], sigma=[draw.blur_sigma, draw.blur_sigma])
    return x


def draw_colours(
    batch: int, generator: torch.Generator | None, mode: ColourMode = "batch", **kw: Any
) -> list[ColourDraw]:
    """One draw for the batch (``"batch"``, the reference) or one per image (``"per_sample"``)."""
    if mode == "batch":
        return [draw_colour(generator, **kw)]
    if mode == "per_sample":
        return [draw_colour(generator, **kw) for _ in range(batch)]
    raise ValueError(f"colour mode must be 'batch' or 'per_sample', got {mode!r}")


def apply_colours(x: Tensor, draws: Sequence[ColourDraw]) -> Tensor:
    """Apply :func:`draw_colours`' result: one draw to all of ``x``, or one per image."""
    if len(draws) == 1 and x.shape[0] != 1:
        return apply_colour(x, draws[0])
    if len(draws) != x.shape[0]:
        raise ValueError(f"{len(draws)} colour draws for {x.shape[0]} images")
    if len(draws) == 1:
        return apply_colour(x, draws[0])
    return torch.cat([apply_colour(x[i : i + 1], d) for i, d in enumerate(draws)], dim=0)


def colour_augment(
    x: Tensor,
    generator: torch.Generator | None,
    mode: ColourMode = "batch",
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2),
    p_jitter: float = 0.3,
    p_gray: float = 0.2,
    p_blur: float = 0.2,
    blur_sigma: tuple[float, float] = (1.0, 2.0),
) -> Tensor:
    """ColorJitter(0.8, 0.8, 0.8, 0.2) w.p. 0.3, grayscale w.p. 0.2, 3x3 blur sigma in [1, 2] w.p. 0.2.

    ``mode="batch"`` reproduces the reference (one decision and one parameter set for the whole batch);
    ``mode="per_sample"`` draws them per image (the fix). ``x``: float ``(B, 3, H, W)`` in [0, 1]. The ops are
    torchvision.transforms.v2 functionals; parameters are drawn from ``generator`` rather than the global RNG.
    """
    kw = dict(jitter=jitter, p_jitter=p_jitter, p_gray=p_gray, p_blur=p_blur, blur_sigma=blur_sigma)
    return apply_colours(x, draw_colours(x.shape[0], generator, mode, **kw))


def sample_crop_boxes(
    batch: int, image_hw: tuple[int, int], scales: Sequence[float], generator: torch.Generator | None
) -> Tensor:
    """Per-sample crop boxes ``(B, 4)`` = (x0, y0, x1, y1) in pixels, half-open, same aspect as the image."""
    hh, ww = image_hw
    idx = torch.randint(len(scales), (batch,), generator=generator)
    boxes = torch.empty(batch, 4, dtype=torch.float64)
    for i in range(batch):
        s = scales[int(idx[i])]
        ch, cw = max(1, round(s * hh)), max(1, round(s * ww))
        y0 = int(torch.randint(hh - ch + 1, (), generator=generator))
        x0 = int(torch.randint(ww - cw + 1, (), generator=generator))
        boxes[i] = torch.tensor([x0, y0, x0 + cw, y0 + ch], dtype=torch.float64)
    return boxes


def crop_images(images: Tensor, boxes: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """Bilinear resample (align_corners False) of each box of ``images`` to ``out_hw`` (one ``grid_sample``).

    Equal to cropping the box and resizing it with ``F.interpolate(bilinear, align_corners=False)``, except
    that samples within half a pixel of the box edge read the neighbouring image pixels instead of replicating
    the edge.
    """
    b, _, hh, ww = images.shape
    oh, ow = out_hw
    boxes = boxes.to(torch.float32).to(images.device, non_blocking=True)
    x0, y0, x1, y1 = boxes.unbind(1)
    t_x = (torch.arange(ow, device=images.device, dtype=torch.float32) + 0.5) / ow
    t_y = (torch.arange(oh, device=images.device, dtype=torch.float32) + 0.5) / oh
    # continuous pixel coordinates of the output sample centres -> grid_sample's [-1, 1] (align_corners False)
    gx = (x0[:, None] + t_x[None] * (x1 - x0)[:, None]) * (2.0 / ww) - 1.0  # (B, ow)
    gy = (y0[:, None] + t_y[None] * (y1 - y0)[:, None]) * (2.0 / hh) - 1.0  # (B, oh)
    grid = torch.stack([gx[:, None, :].expand(b, oh, ow), gy[:, :, None].expand(b, oh, ow)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def crop_labels(pseudo: Tensor, boxes: Tensor, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> Tensor:
    """RoI-Align the pseudo-label maps over the image-pixel ``boxes`` (as the reference, with mmcv's ``roi_align``).

    Boxes are scaled per axis into label-grid units (label_h / H, label_w / W; the reference's single
    ``spatial_scale`` is the same number for its grids), then ``torchvision.ops.roi_align`` with
    ``aligned=True`` (pixel centres at +0.5, the convention of :func:`crop_images`), adaptive sampling ratio
    and average pooling.
    """
    rois = label_rois(boxes, pseudo.shape, image_hw).to(pseudo.dtype).to(pseudo.device, non_blocking=True)
    return align_labels(pseudo, rois, out_hw)


def label_rois(boxes: Tensor, label_shape: Sequence[int], image_hw: tuple[int, int]) -> Tensor:
    """``(B, 5)`` float64 RoIs (batch index, box in label-grid units) of :func:`crop_labels`, made on the host."""
    b, lh, lw = int(label_shape[0]), int(label_shape[-2]), int(label_shape[-1])
    hh, ww = image_hw
    scale = torch.tensor([lw / ww, lh / hh, lw / ww, lh / hh], dtype=torch.float64)
    return torch.cat([torch.arange(b, dtype=torch.float64)[:, None], boxes.to(torch.float64) * scale], dim=1)


def align_labels(pseudo: Tensor, rois: Tensor, out_hw: tuple[int, int]) -> Tensor:
    """The device half of :func:`crop_labels`: ``roi_align`` of ``pseudo`` over ``rois`` (already on its device)."""
    return roi_align(pseudo, rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


@dataclass(frozen=True)
class StepDraws:
    """Every random decision of one training step for a (global) batch of ``B`` images (with eq. 13's permutation).

    Drawn in the order colour, crop boxes, flips, class permutation. Data-parallel ranks draw the same
    ``StepDraws`` for the global batch and each uses :meth:`piece` for its own images.
    """

    colours: list[ColourDraw]  # one ("batch" mode) or B ("per_sample")
    boxes: Tensor  # (B, 4) float64 crop boxes (x0, y0, x1, y1) in pixels
    flip: Tensor  # (B,) bool
    perm: Tensor | None  # (C,) class permutation for the negative labels, or None when not drawn

    def piece(self, offset: int, count: int) -> StepDraws:
        """The draws of images ``[offset, offset + count)``; the batch-wide ones are shared."""
        colours = self.colours if len(self.colours) == 1 else self.colours[offset : offset + count]
        end = offset + count
        return StepDraws(colours, self.boxes[offset:end], self.flip[offset:end], self.perm)


def draw_step(
    batch: int,
    image_hw: tuple[int, int],
    generator: torch.Generator | None,
    n_channels: int | None = None,
    colour_mode: ColourMode = "batch",
    scales: Sequence[float] = CROP_SCALES,
    p_flip: float = 0.5,
    p_jitter: float = 0.3,
    p_gray: float = 0.2,
    p_blur: float = 0.2,
) -> StepDraws:
    """Draw the augmentation of ``batch`` images and, when ``n_channels`` is given, the class permutation."""
    colours = draw_colours(batch, generator, colour_mode, p_jitter=p_jitter, p_gray=p_gray, p_blur=p_blur)
    boxes = sample_crop_boxes(batch, image_hw, scales, generator)
    flip = torch.rand(batch, generator=generator) < p_flip
    perm = torch.randperm(n_channels, generator=generator) if n_channels is not None else None
    return StepDraws(colours, boxes, flip, perm)


def apply_augment(
    images: Tensor,
    pseudo: Tensor,
    draws: StepDraws,
    out_hw: tuple[int, int] | None = None,
    patch_size: int = 8,
    geometry: Callable[..., tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """Apply drawn augmentation (see :func:`augment_batch`) to ``images`` and their pseudo labels.

    The colour part runs eagerly: its decisions and factors are host numbers drawn per step (a compiled function
    would specialise on every new value). Everything after it (normalisation, crop resampling, RoI-Align, flips)
    is :func:`augment_geometry`, or ``geometry`` (its compiled form, :class:`StepKernels`).
    """
    b, _, hh, ww = images.shape
    oh, ow = out_hw if out_hw is not None else (hh // 2, ww // 2)
    if oh % patch_size or ow % patch_size:
        raise ValueError(f"crop size {oh}x{ow} is not a multiple of the patch size {patch_size}")
    if draws.boxes.shape[0] != b:
        raise ValueError(f"{draws.boxes.shape[0]} drawn crops for {b} images")
    x = apply_colours(images.float() / 255.0, draws.colours)
    pseudo = pseudo.float()
    # Host-made draws go to the device with non_blocking copies: a blocking copy would wait for every kernel
    # queued so far (one synchronisation per step).
    boxes = draws.boxes.to(torch.float32).to(x.device, non_blocking=True)
    rois = label_rois(draws.boxes, pseudo.shape, (hh, ww)).to(torch.float32).to(pseudo.device, non_blocking=True)
    flip = draws.flip.to(x.device, non_blocking=True)
    return (geometry or augment_geometry)(x, pseudo, boxes, rois, flip, (oh, ow), (oh // patch_size, ow // patch_size))


def augment_geometry(
    x: Tensor, pseudo: Tensor, boxes: Tensor, rois: Tensor, flip: Tensor, out_hw: tuple[int, int],
    label_hw: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """The device part of :func:`apply_augment` (one function, compiled by :class:`StepKernels`): ImageNet
    normalisation, crop resampling (:func:`crop_images`), RoI-Align of the labels (:func:`align_labels`) and the
    per-sample horizontal flip; ``boxes`` float32 ``(B, 4)``, ``rois`` ``(B, 5)`` and ``flip`` bool ``(B,)`` are
    already on the device."""
    # host constants copied without blocking (torch.tensor(..., device="cuda") would wait for the stream)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1).to(x.device, non_blocking=True)
    crops = crop_images((x - mean) / std, boxes, out_hw)
    labels = align_labels(pseudo, rois, label_hw)
    f = flip.view(-1, 1, 1, 1)
    return torch.where(f, crops.flip(-1), crops), torch.where(f, labels.flip(-1), labels)


def augment_batch(
    images: Tensor,
    pseudo: Tensor,
    generator: torch.Generator | None,
    colour_mode: ColourMode = "batch",
    scales: Sequence[float] = CROP_SCALES,
    out_hw: tuple[int, int] | None = None,
    patch_size: int = 8,
    p_flip: float = 0.5,
    p_jitter: float = 0.3,
    p_gray: float = 0.2,
    p_blur: float = 0.2,
) -> tuple[Tensor, Tensor]:
    """The reference's in-model augmentation: :func:`draw_step` then :func:`apply_augment`.

    Args:
        images: uint8 ``(B, 3, H, W)`` (on the compute device).
        pseudo: float ``(B, K, h, w)`` pseudo-label maps of the whole images.
        generator: CPU generator for every random decision.
        colour_mode: ``"batch"`` (reference) or ``"per_sample"``, see :func:`colour_augment`.
        scales: crop scales; the crop is ``s*H x s*W`` at a uniform random position.
        out_hw: crop output size, default ``(H/2, W/2)``; must be a multiple of ``patch_size``.
        patch_size: backbone patch size; label crops have ``out_hw / patch_size`` cells.
        p_flip, p_jitter, p_gray, p_blur: probabilities (per sample for the flip).

    Returns:
        ImageNet-normalised image crops ``(B, 3, oh, ow)`` and label crops ``(B, K, oh/ps, ow/ps)``.
    """
    b, _, hh, ww = images.shape
    draws = draw_step(b, (hh, ww), generator, None, colour_mode, scales, p_flip, p_jitter, p_gray, p_blur)
    return apply_augment(images, pseudo, draws, out_hw, patch_size)
