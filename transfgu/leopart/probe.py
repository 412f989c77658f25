"""Linear probe of frozen dense patch tokens (the Leopart paper's appendix A.1, "Evaluation details"): a linear
layer on the frozen features, trained WITH THE TRAINING SPLIT'S LABELS, scored on val by mIoU with the project's
confusion matrix and IoU definition (the head predicts classes, so there is no cluster matching).

The appendix's settings: features bilinearly interpolated to the mask size before the head, 25 epochs, learning
rate 0.01 divided by 10 after epoch 20, batch size 120, training masks 100 x 100, evaluation masks 448 x 448. It does
not name the optimiser; SGD with momentum is used here (``leopart.linear_probe.momentum``). The authors' code adds
SGD weight decay 1e-4 and RandomResizedCrop (scale 0.8-1) + horizontal flip of the training images
(``weight_decay`` / ``augment``, on under ``leopart.protocol: paper``; :func:`augment_pair`).

A 1 x 1 linear head commutes with bilinear interpolation (each output pixel is a convex combination of input
pixels, and the weights sum to one, so the bias passes through), so the head is applied on the patch grid and its
C logits are interpolated, not the d-dimensional features: the same numbers for a fraction of the memory (tested).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from transfgu.metrics import RunningConfusion, mapped_scores


def probe_logits(head: nn.Linear, feats: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """``(B, h*w, d)`` frozen tokens -> ``(B, C, *size)`` logits (head on the grid, then bilinear upsampling)."""
    b = feats.shape[0]
    x = head(feats).transpose(1, 2).reshape(b, head.out_features, *grid)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def crop_box(h: int, w: int, g: torch.Generator, scale: tuple[float, float] = (0.8, 1.0),
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A RandomResizedCrop box ``(y0, x0, ch, cw)`` of an ``h x w`` map (torchvision's rule, drawn with ``g``;
    the whole map after 10 failed draws)."""
    import math

    for _ in range(10):
        area = h * w * (scale[0] + (scale[1] - scale[0]) * float(torch.rand((), generator=g)))
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * float(torch.rand((),
                                                                                                   generator=g)))
        cw, ch = int(round(math.sqrt(area * r))), int(round(math.sqrt(area / r)))
        if 0 < cw <= w and 0 < ch <= h:
            y0 = int(torch.randint(0, h - ch + 1, (), generator=g))
            x0 = int(torch.randint(0, w - cw + 1, (), generator=g))
            return y0, x0, ch, cw
    return 0, 0, h, w


def augment_pair(logits: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' probe augmentation, RandomResizedCrop (scale 0.8-1) + horizontal flip (p 0.5), applied to each
    image's logits ``(C, H, W)`` and label map ``(H, W)`` alike (logits bilinear, labels nearest, back to ``H x W``).

    The authors crop the image before the frozen backbone; here the frozen tokens are stored, so the crop is taken
    of the head's upsampled output -- the same as cropping the bilinearly interpolated features, the head being
    linear -- not of new tokens of the cropped image."""
    _, hh, ww = logits.shape
    y0, x0, ch, cw = crop_box(hh, ww, g)
    lo = F.interpolate(logits[None, :, y0 : y0 + ch, x0 : x0 + cw], size=(hh, ww), mode="bilinear",
                       align_corners=False)[0]
    la = F.interpolate(labels[None, None, y0 : y0 + ch, x0 : x0 + cw].float(), size=(hh, ww),
                       mode="nearest")[0, 0].long()
    if float(torch.rand((), generator=g)) < 0.5:
        lo, la = lo.flip(-1), la.flip(-1)
    return lo, la


def train_probe_epoch(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, grid: tuple[int, int],
                      optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                      augment: bool = False) -> float:
    """One pass over the shuffled training images; pixel cross-entropy (label -1 ignored). Returns the mean loss.
    ``augment``: :func:`augment_pair` on every image (drawn with ``generator``)."""
    head.train()
    order = torch.randperm(feats.shape[0], generator=generator)
    total, steps = 0.0, 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        y = labels[idx]
        if not (y >= 0).any():
            continue
        logits = probe_logits(head, feats[idx], grid, tuple(y.shape[1:]))
        if augment:
            pairs = [augment_pair(lo, la, generator) for lo, la in zip(logits, y)]
            logits, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        loss = F.cross_entropy(logits, y, ignore_index=-1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    return total / max(steps, 1)


def train_linear_probe(feats: np.ndarray, labels: np.ndarray, grid: tuple[int, int], n_classes: int, *,
                       epochs: int = 25, lr: float = 0.01, lr_drop_epoch: int = 20, batch_size: int = 120,
                       momentum: float = 0.9, seed: int = 0, weight_decay: float = 0.0,
                       augment: bool = False) -> tuple[nn.Linear, list[float]]:
    """Fit the head on ``feats (N, h*w, d)`` and ``labels (N, H, W)`` (int, -1 = ignore); returns it and the loss
    of every epoch. Deterministic for a given seed (CPU)."""
    if feats.ndim != 3 or feats.shape[1] != grid[0] * grid[1]:
        raise ValueError(f"feats must be (N, {grid[0] * grid[1]}, d), got {feats.shape}")
    if labels.shape[0] != feats.shape[0]:
        raise ValueError(f"{feats.shape[0]} feature maps but {labels.shape[0]} label maps")
    if labels.size and labels.max() >= n_classes:
        raise ValueError(f"label {int(labels.max())} outside the {n_classes} classes")
    torch.manual_seed(seed)
    head = nn.Linear(feats.shape[2], n_classes)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[lr_drop_epoch], gamma=0.1)
    x = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    losses = []
    for _ in range(epochs):
        losses.append(train_probe_epoch(head, x, y, grid, opt, batch_size, gen, augment))
        sched.step()
    return head, losses


@torch.no_grad()
def evaluate_probe(head: nn.Linear, feats: np.ndarray, labels: Sequence[np.ndarray], grid: tuple[int, int],
                   class_names: Sequence[str], batch_size: int = 32) -> dict[str, Any]:
    """mIoU and pixel accuracy of the head's class maps against ``labels`` (each ``(H, W)``, -1 = ignore)."""
    head.eval()
    n = len(class_names)
    conf = RunningConfusion(n, n, ignore_index=None)
    for s in range(0, feats.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(feats[s : s + batch_size], dtype=np.float32))
        for i, gt in enumerate(labels[s : s + batch_size]):
            pred = probe_logits(head, x[i : i + 1], grid, tuple(gt.shape)).argmax(1)[0].numpy()
            conf.update(gt, pred)
    return identity_scores(conf.conf, class_names)


def identity_scores(conf: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """:func:`transfgu.metrics.segmentation_scores`'s IoU and accuracy for a class predictor (column c = class c)."""
    conf = np.asarray(conf, dtype=np.int64)
    s = mapped_scores(conf, np.arange(conf.shape[1]), [str(c) for c in class_names])
    return {"mIoU": s["mIoU"], "pixel_accuracy": s["pixel_accuracy"], "per_class_iou": s["per_class_iou"],
            "n_pixels": int(conf.sum())}
