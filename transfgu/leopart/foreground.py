"""Step 2: the noisy foreground mask from the last block's CLS attention (Leopart's code, step 2; docs/leopart.md).

The attention over patches (averaged over heads; DINO's ``visualize_attention`` picks the best head with ground truth
instead) is blurred with a Gaussian (kernel 7, sigma 0.6), the patches holding the top ``mass`` = 65 % of the
attention are kept, and connected components of at most 2 patches are dropped. Used only to score the CBFE clusters.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def gaussian_blur(a: np.ndarray, kernel: int, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with reflect padding: ``torchvision.transforms.functional.gaussian_blur``'s
    definition (kernel ``exp(-x^2 / 2 sigma^2)`` on ``x = -(k-1)/2 .. (k-1)/2``, normalised), in float32."""
    x = np.linspace(-(kernel - 1) / 2, (kernel - 1) / 2, kernel)
    g = np.exp(-0.5 * (x / sigma) ** 2)
    g = (g / g.sum()).astype(np.float32)
    r = kernel // 2
    p = np.pad(np.asarray(a, dtype=np.float32), r, mode="reflect")
    p = np.apply_along_axis(lambda v: np.convolve(v, g, mode="valid"), 0, p)
    return np.apply_along_axis(lambda v: np.convolve(v, g, mode="valid"), 1, p).astype(np.float32)


def top_mass_mask_np(a: np.ndarray, mass: float) -> np.ndarray:
    """Boolean mask of the largest values of ``a`` that together hold ``mass`` of its total.

    DINO's rule: sort ascending, normalise, keep the entries whose cumulative sum exceeds ``1 - mass``.
    """
    flat = np.asarray(a, dtype=np.float64).ravel()
    total = flat.sum()
    if total <= 0:
        return np.zeros(np.shape(a), dtype=bool)
    order = np.argsort(flat, kind="stable")
    cum = np.cumsum(flat[order] / total)
    keep = np.zeros(flat.size, dtype=bool)
    keep[order] = cum > (1.0 - mass)
    return keep.reshape(np.shape(a))


def drop_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Remove 8-connected components with fewer than ``min_size`` pixels."""
    if min_size <= 1 or not mask.any():
        return mask
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False
    return keep[lab]


def attention_mask(
    attn: np.ndarray, grid: tuple[int, int], mass: float = 0.65, kernel: int = 7, sigma: float = 0.6,
    min_component: int = 3,
) -> np.ndarray:
    """Noisy foreground mask ``(h*w,)`` bool of one image's head-mean CLS attention ``(h*w,)``."""
    h, w = grid
    a = np.asarray(attn, dtype=np.float32).reshape(h, w)
    if kernel > 1 and min(h, w) > kernel // 2:  # reflect padding needs the map to be wider than the pad
        a = gaussian_blur(a, kernel, sigma)
    m = top_mass_mask_np(a, mass)
    return drop_small_components(m, min_component).ravel()
