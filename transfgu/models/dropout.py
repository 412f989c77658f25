"""Dropout with caller-given masks, keyed per sample (the authors' decoder dropout 0.1; docs/fidelity.md row 16).

``nn.Dropout`` draws its masks from the global RNG in the order the batch happens to be laid out, so W
data-parallel ranks, each holding a slice of the global batch, cannot draw the masks one process would. Here the
masks are drawn *before* the forward pass, one uniform vector per sample from a generator seeded with that
sample's key (the training loop uses ``step_seed(seed, epoch, step, 1 + position in the global batch)``), and the
layers only apply them. A sample's masks are then a pure function of its key, whatever rank holds it, and the
forward pass holds no generator (so ``torch.compile`` sees plain tensor inputs).

The distribution is ``nn.Dropout``'s: every element is kept independently with probability ``1 - p`` and a kept
element is scaled by ``1 / (1 - p)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MaskedDropout(nn.Module):
    """``nn.Dropout(p)`` that applies a given boolean keep-mask when one is passed.

    Without a mask it is ``nn.Dropout`` (global RNG); in eval mode, or with ``p = 0``, it is the identity and the
    mask is ignored. No parameters, no buffers: swapping it for ``nn.Dropout`` leaves the ``state_dict`` unchanged.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0.0

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        if not self.active:
            return x
        if keep is None:
            return F.dropout(x, self.p, training=True)
        return x * keep * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def draw_keep_masks(
    shapes: Sequence[tuple[int, ...]],
    p: float,
    batch: int,
    device: torch.device | str,
    keys: Sequence[int] | None = None,
) -> list[Tensor]:
    """Boolean keep-masks ``(batch, *shape)`` for every per-sample ``shape``, each element kept with prob. ``1 - p``.

    With ``keys`` (one per sample), sample ``b`` draws one uniform vector over all its mask elements, in the order
    of ``shapes``, from a ``device`` generator seeded with ``keys[b]``: its masks depend on its key only (not on
    the batch it sits in). Without ``keys`` the whole batch is drawn from the global RNG in one call.
    The cost is one uniform fill per sample (plus one comparison), small next to the attention it masks.
    """
    if keys is not None and len(keys) != batch:
        raise ValueError(f"{len(keys)} keys for a batch of {batch}")
    device = torch.device(device)
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    if keys is None:
        u = torch.rand(batch, total, device=device)
    else:
        u = torch.empty(batch, total, device=device)
        g = torch.Generator(device=device)
        for b, key in enumerate(keys):
            g.manual_seed(int(key))
            u[b].uniform_(0.0, 1.0, generator=g)
    keep = u < (1.0 - p)
    out, lo = [], 0
    for s, n in zip(shapes, sizes, strict=True):
        out.append(keep[:, lo : lo + n].view(batch, *s))  # a view: each row's piece is contiguous
        lo += n
    return out
