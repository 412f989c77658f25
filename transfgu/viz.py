"""Pictures of a run: colour palettes and overlays, concept galleries, CAM panels, prediction vs ground truth,
confusion matrix and per-class IoU plots.

Everything takes plain arrays and returns uint8 images or matplotlib figures (Agg backend, no display needed);
:mod:`transfgu.report` decides what to draw and where to write it. matplotlib is imported lazily, so
``transfgu predict --overlay`` only pays for numpy.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "cam_panel",
    "colorize",
    "concept_gallery",
    "confusion_figure",
    "draw_panel",
    "iou_bar_figure",
    "overlay",
    "palette",
    "prediction_panel",
    "save_figure",
]

# Distinct, colour-blind-friendlier first colours (Tableau 10 + Set 1/Paired picks); more come from the golden angle.
_BASE = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        (255, 255, 51), (166, 206, 227), (178, 223, 138), (251, 154, 153), (253, 191, 111),
        (202, 178, 214), (106, 61, 154), (177, 89, 40), (0, 0, 128), (128, 0, 0),
    ],
    dtype=np.uint8,
)


def palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 colours, the same for the same id in every picture of a run (deterministic)."""
    if n <= len(_BASE):
        return _BASE[:n].copy()
    extra = []
    for i in range(n - len(_BASE)):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.35 * ((i // 7) % 2)
        v = 0.95 - 0.3 * ((i // 3) % 2)
        extra.append([round(255 * c) for c in colorsys.hsv_to_rgb(h, s, v)])
    return np.concatenate([_BASE, np.asarray(extra, dtype=np.uint8)])


def colorize(label: np.ndarray, colours: np.ndarray, invalid: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """``(H, W)`` ids -> ``(H, W, 3)`` uint8; ids outside ``[0, len(colours))`` (ignore, unmatched) get ``invalid``."""
    label = np.asarray(label)
    ok = (label >= 0) & (label < len(colours))
    out = np.empty((*label.shape, 3), dtype=np.uint8)
    out[...] = np.asarray(invalid, dtype=np.uint8)
    out[ok] = colours[label[ok]]
    return out


def overlay(image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the colour-coded ``label`` over ``image`` (uint8 ``(H, W, 3)``); invalid ids leave the image as is."""
    image = np.asarray(image)
    if image.shape[:2] != np.shape(label):
        raise ValueError(f"image {image.shape[:2]} and label {np.shape(label)} sizes differ")
    col = colorize(label, colours).astype(np.float32)
    ok = ((np.asarray(label) >= 0) & (np.asarray(label) < len(colours)))[..., None]
    mixed = (1 - alpha) * image.astype(np.float32) + alpha * col
    return np.where(ok, mixed, image).round().clip(0, 255).astype(np.uint8)


# -- matplotlib figures ----------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Save ``fig`` as PNG and close it (figures are not kept alive by pyplot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight", facecolor="white")
    _plt().close(fig)
    return path


def _legend_handles(names: Sequence[str], colours: np.ndarray) -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(facecolor=colours[i] / 255.0, edgecolor="black", linewidth=0.3, label=n) for i, n in enumerate(names)]


def draw_panel(ax: Any, image: np.ndarray | None, title: str, missing: str, **imshow: Any) -> None:
    """One panel of a figure grid: ``image`` (``imshow`` options passed on) under ``title``, no ticks; the text
    ``missing`` in its place when ``image`` is None."""
    ax.set_xticks([])
    ax.set_yticks([])
    if image is None:
        ax.text(0.5, 0.5, missing, ha="center", va="center", transform=ax.transAxes)
    else:
        ax.imshow(image, **imshow)
    ax.set_title(title, fontsize=9)


def concept_gallery(
    crops: Sequence[Sequence[np.ndarray]],
    row_titles: Sequence[str],
    title: str = "",
    thumb_inches: float = 1.0,
) -> Figure:
    """One row per concept: the crops nearest its centroid, nearest first (uint8 ``(h, w, 3)`` thumbnails)."""
    plt = _plt()
    rows = len(crops)
    cols = max([len(c) for c in crops] + [1])
    fig_h = rows * thumb_inches + (0.5 if title else 0.1)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * thumb_inches + 1.8, fig_h), squeeze=False)
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(crops[r]):
                ax.imshow(crops[r][c])
        axes[r][0].set_ylabel(row_titles[r], rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.1 / fig_h, va="top")
    # Margins in inches, not fractions, so tall galleries get no gap under the title.
    fig.subplots_adjust(wspace=0.04, hspace=0.06, top=1 - (0.45 if title else 0.05) / fig_h, bottom=0.05 / fig_h)
    return fig


def cam_panel(
    image: np.ndarray,
    maps: np.ndarray,
    titles: Sequence[str],
    ncols: int = 6,
    title: str = "",
) -> Figure:
    """The image, then each response map upsampled to it (``maps``: ``(K, h, w)``), one shared colour scale."""
    import torch
    import torch.nn.functional as F

    plt = _plt()
    maps = np.asarray(maps, dtype=np.float32)
    hh, ww = image.shape[:2]
    up = F.interpolate(torch.from_numpy(maps)[None], size=(hh, ww), mode="bilinear", align_corners=False)[0].numpy()
    n = 1 + len(up)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    aspect = hh / ww
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * 2.2, nrows * 2.2 * aspect + 0.6), squeeze=False)
    vmax = float(max(up.max(), 1e-6)) if up.size else 1.0
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
            ax.imshow(image)
            ax.set_title("image", fontsize=9)
        elif i < n:
            ax.imshow(image)
            im = ax.imshow(up[i - 1], cmap="jet", alpha=0.55, vmin=0.0, vmax=vmax)
            ax.set_title(titles[i - 1], fontsize=9)
        else:
            ax.axis("off")
    if len(up):
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, pad=0.01, label="response")
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def prediction_panel(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]],
    names: Sequence[str],
    colours: np.ndarray,
    pred_title: str = "prediction",
) -> Figure:
    """Per image: photo | ground truth | prediction | prediction over the photo, with one legend.

    ``rows``: ``(caption, image, gt or None, pred)``; label values outside ``[0, len(names))`` (ignore,
    unmatched) are drawn black.
    """
    plt = _plt()
    n = len(rows)
    aspect = rows[0][1].shape[0] / rows[0][1].shape[1] if rows else 0.75
    panel_w = 12.0 * 0.98 / (4 + 3 * 0.03)  # axes width in inches with the margins set below
    fig_h = n * (panel_w * aspect + 0.35) + 0.3
    fig, axes = plt.subplots(n, 4, figsize=(4 * 3.0, fig_h), squeeze=False)
    used: set[int] = set()
    for r, (caption, image, gt, pred) in enumerate(rows):
        panels = [
            (image, caption),
            (colorize(gt, colours) if gt is not None else None, "ground truth"),
            (colorize(pred, colours), pred_title),
            (overlay(image, pred, colours), "overlay"),
        ]
        for c, (img, t) in enumerate(panels):
            draw_panel(axes[r][c], img, t, "no ground truth")
        for lab in (gt, pred):
            if lab is not None:
                ids = np.unique(lab)
                used.update(int(i) for i in ids if 0 <= i < len(names))
    keep = sorted(used)
    handles = _legend_handles([names[i] for i in keep], colours[keep]) if keep else []
    legend_in = 0.15 + 0.2 * math.ceil(len(handles) / 6) if handles else 0.05  # inches below the panels
    fig_h += legend_in
    fig.set_size_inches(12.0, fig_h)
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
    fig.subplots_adjust(left=0.01, right=0.99, wspace=0.03, hspace=0.35 / (panel_w * aspect),
                        top=1 - 0.3 / fig_h, bottom=legend_in / fig_h)
    return fig


def confusion_figure(conf: np.ndarray, names: Sequence[str], title: str = "") -> Figure:
    """Row-normalised confusion matrix (GT rows, matched predictions as columns); cells show row percentages."""
    plt = _plt()
    conf = np.asarray(conf, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    n = len(names)
    size = max(4.0, min(0.42 * n + 2.0, 22.0))
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    fs = 8 if n <= 30 else 5
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=fs)
    ax.set_yticklabels(names, fontsize=fs)
    ax.set_xlabel("predicted (matched) class")
    ax.set_ylabel("ground-truth class")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                if rows[i, 0] > 0 and norm[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=6.5,
                            color="white" if norm[i, j] > 0.55 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, label="fraction of the GT class")
    if title:
        ax.set_title(title, fontsize=11)
    return fig


def iou_bar_figure(per_class_iou: Mapping[str, float | None], miou: float | None = None, title: str = "") -> Figure:
    """Horizontal bars of per-class IoU (percent); classes absent from GT and prediction are marked n/a."""
    plt = _plt()
    names = list(per_class_iou)
    vals = [per_class_iou[k] for k in names]
    absent = [v is None or (isinstance(v, float) and math.isnan(v)) for v in vals]
    pct = [0.0 if a else 100.0 * float(v) for v, a in zip(vals, absent)]
    n = len(names)
    fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.28 * n + 1.2)))
    y = np.arange(n)
    colours = ["#bbbbbb" if a else "#1f77b4" for a in absent]
    ax.barh(y, pct, color=colours)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8 if n <= 40 else 5)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    for yi, p, a in zip(y, pct, absent):
        ax.text(p + 1, yi, "n/a" if a else f"{p:.1f}", va="center", fontsize=7)
    if miou is not None and not math.isnan(miou):
        ax.axvline(100 * miou, color="#d62728", linestyle="--", linewidth=1)
        ax.text(100 * miou + 1, -0.9, f"mIoU {100 * miou:.1f}", color="#d62728", fontsize=8, va="bottom")
    if title:
        ax.set_title(title, fontsize=11, pad=14)
    ax.grid(axis="x", alpha=0.3)
    return fig
