"""Pictures of a Leopart run: the community graph (clusters as nodes, co-occurrence edges, colour = segment), the
foreground-mask panel and the helpers of the cluster galleries (the report draws them: :mod:`transfgu.leopart.report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def community_graph_png(
    edges: Sequence[tuple[int, int, float]], cluster_to_segment: np.ndarray, bg_node: int, path: str | Path,
    title: str = "",
) -> Path:
    """Nodes on a circle grouped by segment (background segment 0 first), edge width ~ weight; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transfgu.viz import palette

    seg = np.asarray(cluster_to_segment)
    n = seg.shape[0]
    order = np.lexsort((np.arange(n), seg))  # by segment, then node id
    angle = np.empty(n)
    angle[order] = 2 * np.pi * np.arange(n) / n
    xy = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    colours = palette(int(seg.max()) + 1) / 255.0
    fig, ax = plt.subplots(figsize=(7, 7), dpi=100)
    wmax = max((w for _, _, w in edges), default=1.0)
    for i, j, w in edges:
        same = seg[i] == seg[j]
        ax.plot(*xy[[i, j]].T, color=colours[seg[i]] if same else "0.75", lw=0.3 + 2.5 * w / wmax,
                alpha=0.8 if same else 0.4, zorder=1)
    ax.scatter(xy[:, 0], xy[:, 1], s=30, c=colours[seg], edgecolors="k", linewidths=0.3, zorder=2)
    ax.scatter(*xy[bg_node], s=160, marker="*", c="k", zorder=3, label="background node")
    ax.set_title(title or f"{n} clusters, {len(edges)} edges, {int(seg.max())} foreground segments")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_axis_off()
    ax.set_aspect("equal")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def _kmeans_labels(x: np.ndarray, k: int, seed: int = 0, niter: int = 20) -> np.ndarray:
    """Spherical k-means labels of the rows of ``x`` (a few images' patches: small, plain numpy)."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    rng = np.random.default_rng(seed)
    c = x[rng.choice(len(x), size=min(k, len(x)), replace=False)]
    for _ in range(niter):
        lab = (x @ c.T).argmax(1)
        for j in range(len(c)):
            if (lab == j).any():
                v = x[lab == j].sum(0)
                c[j] = v / max(np.linalg.norm(v), 1e-8)
    return (x @ c.T).argmax(1)


def finetune_pictures_png(images: Sequence[np.ndarray], backbones: dict[str, object], size: int, k: int,
                          path: str | Path) -> Path:
    """Rows = images; for every backbone (e.g. before / after fine-tuning): the head-mean CLS attention of the last
    block and a ``k``-cluster map of the patch tokens (spherical k-means over the shown images' patches, so the
    colours of one column are comparable across rows). PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import torch.nn.functional as F

    from transfgu.models.backbone import normalize
    from transfgu.viz import palette

    x = torch.stack([F.interpolate(torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float(), size=(size, size),
                                   mode="bilinear", align_corners=False)[0] for im in images])
    cols: list[tuple[str, np.ndarray]] = []
    for name, bb in backbones.items():
        with torch.no_grad():
            f = bb.eval()(normalize(x))  # type: ignore[operator]
        h, w = f.grid
        attn = f.attn_cls.mean(1).reshape(len(images), h, w).numpy()
        feats = f.patch.reshape(-1, f.patch.shape[-1]).numpy()
        lab = _kmeans_labels(feats, k).reshape(len(images), h, w)
        cols += [(f"{name}: attention", attn), (f"{name}: {k} clusters", palette(k)[lab])]
    fig, axes = plt.subplots(len(images), 1 + len(cols), figsize=(2.2 * (1 + len(cols)), 2.2 * len(images)),
                             dpi=90, squeeze=False)
    for r in range(len(images)):
        axes[r, 0].imshow(x[r].permute(1, 2, 0).numpy().astype(np.uint8))
        for c, (title, arr) in enumerate(cols, start=1):
            axes[r, c].imshow(arr[r], cmap="inferno" if arr.ndim == 3 else None, interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
        for ax in axes[r]:
            ax.set_axis_off()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def foreground_panel(rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]],
                     n_segments: int | None = None) -> Any:
    """Per image: photo | head-mean CLS attention | noisy attention mask | CBFE foreground | segments.

    ``rows``: ``(caption, image (H, W, 3) uint8, attention (H, W) float, mask (H, W) bool, foreground (H, W) bool,
    segments (H, W) int or None)``, every map already at the image's size. Masks are drawn over the photo in red.
    """
    from transfgu.viz import _plt, draw_panel, overlay, palette

    plt = _plt()
    n = len(rows)
    aspect = rows[0][1].shape[0] / rows[0][1].shape[1] if rows else 1.0
    fig, axes = plt.subplots(n, 5, figsize=(5 * 2.4, n * (2.4 * aspect + 0.35) + 0.2), squeeze=False)
    red = np.array([[214, 39, 40]], dtype=np.uint8)
    seg_colours = palette(max(n_segments or 1, 1))
    for r, (caption, image, attn, mask, fg, seg) in enumerate(rows):
        panels: list[tuple[Any, str, dict[str, Any]]] = [
            (image, caption, {}),
            (attn, "CLS attention (head mean)", {"cmap": "inferno"}),
            (overlay(image, np.where(mask, 0, -1), red, 0.55), "attention mask", {}),
            (overlay(image, np.where(fg, 0, -1), red, 0.55), "CBFE foreground", {}),
            (overlay(image, seg, seg_colours, 0.6) if seg is not None else None, "segments (communities)", {}),
        ]
        for c, (img, t, kw) in enumerate(panels):
            draw_panel(axes[r][c], img, t, "no communities yet", **kw)
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.03, hspace=0.25, top=0.95 if n > 1 else 0.88, bottom=0.01)
    return fig


def patch_box(patch_map: np.ndarray, value: int, image_hw: tuple[int, int]) -> tuple[int, int, int, int] | None:
    """Pixel box ``(y0, y1, x0, x1)`` of the patches of ``patch_map`` equal to ``value``, in an image of size
    ``image_hw`` that the patch grid tiles evenly (the dense stage's resized input); None when none is."""
    rows, cols = np.nonzero(np.asarray(patch_map) == value)
    if rows.size == 0:
        return None
    gh, gw = patch_map.shape
    ph, pw = image_hw[0] / gh, image_hw[1] / gw
    return (int(round(rows.min() * ph)), int(round((rows.max() + 1) * ph)),
            int(round(cols.min() * pw)), int(round((cols.max() + 1) * pw)))


def top_images(maps: Sequence[tuple[str, np.ndarray]], value: int, n: int) -> list[tuple[str, float]]:
    """The ``n`` images where ``value`` covers the largest fraction of the patch map (largest first, ties by
    order), as ``(image_id, fraction)``; images without it are left out."""
    scored = [(i, float(np.mean(np.asarray(m) == value))) for i, m in maps]
    scored = [s for s in scored if s[1] > 0]
    order = sorted(range(len(scored)), key=lambda j: (-scored[j][1], j))
    return [scored[j] for j in order[:n]]
