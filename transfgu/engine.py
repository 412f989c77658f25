"""Training and evaluation loops of the TransFGU decoder (reference_method.md §7.1-7.5 and §8).

Pieces, in the order a training step uses them:

* :func:`augment_batch`: colour augmentation, per-sample random crop resized to half resolution, RoI-Align of
  the pseudo labels with the same boxes, horizontal flip (§7.1).
* :func:`make_targets`: crop-wise min-max normalisation, background channel (eq. 8), teacher mix (eq. 12),
  hard labels and class-axis-permuted negatives (§7.3).
* :func:`train_one_epoch`: frozen backbone, teacher on the same crop, eq. 16, the reference step rule (§7.4).
* :func:`reboot`: teacher <- student, student <- its saved initial weights (eq. 10-12, §7.2).
* :func:`evaluate`: bilinear logits at the eval size, one confusion matrix for the split, Hungarian matching.

Everything takes explicit arguments; randomness comes from an explicit ``torch.Generator`` (CPU), in training one
per step seeded from ``(seed, epoch, step)`` (:mod:`transfgu.ddp`), so a run is reproducible, a resumed run draws what
an uninterrupted one would, data-parallel ranks share every decision, and other users of the global RNG are not
disturbed.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torchvision.ops import roi_align

from transfgu.ddp import all_reduce_sum, batch_piece, step_generator, step_seed, world_info
from transfgu.losses import (
    EpochPlan,
    LossTerms,
    LossWeights,
    diversity_loss,
    peer_loss,
    uncertainty_loss,
)
from transfgu.metrics import Overcluster, RunningConfusion
from transfgu.models.backbone import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_to_multiple
from transfgu.models.decoder import MaskTransformerDecoder
from transfgu.models.dropout import draw_keep_masks
from transfgu.throughput import CompileMode, compile_function

log = logging.getLogger(__name__)

Variant = Literal["thingstuff", "things"]
ColourMode = Literal["batch", "per_sample"]

#: Crop scales of §7.1 item 4 (an integer draw over [4, 10) / 10 in the reference: 1.0 never occurs).
CROP_SCALES: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# -- targets (§7.3) ------------------------------------------------------------------------------------------
@dataclass
class Targets:
    """Training targets of one batch."""

    hard: Tensor  # (B, h, w) int64, argmax of ``soft``
    negative: Tensor  # (B, h, w) int64, pi^-1(hard) for one batch-wide permutation pi of the classes
    fg_mask: Tensor | None  # (B, h, w) bool, max_k P~_k > T_bg ("things" variant only)
    soft: Tensor  # (B, C, h, w) the bootstrapped label maps M^ (eq. 12), C = K (+1 for "things")


def minmax_normalise(pseudo: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-sample min-max over all channels and pixels (§7.3 item 1).

    A (near-)constant map (range <= ``eps``) becomes all zeros instead of the reference's 0/0 = NaN (which
    made the reference skip the whole batch's step).
    """
    b = pseudo.shape[0]
    flat = pseudo.reshape(b, -1)
    shape = (b,) + (1,) * (pseudo.dim() - 1)
    mn = flat.min(dim=1).values.view(shape)
    rng = flat.max(dim=1).values.view(shape) - mn
    ok = rng > eps
    return torch.where(
        ok, (pseudo - mn) / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(pseudo)
    )


