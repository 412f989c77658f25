"""Host -> device: pinned asynchronous copies and batch preparation off the model's path.

* :func:`to_device` pins a host tensor and copies it with ``non_blocking=True``: the copy overlaps with kernels
  already queued instead of synchronising the stream (a plain ``.to("cuda")`` of pageable memory waits).
* :func:`prepare_images` resizes + normalises a group of decoded images into one (pinned) batch, so that work can
  run in the prefetch thread instead of in front of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from transfgu.data.transforms import to_model_input


def pin(x: Tensor) -> Tensor:
    """Page-locked copy of a CPU tensor when CUDA is present (else ``x``): needed for truly async copies."""
    if x.device.type == "cpu" and torch.cuda.is_available() and not x.is_pinned():
        return x.pin_memory()
    return x


def to_device(x: Tensor, device: torch.device | str) -> Tensor:
    """``x.to(device)`` that does not stall the CUDA stream: pinned source, ``non_blocking=True``.

    Safe for pageable sources too (CUDA stages them before the call returns); on CPU it is a no-op.
    """
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type == "cuda":
        return pin(x).to(device, non_blocking=True)
    return x.to(device)


def prepare_images(images: Sequence[np.ndarray], size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Decoded uint8 ``(H, W, 3)`` images -> one ImageNet-normalised ``(B, 3, h, w)`` float batch (pinned on CUDA
    machines), exactly :func:`transfgu.data.transforms.to_model_input` per image; runs in the prefetch thread."""
    if len(images) == 0:
        return torch.empty(0, 3, int(size[0]), int(size[1]))
    return pin(torch.stack([to_model_input(im, (int(size[0]), int(size[1])), mode) for im in images]))
