"""Training and evaluation loops of the TransFGU decoder (reference_method.md §7.1-7.5 and §8).

Pieces, in the order a training step uses them:

* :func:`augment_batch`: colour augmentation, per-sample random crop resized to half resolution, RoI-Align of
  the pseudo labels with the same boxes, horizontal flip (§7.1).
* :func:`make_targets`: crop-wise min-max normalisation, background channel (eq. 8), teacher mix (eq. 12),
  hard labels and class-axis-permuted negatives (§7.3).
* :func:`train_one_epoch`: frozen backbone, teacher on the same crop, eq. 16, the reference step rule (§7.4).
* :func:`reboot`: teacher <- student, student <- its saved initial weights (eq. 10-12, §7.2).
* :func:`evaluate`: bilinear logits at the eval size, one confusion matrix for the split, Hungarian matching.

Everything takes explicit arguments; randomness comes from an explicit ``torch.Generator`` (CPU) so a run is
reproducible and independent of other users of the global RNG.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torchvision.ops import roi_align

from transfgu.losses import EpochPlan, LossWeights, total_loss
from transfgu.metrics import Overcluster, RunningConfusion
from transfgu.models.backbone import IMAGENET_MEAN, IMAGENET_STD, normalize, resize_to_multiple

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
    perm = torch.randperm(p.shape[1], generator=generator)
    inverse = torch.argsort(perm).to(hard.device)
    return Targets(hard=hard, negative=inverse[hard], fg_mask=fg_mask, soft=p)


# -- augmentation (§7.1) -------------------------------------------------------------------------------------
def _uniform(generator: torch.Generator | None, lo: float, hi: float) -> float:
    return float(lo + (hi - lo) * torch.rand((), generator=generator))


def _bernoulli(generator: torch.Generator | None, p: float) -> bool:
    return p > 0 and bool(torch.rand((), generator=generator) < p)


def _colour_one(
    x: Tensor,
    generator: torch.Generator | None,
    jitter: tuple[float, float, float, float],
    p_jitter: float,
    p_gray: float,
    p_blur: float,
    blur_sigma: tuple[float, float],
) -> Tensor:
    """One decision and one parameter set for all images in ``x`` (float in [0, 1])."""
    if _bernoulli(generator, p_jitter):
        # torchvision ColorJitter semantics: factors in [max(0, 1-v), 1+v], hue in [-v, v], random op order.
        b, c, s, h = jitter
        order = torch.randperm(4, generator=generator).tolist()
        factors = [
            _uniform(generator, max(0.0, 1 - b), 1 + b),
            _uniform(generator, max(0.0, 1 - c), 1 + c),
            _uniform(generator, max(0.0, 1 - s), 1 + s),
            _uniform(generator, -h, h),
        ]
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for i in order:
            x = ops[i](x, factors[i])
    if _bernoulli(generator, p_gray):
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if _bernoulli(generator, p_blur):
        sigma = _uniform(generator, *blur_sigma)
        x = TF.gaussian_blur(x, kernel_size=[3, 3], sigma=[sigma, sigma])
    return x


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
    args = (jitter, p_jitter, p_gray, p_blur, blur_sigma)
    if mode == "batch":
        return _colour_one(x, generator, *args)
    if mode == "per_sample":
        return torch.cat([_colour_one(x[i : i + 1], generator, *args) for i in range(x.shape[0])], dim=0)
    raise ValueError(f"colour mode must be 'batch' or 'per_sample', got {mode!r}")


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
    boxes = boxes.to(device=images.device, dtype=torch.float32)
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
    b, _, lh, lw = pseudo.shape
    hh, ww = image_hw
    scale = torch.tensor([lw / ww, lh / hh, lw / ww, lh / hh], dtype=torch.float64)
    rois = torch.cat([torch.arange(b, dtype=torch.float64)[:, None], boxes.to(torch.float64) * scale], dim=1)
    rois = rois.to(device=pseudo.device, dtype=pseudo.dtype)
    return roi_align(pseudo, rois, output_size=out_hw, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


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
    """The reference's in-model augmentation (§7.1).

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
    oh, ow = out_hw if out_hw is not None else (hh // 2, ww // 2)
    if oh % patch_size or ow % patch_size:
        raise ValueError(f"crop size {oh}x{ow} is not a multiple of the patch size {patch_size}")
    x = images.float() / 255.0
    x = colour_augment(x, generator, colour_mode, p_jitter=p_jitter, p_gray=p_gray, p_blur=p_blur)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    x = (x - mean) / std
    boxes = sample_crop_boxes(b, (hh, ww), scales, generator)
    crops = crop_images(x, boxes, (oh, ow))
    labels = crop_labels(pseudo.float(), boxes, (hh, ww), (oh // patch_size, ow // patch_size))
    flip = (torch.rand(b, generator=generator) < p_flip).to(crops.device)
    crops = torch.where(flip.view(b, 1, 1, 1), crops.flip(-1), crops)
    labels = torch.where(flip.view(b, 1, 1, 1).to(labels.device), labels.flip(-1), labels)
    return crops, labels


# -- model helpers -------------------------------------------------------------------------------------------
def make_optimizer(decoder: nn.Module, lr: float, weight_decay: float = 5e-4) -> torch.optim.Adam:
    """Adam with coupled L2 (``weight_decay``) on tensors with ndim >= 2 only (§7.5); no LR schedule."""
    decay, no_decay = [], []
    for p in decoder.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.Adam(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
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
) -> dict[str, float]:
    """One epoch of decoder training on frozen patch tokens.

    Each batch ``{"image": uint8 (B,3,H,W), "pseudo": float (B,K,h,w), ...}`` is augmented
    (:func:`augment_batch`), the frozen backbone embeds the crops under ``no_grad``, the teacher (eval mode,
    when ``schedule_state.bootstrapping``) predicts on the same crops, and the student is trained with eq. 16
    at ``alpha = schedule_state.alpha``.

    Step rule (§7.4): with ``skip_nonpositive`` (reference) the optimizer steps only if the loss is > 0, which
    also skips NaN; without it, only non-finite losses are skipped. Gradients are clamped element-wise to
    ``[-clamp_grad, clamp_grad]`` (value clipping, not norm clipping). Reboots are the caller's job
    (:func:`reboot`).

    Returns the means over batches of ``loss``, ``peer``, ``diversity``, ``uncertainty`` (finite values only),
    plus ``steps``, ``skipped``, ``batches``, ``alpha``, ``images`` and ``seconds``.
    """
    device = torch.device(device)
    plan = schedule_state
    use_teacher = plan.bootstrapping
    if use_teacher and teacher is None:
        raise ValueError("a teacher is required for a bootstrapping epoch")
    student.train()
    backbone.eval()
    if teacher is not None:
        teacher.eval()
    ps = int(getattr(backbone, "patch_size", 8))
    params = [p for p in student.parameters() if p.requires_grad]
    sums = {"loss": 0.0, "peer": 0.0, "diversity": 0.0, "uncertainty": 0.0}
    n_finite = n_batches = n_steps = n_skipped = n_images = 0
    t0 = time.perf_counter()
    for i, batch in enumerate(loader):
        if max_steps is not None and i >= max_steps:
            break
        images = batch["image"].to(device, non_blocking=True)
        pseudo = batch["pseudo"].to(device, non_blocking=True).float()
        crops, labels = augment_batch(images, pseudo, generator, colour_mode=colour_mode, patch_size=ps)
        with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            with torch.no_grad():
                feats = backbone(crops)
                teacher_logits = teacher(feats.patch, feats.grid)[0].float() if use_teacher else None
            logits, class_emb = student(feats.patch, feats.grid)
        targets = make_targets(labels, teacher_logits, variant, t_bg=t_bg, mix=mix, generator=generator)
        if logits.shape[1] != targets.soft.shape[1]:
            raise ValueError(
                f"student has {logits.shape[1]} channels, {variant!r} targets {targets.soft.shape[1]}"
                " (the 'things' variant needs K + 1 decoder channels, channel 0 = background)"
            )
        terms = total_loss(
            logits.float(),
            targets.hard,
            class_emb.float(),
            negative_target=targets.negative if use_teacher else None,
            alpha=plan.alpha if use_teacher else 0.0,
            fg_mask=targets.fg_mask,
            exclude_channel0=variant == "things",
            w_div=loss_weights.div,
            w_unc=loss_weights.unc,
            w_peer=loss_weights.peer,
            empty_fg=empty_fg,
        )
        loss_value = float(terms.total.detach())
        do_step = loss_value > 0 if skip_nonpositive else math.isfinite(loss_value)
        optimizer.zero_grad(set_to_none=True)
        if do_step:
            terms.total.backward()
            if clamp_grad is not None:
                torch.nn.utils.clip_grad_value_(params, clamp_grad)
            optimizer.step()
            n_steps += 1
        else:
            n_skipped += 1
        n_batches += 1
        n_images += images.shape[0]
        if math.isfinite(loss_value):
            n_finite += 1
            sums["loss"] += loss_value
            sums["peer"] += float(terms.peer.detach())
            sums["diversity"] += float(terms.diversity.detach())
            sums["uncertainty"] += float(terms.uncertainty.detach())
        if log_every and (i + 1) % log_every == 0:
            log.info(
                "epoch %d step %d loss %.4f (peer %.4f div %.4f unc %.4f) skipped %d",
                plan.epoch, i + 1, loss_value, float(terms.peer), float(terms.diversity),
                float(terms.uncertainty), n_skipped,
            )  # fmt: skip
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
