"""Pictures of a Leopart run: the community graph (clusters as nodes, co-occurrence edges, colour = segment)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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