def make_targets(
    pseudo: Tensor,
    teacher_logits: Tensor | None,
    variant: Variant,
    t_bg: float = 0.1,
    mix: float = 0.5,
    generator: torch.Generator | None = None,
    eps: float = 1e-6,
    perm: Tensor | None = None,
) -> Targets:
    """Bootstrapped targets from RoI-aligned pseudo-label crops (§7.3).

    Args:
        pseudo: ``(B, K, h, w)`` pseudo-label crops (Grad-CAM response maps, K foreground/stuff concepts).
        teacher_logits: ``(B, C, h, w)`` teacher decoder logits on the same crops, or ``None`` before
            bootstrapping.
        variant: ``"thingstuff"`` (C = K) or ``"things"`` (C = K + 1, background channel 0 = relu(T_bg - max_k
            P~_k), eq. 8; argmax ties go to background).
        t_bg: background threshold T_bg of eq. 8.
        mix: weight of the teacher softmax in eq. 12 (``mix * softmax(teacher) + (1 - mix) * P~``).
        generator: CPU generator for the negative-label permutation (one per call = per iteration).
        eps: range below which a crop's map counts as constant (see :func:`minmax_normalise`).
        perm: an already drawn permutation of the C classes (data-parallel ranks share one); then ``generator`` is
            not used.
    """
    p = minmax_normalise(pseudo.float(), eps=eps)
    fg_mask = None
    if variant == "things":
        fg_max = p.max(dim=1).values
        fg_mask = fg_max > t_bg
        p = torch.cat([F.relu(t_bg - fg_max).unsqueeze(1), p], dim=1)
    elif variant != "thingstuff":
        raise ValueError(f"variant must be 'thingstuff' or 'things', got {variant!r}")
    if teacher_logits is not None:
        if teacher_logits.shape != p.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match targets {tuple(p.shape)}"
            )
        p = mix * teacher_logits.float().softmax(dim=1) + (1.0 - mix) * p
    hard = p.argmax(dim=1)
    if perm is None:
        perm = torch.randperm(p.shape[1], generator=generator)
    elif perm.shape != (p.shape[1],):
        raise ValueError(f"permutation of {perm.shape[0]} classes for {p.shape[1]} target channels")
    inverse = torch.argsort(perm).to(hard.device, non_blocking=True)  # no stream synchronisation
    return Targets(hard=hard, negative=inverse[hard], fg_mask=fg_mask, soft=p)


# -- augmentation (§7.1) -------------------------------------------------------------------------------------
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
    """Draw one colour decision (§7.1 item 3); the draws and their order are those of applying it directly."""
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
    """RoI-Align the pseudo-label maps over the image-pixel ``boxes`` (§7.1 item 5).

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
    """Every random decision of one training step for a (global) batch of ``B`` images (§7.1, §7.3 item 5).

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
    """The reference's in-model augmentation (§7.1): :func:`draw_step` then :func:`apply_augment`.

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


# -- model helpers -------------------------------------------------------------------------------------------
def make_optimizer(decoder: nn.Module, lr: float, weight_decay: float = 5e-4) -> torch.optim.Adam:
    """Adam with coupled L2 (``weight_decay``) on tensors with ndim >= 2 only (§7.5); no LR schedule."""
    decay, no_decay = [], []
    for p in decoder.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    # fused=True: one kernel for the whole update, and it honours ``found_inf`` (see train_one_epoch), which lets
    # the step rule skip a step on the device instead of reading the loss back on the host every step.
    return torch.optim.Adam(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        fused=True,
    )


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """True for optimizers whose ``step`` honours a ``found_inf`` tensor (fused Adam/AdamW): the step is then
    skipped on the device, parameters, moments and step count untouched, as when it is not called at all."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen, eval-mode deep copy of ``student``."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def reboot(student: nn.Module, teacher: nn.Module, initial_state: Mapping[str, Tensor]) -> None:
    """New round (§7.2, eq. 10-12): teacher <- copy of the student, student <- the saved initial weights.

    Weights are copied in place, so the optimizer keeps tracking the student's parameters; its Adam moments
    are NOT reset, as in the reference.
    """
    with torch.no_grad():
        teacher.load_state_dict(copy.deepcopy(student.state_dict()))
        student.load_state_dict(initial_state)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)


