"""Bootstrapping losses and the teacher/student round schedule (eq. 13-16; the authors' code, docs/fidelity.md).

All loss functions take logits ``(B, C, h, w)`` straight from the decoder (after its class-dim LayerNorm) and
return scalar tensors. The schedule helpers are plain Python: they say, per epoch, whether the teacher exists,
whether this epoch starts a new round ("reboot": teacher <- student, student <- initial weights) and which
peer weight alpha is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: alpha of the peer loss by epoch index inside a round (reference ``alpha_list``); the last value repeats.
ALPHA_LIST: tuple[float, ...] = (0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10)


# -- losses --------------------------------------------------------------------------------------------------
def peer_loss(
    logits: Tensor,
    target: Tensor,
    negative_target: Tensor | None = None,
    alpha: float = 0.0,
    ignore_index: int = -100,
) -> Tensor:
    """Peer loss, eq. 13: ``CE(P, M_hat) - alpha * CE(P, M_hat')``.

    Args:
        logits: ``(B, C, h, w)`` decoder logits.
        target: ``(B, h, w)`` int64 hard bootstrapped labels.
        negative_target: ``(B, h, w)`` labels after the class-axis permutation (eq. 13); ``None`` (or
            ``alpha == 0``) gives plain cross-entropy, eq. 9, as used before bootstrapping starts.
        alpha: weight of the negative term.
        ignore_index: label value excluded from both means.
    """
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index)
    if negative_target is not None and alpha != 0.0:
        loss = loss - alpha * F.cross_entropy(logits, negative_target, ignore_index=ignore_index)
    return loss


def uncertainty_loss(
    logits: Tensor,
    fg_mask: Tensor | None = None,
    exclude_channel0: bool = False,
    empty_fg: Literal["zero", "nan"] = "zero",
) -> Tensor:
    """Uncertainty loss, eq. 14: ``1 - mean(p' - p'')``, p' and p'' the top-2 softmax probabilities per pixel.

    * "thingstuff" variant (COCO-Stuff, Cityscapes): ``fg_mask=None, exclude_channel0=False``: softmax over
      all C channels, mean over all pixels.
    * "things" variant (VOC, COCO-80, LIP): ``exclude_channel0=True`` (channel 0 is background: the softmax is
      over the foreground channels only) and ``fg_mask`` = ``(B, h, w)`` bool, the pixels whose normalised
      pseudo label exceeds T_bg (as the reference); the mean is over those pixels only.

    An empty ``fg_mask`` gives a mean over no pixels. The reference then produces NaN, which makes the whole
    step skipped by its ``loss > 0`` rule. Here ``empty_fg="zero"`` (default) returns 0 (still attached to the
    graph, so the other loss terms of the batch train normally); ``empty_fg="nan"`` reproduces the reference.

    With a single channel left (one foreground class) p'' does not exist: the margin is 1 and the loss 0.
    """
    x = logits[:, 1:] if exclude_channel0 else logits
    if x.shape[1] < 2:
        return logits.sum() * 0.0
    top2 = x.softmax(dim=1).topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]  # (B, h, w)
    if fg_mask is None:
        return 1.0 - margin.mean()
    # Masked mean computed on the device: ``margin[fg_mask]`` and ``if fg_mask.any()`` would each synchronise the
    # host with the GPU every step.
    m = fg_mask.to(margin.dtype)
    count = m.sum()
    if empty_fg == "nan":
        return 1.0 - (margin * m).sum() / count  # 0 / 0 = NaN for an empty mask, as the reference
    loss = 1.0 - (margin * m).sum() / count.clamp_min(1.0)
    return torch.where(count > 0, loss, logits.sum() * 0.0)


def diversity_loss(class_emb: Tensor) -> Tensor:
    """Diversity loss, eq. 15 as the reference code computes it.

    Mean over images and over all class pairs i < j of ``1 + cos(e_i, e_j)``, for class embeddings
    ``(B, K, D)``. (The paper's ``1 + sum(C C^T / sqrt(d)) / K^2`` is not what was trained.) With K = 1 there
    is no pair and the loss is 0.
    """
    b, k, _ = class_emb.shape
    if k < 2:
        return class_emb.sum() * 0.0
    e = F.normalize(class_emb, dim=-1)
    cos = e @ e.transpose(1, 2)  # (B, K, K)
    iu = torch.triu_indices(k, k, offset=1, device=class_emb.device)
    return (1.0 + cos[:, iu[0], iu[1]]).mean()


@dataclass(frozen=True)
class LossWeights:
    """Weights of eq. 16; the defaults are the paper's and the reference's (``loss.weights = "1,0.3,1"``)."""

    peer: float = 1.0
    div: float = 1.0
    unc: float = 0.3


@dataclass
class LossTerms:
    """The total loss (eq. 16) and its parts, as tensors attached to the graph."""

    total: Tensor
    peer: Tensor
    diversity: Tensor
    uncertainty: Tensor


def total_loss(
    logits: Tensor,
    target: Tensor,
    class_emb: Tensor,
    negative_target: Tensor | None = None,
    alpha: float = 0.0,
    fg_mask: Tensor | None = None,
    exclude_channel0: bool = False,
    w_div: float = 1.0,
    w_unc: float = 0.3,
    w_peer: float = 1.0,
    ignore_index: int = -100,
    empty_fg: Literal["zero", "nan"] = "zero",
) -> LossTerms:
    """Eq. 16: ``w_peer * L_peer + w_div * L_div + w_unc * L_unc`` (reference: 1, 1 and 0.3).

    The reference's ``loss.weights = "1,0.3,1"`` are (categorical, uncertainty, diversity).
    """
    lp = peer_loss(logits, target, negative_target, alpha, ignore_index=ignore_index)
    ld = diversity_loss(class_emb)
    lu = uncertainty_loss(logits, fg_mask=fg_mask, exclude_channel0=exclude_channel0, empty_fg=empty_fg)
    return LossTerms(total=w_peer * lp + w_div * ld + w_unc * lu, peer=lp, diversity=ld, uncertainty=lu)


# -- schedule ------------------------------------------------------------------------------------------------
def alpha_schedule(epoch_iter: int, alphas: tuple[float, ...] = ALPHA_LIST) -> float:
    """Peer weight alpha for the ``epoch_iter``-th epoch of a round (0 = the reboot epoch), the reference's schedule."""
    if epoch_iter < 0:
        raise ValueError(f"epoch_iter must be >= 0, got {epoch_iter}")
    return float(alphas[min(epoch_iter, len(alphas) - 1)])


def teacher_interval(epoch: int, intervals: int | tuple[int, ...] | list[int], epoch_step: int = 10) -> int:
    """Round length in force at ``epoch``: ``intervals[min(epoch // epoch_step, len - 1)]`` (the reference's)."""
    if isinstance(intervals, int):
        return intervals
    return int(intervals[min(epoch // epoch_step, len(intervals) - 1)])


def parse_intervals(spec: int | str | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """``"3,3,3,2"`` / ``3`` / ``[3, 2]`` -> ``(3, 3, 3, 2)``; the reference configs give strings."""
    if isinstance(spec, int):
        values: tuple[int, ...] = (spec,)
    elif isinstance(spec, str):
        values = tuple(int(s) for s in spec.split(",") if s.strip())
    else:
        values = tuple(int(s) for s in spec)
    if not values or any(v < 1 for v in values):
        raise ValueError(f"teacher intervals must be positive integers, got {spec!r}")
    return values


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does: see :class:`BootstrapSchedule`."""

    epoch: int
    bootstrapping: bool  # a teacher exists and its prediction is mixed into the targets
    reboot: bool  # at the start of this epoch: teacher <- student, student <- initial weights
    epoch_iter: int  # epochs since the last reboot (0 on a reboot epoch)
    alpha: float  # peer weight; 0.0 before bootstrapping (plain CE, eq. 9)


class BootstrapSchedule:
    """Teacher/student rounds of the reference (eq. 10-12).

    Epochs are 0-based. For ``epoch < start_epoch`` there is no teacher. For ``epoch >= start_epoch`` the
    epoch is a reboot when ``epoch % teacher_interval(epoch) == 0`` (and always at ``start_epoch`` itself).
    ``epoch_iter`` is reset to 0 on a reboot and grows by one every other epoch; ``alpha
    = alpha_schedule(epoch_iter)`` while bootstrapping. The plan of an epoch is a pure function of the epoch
    number, so a resumed run gets the same schedule.

    Args:
        intervals: round lengths per block of ``epoch_step`` epochs, e.g. ``"3,3,3,2"`` or ``2``.
        start_epoch: ``bootstrapping_start_epoch`` of the reference.
        epoch_step: epochs per entry of ``intervals`` (10 in the reference).
        alphas: the alpha list.
    """

    def __init__(
        self,
        intervals: int | str | tuple[int, ...] | list[int],
        start_epoch: int,
        epoch_step: int = 10,
        alphas: tuple[float, ...] = ALPHA_LIST,
    ) -> None:
        if start_epoch < 0 or epoch_step < 1:
            raise ValueError("start_epoch must be >= 0 and epoch_step >= 1")
        self.intervals = parse_intervals(intervals)
        self.start_epoch = start_epoch
        self.epoch_step = epoch_step
        self.alphas = tuple(alphas)

    def is_reboot(self, epoch: int) -> bool:
        if epoch < self.start_epoch:
            return False
        # The first bootstrapping epoch always reboots so that a teacher exists; in every reference config
        # start_epoch is a multiple of its interval anyway, so this only matters for unusual settings.
        return (
            epoch == self.start_epoch or epoch % teacher_interval(epoch, self.intervals, self.epoch_step) == 0
        )

    def plan(self, epoch: int) -> EpochPlan:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        bootstrapping = epoch >= self.start_epoch
        reboot = self.is_reboot(epoch)
        last = next((e for e in range(epoch, self.start_epoch - 1, -1) if self.is_reboot(e)), 0)
        epoch_iter = epoch - last  # epochs since the last reboot (since epoch 0 before the first one)
        alpha = alpha_schedule(epoch_iter, self.alphas) if bootstrapping else 0.0
        return EpochPlan(
            epoch=epoch, bootstrapping=bootstrapping, reboot=reboot, epoch_iter=epoch_iter, alpha=alpha
        )

    def reboot_epochs(self, n_epochs: int) -> list[int]:
        """Epochs in ``[0, n_epochs)`` that start a new round."""
        return [e for e in range(n_epochs) if self.is_reboot(e)]
