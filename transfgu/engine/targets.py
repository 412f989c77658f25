"""Training targets of the TransFGU decoder (as the authors' code builds them; docs/fidelity.md).

:func:`make_targets`: crop-wise min-max normalisation, background channel (eq. 8), teacher mix (eq. 12), hard labels
and class-axis-permuted negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Variant = Literal["thingstuff", "things"]


@dataclass
class Targets:
    """Training targets of one batch."""

    hard: Tensor  # (B, h, w) int64, argmax of ``soft``
    negative: Tensor  # (B, h, w) int64, pi^-1(hard) for one batch-wide permutation pi of the classes
    fg_mask: Tensor | None  # (B, h, w) bool, max_k P~_k > T_bg ("things" variant only)
    soft: Tensor  # (B, C, h, w) the bootstrapped label maps M^ (eq. 12), C = K (+1 for "things")


def minmax_normalise(pseudo: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-sample min-max over all channels and pixels (the reference's first target step).

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
    """Bootstrapped targets from RoI-aligned pseudo-label crops (as the reference builds them).

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
