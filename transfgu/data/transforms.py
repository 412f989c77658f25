"""Decoded images -> tensors for the models: the one preprocessing of training, evaluation, prediction and export.

Every image reaches the backbone the same way: a uint8 ``(H, W, 3)`` RGB array is resized (bilinear,
``align_corners=False``, no anti-aliasing, as the reference does) and normalised with the ImageNet statistics
(:func:`transfgu.models.backbone.normalize`). Bilinear resizing commutes with the per-channel normalisation, so
resizing before normalising equals the reference's normalise-then-resize (the authors' training and evaluation).

* :func:`to_model_input` returns the normalised float tensor (feature extraction, pseudo labels, prediction, export);
* :func:`to_uint8_chw` returns the resized image still as uint8 (training and evaluation loaders keep uint8 in
  memory and normalise on the device, after augmentation: :func:`transfgu.engine.augment.augment_batch`);
* :func:`to_label_tensor` returns a label map resized with nearest neighbour.

(:func:`transfgu.data.io.resize_image` is different on purpose: numpy in, numpy out, anti-aliased, for pictures in
the report.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from transfgu.models.backbone import normalize

__all__ = ["to_model_input", "to_uint8_chw", "to_label_tensor"]


def _chw_float(img: np.ndarray) -> torch.Tensor:
    # np.require: decoded PIL arrays can be read-only, which torch.from_numpy warns about
    return torch.from_numpy(np.require(img, requirements=["C", "W"])).permute(2, 0, 1)[None].float()


def to_model_input(img: np.ndarray, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ImageNet-normalised ``(3, h, w)``; ``nearest`` is the reference's COCO mode."""
    x = _chw_float(img)
    if mode == "nearest":
        x = F.interpolate(x, size=tuple(size), mode="nearest")
    else:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    return normalize(x[0])


def to_uint8_chw(img: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> uint8 ``(3, h, w)`` resized bilinearly (the train and eval loaders)."""
    x = F.interpolate(_chw_float(img), size=tuple(size), mode="bilinear", align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def to_label_tensor(label: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Integer ``(H, W)`` label map -> int64 ``(h, w)`` resized with nearest neighbour."""
    x = torch.from_numpy(np.require(label, requirements=["C", "W"])).long()[None, None].float()
    return F.interpolate(x, size=tuple(size), mode="nearest")[0, 0].long()