def _decode(decoder: nn.Module, backbone: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        feats = backbone(x)
    return decoder(feats.patch, feats.grid)


@torch.no_grad()
def predict_logits(
    decoder: nn.Module, backbone: nn.Module, images: Tensor, out_hw: tuple[int, int] | None = None
) -> Tensor:
    """Logits ``(B, C, *out_hw)``: decoder on the patch tokens, upsampled bilinearly (align_corners=False).

    ``images`` are ImageNet-normalised; sizes that are not a multiple of the patch size are resized down to
    one first. ``out_hw`` defaults to the input size.
    """
    out_hw = out_hw if out_hw is not None else (int(images.shape[-2]), int(images.shape[-1]))
    ps = int(getattr(backbone, "patch_size", 8))
    if images.shape[-2] % ps or images.shape[-1] % ps:
        images = resize_to_multiple(images, (images.shape[-2], images.shape[-1]), ps)
    logits, _ = _decode(decoder, backbone, images)
    return F.interpolate(logits.float(), size=out_hw, mode="bilinear", align_corners=False)


# -- training loop (§7.4) ------------------------------------------------------------------------------------
def draw_dropout(
    student: nn.Module,
    grid: tuple[int, int],
    seed: int | None,
    epoch: int,
    step: int,
    offset: int,
    count: int,
    device: torch.device,
) -> list[Tensor] | None:
    """The student's dropout keep-masks for ``count`` samples at ``offset..`` of step ``step``'s global batch.

    With ``seed`` the masks of the sample at global-batch position ``q`` are drawn from a generator seeded with
    ``step_seed(seed, epoch, step, 1 + q)``: whichever rank holds the sample draws the same masks, so W ranks
    apply the masks one process would, and a resumed run draws those of an uninterrupted one. Without ``seed``
    they come from the global RNG. ``None`` when the student has no active dropout (eval, ``p = 0``) or takes no
    masks.
    """
    dec = student.module if isinstance(student, nn.parallel.DistributedDataParallel) else student
    if not isinstance(dec, MaskTransformerDecoder) or not dec.training or dec.dropout <= 0.0:
        return None
    keys = None if seed is None else [step_seed(seed, epoch, step, 1 + offset + j) for j in range(count)]
    return draw_keep_masks(dec.dropout_shapes(grid[0] * grid[1]), dec.dropout, count, device, keys)


def shared_loss(
    logits: Tensor,
    targets: Targets,
    class_emb: Tensor,
    negative: bool,
    alpha: float,
    variant: Variant,
    weights: LossWeights,
    empty_fg: Literal["zero", "nan"],
    fraction: float,
    fg_total: float | None,
) -> LossTerms:
    """This rank's share of eq. 16 over a global batch; the shares of all ranks sum to :func:`total_loss` of the
    whole batch.

    Every term of eq. 16 is a mean over images (diversity) or over equally sized images' pixels (peer; uncertainty
    in the "thingstuff" variant), so the global mean is ``sum_r fraction_r * mean_r`` with ``fraction_r`` = the
    rank's images / the global batch. The "things" uncertainty is a mean over foreground pixels: its weight is the
    rank's foreground pixels / all of them (``fg_total``, all-reduced by the caller). When the global batch has no
    foreground pixel the term is the definition's (0, or NaN with ``empty_fg="nan"``). With one process,
    ``fraction = 1`` and this is exactly :func:`total_loss`.
    """
    lp = peer_loss(logits, targets.hard, targets.negative if negative else None, alpha)
    ld = diversity_loss(class_emb)
    if targets.fg_mask is None or fg_total is None:
        lu = uncertainty_loss(logits, targets.fg_mask, exclude_channel0=variant == "things", empty_fg=empty_fg)
        w_u = fraction
    elif fg_total > 0:
        lu = uncertainty_loss(logits, targets.fg_mask, exclude_channel0=variant == "things", empty_fg="zero")
        w_u = float(targets.fg_mask.sum()) / fg_total
    else:
        lu = uncertainty_loss(logits, targets.fg_mask, exclude_channel0=variant == "things", empty_fg=empty_fg)
        w_u = fraction
    sp, sd, su = fraction * lp, fraction * ld, w_u * lu
    return LossTerms(total=weights.peer * sp + weights.div * sd + weights.unc * su, peer=sp, diversity=sd,
                     uncertainty=su)


def step_losses(
    student: nn.Module,
    teacher: nn.Module | None,
    patch: Tensor,
    grid: tuple[int, int],
    labels: Tensor,
    perm: Tensor | None,
    variant: Variant,
    t_bg: float,
    mix: float,
    alpha: float,
    weights: LossWeights,
    empty_fg: Literal["zero", "nan"],
    amp_dtype: torch.dtype | None,
    fraction: float = 1.0,
    fg_total: Callable[[Tensor], float] | None = None,
    placeholder: bool = False,
    dropout_keep: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The step's decoder and loss kernels: teacher (no grad) and student on the frozen patch tokens, the targets
    of §7.3 and eq. 16; returns ``(total, peer, diversity, uncertainty)`` attached to the student's graph.

    One process: ``fraction=1``, ``fg_total=None`` (exactly :func:`total_loss`, nothing read on the host), and
    :class:`StepKernels` may compile it. Data-parallel ranks pass their share and ``fg_total`` (the all-reduced
    foreground count of the "things" variant, :func:`shared_loss`), eagerly. ``dropout_keep``: the student's
    dropout masks (:func:`draw_dropout`), drawn outside so that a compiled graph holds no generator.
    """
    use_teacher = teacher is not None
    with torch.autocast(patch.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        with torch.no_grad():
            teacher_logits = teacher(patch, grid)[0].float() if use_teacher else None
        logits, class_emb = student(patch, grid) if dropout_keep is None else student(patch, grid, dropout_keep)
    targets = make_targets(labels, teacher_logits, variant, t_bg=t_bg, mix=mix, perm=perm)
    if logits.shape[1] != targets.soft.shape[1]:
        raise ValueError(
            f"student has {logits.shape[1]} channels, {variant!r} targets {targets.soft.shape[1]}"
            " (the 'things' variant needs K + 1 decoder channels, channel 0 = background)"
        )
    total_fg = None
    if fg_total is not None and targets.fg_mask is not None:
        if placeholder:  # a data-parallel placeholder image: no foreground of the global batch
            targets.fg_mask = torch.zeros_like(targets.fg_mask)
        total_fg = fg_total(targets.fg_mask)
    terms = shared_loss(
        logits.float(), targets, class_emb.float(), negative=use_teacher, alpha=alpha if use_teacher else 0.0,
        variant=variant, weights=weights, empty_fg=empty_fg, fraction=fraction, fg_total=total_fg,
    )  # fmt: skip
    return terms.total, terms.peer, terms.diversity, terms.uncertainty


class StepKernels:
    """The training step's device work as two functions, compiled (``torch.compile``) or eager.

    * ``geometry`` = :func:`augment_geometry` (normalisation, crop resampling, RoI-Align, flips), and
    * ``losses`` = :func:`step_losses` (teacher + student decoder, targets, eq. 16; the backward of the compiled
      graph is compiled with it).

    The frozen backbone between them is compiled by :func:`transfgu.throughput.compile_forward`; the colour
    augmentation stays eager (host-drawn factors). ``mode`` as ``TRANSFGU_COMPILE`` (default ``auto``: compile on
    CUDA only); a failed compilation logs one warning and runs eagerly from then on. Build one per training run
    (the compiled graphs are cached on it; the alpha schedule adds one graph per distinct alpha).
    Only the one-process step uses them; data-parallel ranks run the eager functions (their loss share needs an
    all-reduce inside the step).
    """

    def __init__(self, device: torch.device | str, mode: CompileMode | None = None,
                 backend: str | Callable[..., Any] | None = None) -> None:
        on_cuda = torch.device(device).type == "cuda"
        self.geometry = compile_function(augment_geometry, mode, on_cuda, backend, "the augmentation geometry")
        self.losses = compile_function(step_losses, mode, on_cuda, backend, "the decoder and losses")

    @property
    def compiled(self) -> bool:
        return bool(getattr(self.geometry, "compiled", False) or getattr(self.losses, "compiled", False))


def train_one_epoch(
    student: nn.Module,
    teacher: nn.Module | None,
    backbone: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    optimizer: torch.optim.Optimizer,
    schedule_state: EpochPlan,
    device: torch.device | str,
    loss_weights: LossWeights = LossWeights(),  # noqa: B008 (frozen dataclass)
    variant: Variant = "thingstuff",
    clamp_grad: float | None = 1.0,
    skip_nonpositive: bool = True,
    generator: torch.Generator | None = None,
    log_every: int = 50,
    colour_mode: ColourMode = "batch",
    t_bg: float = 0.1,
    mix: float = 0.5,
    empty_fg: Literal["zero", "nan"] = "zero",
    amp_dtype: torch.dtype | None = None,
    max_steps: int | None = None,
    seed: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    kernels: StepKernels | None = None,
) -> dict[str, float]:
    """One epoch of decoder training on frozen patch tokens; data-parallel ranks train as one process.

    Each batch ``{"image": uint8 (B,3,H,W), "pseudo": float (B,K,h,w), ...}`` is augmented
    (:func:`augment_batch`), the frozen backbone embeds the crops under ``no_grad``, the teacher (eval mode,
    when ``schedule_state.bootstrapping``) predicts on the same crops, and the student is trained with eq. 16
    at ``alpha = schedule_state.alpha``.

    Randomness: with ``seed`` every step ``i`` draws its augmentation and class permutation from
    :func:`transfgu.ddp.step_generator` ``(seed, epoch, i)`` and the dropout masks of the sample at global-batch
    position ``q`` from a seed of ``(seed, epoch, i, 1 + q)`` (:func:`draw_dropout`); otherwise everything is drawn
    from ``generator`` (and dropout from the global RNG).

    Data parallelism (a ``torch.distributed`` group of W > 1 ranks; the student wrapped in DDP; ``seed`` required;
    batches from :func:`transfgu.ddp.step_loader`): each rank draws the decisions of the whole global batch and
    uses its slice, computes its share of the global loss (:func:`shared_loss`), and one ``all_reduce`` gives
    every rank the global loss, so all ranks take the same step decision (see :mod:`transfgu.ddp`).

    Step rule (§7.4): with ``skip_nonpositive`` (reference) the optimizer steps only if the loss is > 0, which
    also skips NaN; without it, only non-finite losses are skipped. Gradients are clamped element-wise to
    ``[-clamp_grad, clamp_grad]`` (value clipping, not norm clipping). Reboots are the caller's job
    (:func:`reboot`). ``on_step`` receives a dict per step (global loss, decision, draws, dataset indices).

    ``kernels``: the step's device functions (:class:`StepKernels`, compiled or not; default: eager). With one
    process, fused Adam and no ``on_step``, a step reads nothing back from the device: the step rule is decided on
    the device, the loss sums stay there, and the host reads them at ``log_every`` and at the end only.

    Returns the means over batches of the global ``loss``, ``peer``, ``diversity``, ``uncertainty`` (finite
    values only), plus ``steps``, ``skipped``, ``batches``, ``alpha``, ``images`` (global) and ``seconds``.
    """
    device = torch.device(device)
    plan = schedule_state
    use_teacher = plan.bootstrapping
    if use_teacher and teacher is None:
        raise ValueError("a teacher is required for a bootstrapping epoch")
    rank, world = world_info()
    if world > 1:
        if seed is None:
            raise ValueError("data-parallel training needs seed= (every rank must draw the same decisions)")
        if not isinstance(student, nn.parallel.DistributedDataParallel):
            raise ValueError("data-parallel training needs the student wrapped in DistributedDataParallel")
    student.train()
    backbone.eval()
    if teacher is not None:
        teacher.eval()
    ps = int(getattr(backbone, "patch_size", 8))
    params = [p for p in student.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "peer": 0.0, "diversity": 0.0, "uncertainty": 0.0}
    n_finite = n_batches = n_steps = n_skipped = n_images = 0
    # One process, no per-step callback, fused Adam: the step rule is decided on the device (found_inf) and the
    # running sums stay there, so a step never waits for the GPU (read back at log_every and at the end only).
    # Data-parallel ranks keep the host decision: it comes with the loss all-reduce every rank must agree on.
    on_device = world == 1 and on_step is None and _skips_on_device(optimizer)
    kernels = kernels or StepKernels(device, mode="off")
    dev_sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, peer, diversity, uncertainty (finite)
    dev_counts = torch.zeros(2, dtype=torch.int64, device=device)  # finite losses, steps taken
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        images = batch["image"].to(device, non_blocking=True)
        pseudo = batch["pseudo"].to(device, non_blocking=True).float()
        offset, n_real, global_b = batch_piece(batch, images.shape[0])
        c = pseudo.shape[1] + (variant == "things")  # target channels: the permutation's size
        g = step_generator(seed, plan.epoch, i) if seed is not None else generator
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        draws = draw_step(global_b, hw, g, c, colour_mode)
        mine = draws.piece(offset, images.shape[0]) if n_real else draws.piece(0, images.shape[0])
        if world == 1:
            crops, labels = apply_augment(images, pseudo, mine, patch_size=ps, geometry=kernels.geometry)
        else:
            crops, labels = apply_augment(images, pseudo, mine, patch_size=ps)
        amp_on = amp_dtype is not None
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_on), torch.no_grad():
            feats = backbone(crops)
        keep = draw_dropout(student, feats.grid, seed, plan.epoch, i, offset, images.shape[0], device)
        # The permutation is drawn on the CPU generator; the compiled kernels get it on the step's device, so no
        # graph has an input on another device (an exact copy: argsort of a permutation is the same anywhere).
        perm = mine.perm.to(device, non_blocking=True) if mine.perm is not None else None
        common = dict(variant=variant, t_bg=t_bg, mix=mix, alpha=plan.alpha, weights=loss_weights,
                      empty_fg=empty_fg, amp_dtype=amp_dtype, dropout_keep=keep)  # fmt: skip
        if world == 1:  # the whole batch: no share, no foreground all-reduce (nothing read on the host)
            total, peer_t, div_t, unc_t = kernels.losses(
                student, teacher if use_teacher else None, feats.patch, feats.grid, labels, perm, **common,
                fraction=n_real / global_b,
            )  # fmt: skip
        else:
            total, peer_t, div_t, unc_t = step_losses(
                student, teacher if use_teacher else None, feats.patch, feats.grid, labels, perm, **common,
                fraction=n_real / global_b, placeholder=not n_real,
                fg_total=lambda m: float(all_reduce_sum(m.sum().double().reshape(1), device)[0]),
            )  # fmt: skip
        terms = LossTerms(total=total, peer=peer_t, diversity=div_t, uncertainty=unc_t)
        if on_device:
            loss_t = terms.total.detach()
            finite = torch.isfinite(loss_t)
            ok = (loss_t > 0) if skip_nonpositive else finite  # NaN > 0 is False: NaN is skipped too
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()  # always; a skipped step is dropped inside the fused update
            if clamp_grad is not None:
                torch.nn.utils.clip_grad_value_(params, clamp_grad)
            optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf  # type: ignore[attr-defined]
            vals = torch.stack([loss_t, terms.peer.detach(), terms.diversity.detach(), terms.uncertainty.detach()])
            dev_sums += torch.where(finite, vals.double(), 0.0)
            dev_counts += torch.stack([finite, ok]).long()
            n_batches += 1
            n_images += n_real
            if log_every and (i + 1) % log_every == 0:
                log.info(
                    "epoch %d step %d loss %.4f (peer %.4f div %.4f unc %.4f) skipped %d",
                    plan.epoch, i + 1, *(float(v) for v in vals), n_batches - int(dev_counts[1]),
                )  # fmt: skip
            continue
        # One all-reduce of the shares: every rank gets the global loss and takes the same decision.
        parts = torch.stack([terms.total, terms.peer, terms.diversity, terms.uncertainty]).detach().double().cpu()
        reduced = all_reduce_sum(torch.cat([parts, torch.tensor([float(n_real)], dtype=torch.float64)]), device)
        loss_value, peer, div, unc, n_global = (float(v) for v in reduced)
        do_step = loss_value > 0 if skip_nonpositive else math.isfinite(loss_value)
        optimizer.zero_grad(set_to_none=True)
        if do_step:
            # DDP averages gradients over ranks: W x the share makes the average the gradient of the sum.
            (terms.total * world if world > 1 else terms.total).backward()
            if clamp_grad is not None:
                torch.nn.utils.clip_grad_value_(params, clamp_grad)
            optimizer.step()
            n_steps += 1
        else:
            n_skipped += 1
        n_batches += 1
        n_images += int(n_global)
        if math.isfinite(loss_value):
            n_finite += 1
            sums["loss"] += loss_value
            sums["peer"] += peer
            sums["diversity"] += div
            sums["uncertainty"] += unc
        if on_step is not None:
            on_step({
                "epoch": plan.epoch, "step": i, "loss": loss_value, "stepped": do_step, "images": int(n_global),
                "perm": draws.perm.tolist() if draws.perm is not None else None,
                "colours": [dataclasses.asdict(d) for d in draws.colours], "boxes": draws.boxes.tolist(),
                "flip": draws.flip.tolist(),
                "indices": [int(x) for x in batch["index"]] if "index" in batch and n_real else [],
                "offset": offset,
            })  # fmt: skip
        if log_every and (i + 1) % log_every == 0:
            log.info(
                "epoch %d step %d loss %.4f (peer %.4f div %.4f unc %.4f) skipped %d",
                plan.epoch, i + 1, loss_value, peer, div, unc, n_skipped,
            )  # fmt: skip
    if on_device:
        fin, taken = (int(c) for c in dev_counts.tolist())
        for k, v in zip(("loss", "peer", "diversity", "uncertainty"), dev_sums.tolist()):
            sums[k] += v
        n_finite, n_steps, n_skipped = n_finite + fin, n_steps + taken, n_skipped + n_batches - taken
    out = {k: (v / n_finite if n_finite else float("nan")) for k, v in sums.items()}
    out.update(
        steps=float(n_steps),
        skipped=float(n_skipped),
        batches=float(n_batches),
        alpha=float(plan.alpha),
        images=float(n_images),
        seconds=time.perf_counter() - t0,
    )
    return out


# -- evaluation (§8) -----------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    decoder: nn.Module,
    backbone: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    n_clusters: int,
    n_classes: int,
    device: torch.device | str,
    eval_hw: tuple[int, int] | None = None,
    ignore_index: int | None = -1,
    class_names: Sequence[str] | None = None,
    overcluster: Overcluster = "hungarian",
    amp_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Whole-split evaluation (§8): one confusion matrix over all batches, then one cluster-to-class matching.

    Batches are ``{"image": uint8 (B,3,H,W), "label": int64 (B,H,W)}``. With ``eval_hw`` set and different
    from the batch size, images are resized bilinearly and labels with nearest (the reference's protocol);
    metrics are computed at ``eval_hw``. Labels outside ``[0, n_classes)`` or equal to ``ignore_index`` are
    ignored.

    Returns :func:`transfgu.metrics.segmentation_scores` plus ``confusion``, the ``(n_classes, n_clusters)``
    array.
    """
    device = torch.device(device)
    was_training = decoder.training
    decoder.eval()
    backbone.eval()
    running = RunningConfusion(n_classes, n_clusters, ignore_index=ignore_index)
    try:
        for batch in loader:
            images = batch["image"].to(device)
            labels = batch["label"].to(device).long()
            x = normalize(images)
            hw = (int(x.shape[-2]), int(x.shape[-1])) if eval_hw is None else tuple(eval_hw)
            if (x.shape[-2], x.shape[-1]) != hw:
                x = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
            if (labels.shape[-2], labels.shape[-1]) != hw:
                labels = F.interpolate(labels[:, None].float(), size=hw, mode="nearest")[:, 0].long()
            with torch.autocast(
                device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None
            ):
                logits = predict_logits(decoder, backbone, x, hw)
            if logits.shape[1] != n_clusters:
                raise ValueError(
                    f"decoder gives {logits.shape[1]} channels, expected n_clusters={n_clusters}"
                )
            running.update(labels, logits.argmax(dim=1))
    finally:
        decoder.train(was_training)
    scores = running.scores(class_names=class_names, overcluster=overcluster)
    scores["confusion"] = running.conf.copy()
    return scores
