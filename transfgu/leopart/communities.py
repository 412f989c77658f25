"""Steps 5-6: the cluster co-occurrence network and its Infomap communities (Leopart's code; docs/leopart.md).

Co-occurrence (the authors use ``skimage.greycomatrix`` per image, in a Python loop, with at most 256 clusters):
for every image, count the pairs (cluster at p, cluster at p + offset) over the offsets of distances {1, 2} at 8
angles (skimage's rule: offset = (round(sin(angle) d), round(cos(angle) d))), zero the diagonal and normalise every
row to sum 1; then average each row over the images where its cluster occurs. Here one ``bincount`` of
(image, cluster, cluster) codes per offset counts a whole chunk of images (no Python loop over pixels or images, any
number of clusters), and the two sums (of the normalised rows, of the occurrences) add up over shards.

The authors' code (``leopart.protocol: paper``) differs in two details, both selectable: its angle list
(:data:`AUTHORS_ANGLES`: 4 pi / 3 in place of 5 pi / 4) and its presence rule (an image counts for a row only where
the row sums to more than 0, i.e. the cluster has a neighbour of another cluster at one of the offsets).

Network: an undirected edge (i, j) when both conditional probabilities reach the edge threshold, weighted by the
smaller one. Communities: Infomap (``infomap`` package, MapEquation's own), two-level, undirected, with a Markov
time and a preferred number of modules. The background node takes part; the community that holds it -- and every
cluster that is in no community -- becomes segment 0 (background), the other communities segments 1..S.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The angles of the authors' co-occurrence (their list has 4 pi / 3 where 5 pi / 4 would complete 8 even angles).
AUTHORS_ANGLES = (0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4, math.pi, 4 * math.pi / 3, 3 * math.pi / 2,
                  7 * math.pi / 4)


def glcm_offsets(distances: Sequence[int] = (1, 2), n_angles: int = 8,
                 angles: Sequence[float] | None = None) -> list[tuple[int, int]]:
    """(row, col) offsets of ``skimage.feature.graycomatrix`` for these distances and ``n_angles`` even angles (or
    the given ``angles``): ``(round(sin(angle) d), round(cos(angle) d))``, Python's rounding (half to even)."""
    if angles is None:
        angles = [2 * math.pi * a / n_angles for a in range(n_angles)]
    out = []
    for d in distances:
        for angle in angles:
            out.append((int(round(math.sin(angle) * d)), int(round(math.cos(angle) * d))))
    return out


def cooccurrence_stats(
    maps: np.ndarray, n_nodes: int, offsets: Sequence[tuple[int, int]], max_cells: int = 1 << 22
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sum over images of the row-normalised co-occurrence matrices (n, n) float64, images where each node
    occurs (n,), images where each node's row sum is > 0 (n,))``: the last two are the two presence rules (the
    project's label-free default; the authors' code), the denominators of :func:`cooccurrence_matrix`.

    ``maps``: ``(B, H, W)`` integer node ids in ``[0, n_nodes)`` of images of one size. Images are counted in chunks
    of at most ``max_cells`` image x node x node cells, each with one ``bincount`` of (image, node, node) codes over
    all offsets: no Python loop over pixels, any number of nodes.
    """
    maps = np.asarray(maps, dtype=np.int64)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W), got {maps.shape}")
    b, hh, ww = maps.shape
    if maps.size and (maps.min() < 0 or maps.max() >= n_nodes):
        raise ValueError(f"node ids must lie in [0, {n_nodes})")
    n = n_nodes
    total = np.zeros((n, n))
    n_present = np.zeros(n, dtype=np.int64)
    n_rows = np.zeros(n, dtype=np.int64)
    chunk = max(1, max_cells // (n * n))
    diag = np.arange(n)
    for s0 in range(0, b, chunk):
        m = maps[s0 : s0 + chunk]
        bc = m.shape[0]
        base = (np.arange(bc, dtype=np.int64) * n)[:, None, None]
        counts = np.zeros(bc * n * n, dtype=np.int64)
        for dr, dc in offsets:
            r0, r1 = max(0, -dr), min(hh, hh - dr)
            c0, c1 = max(0, -dc), min(ww, ww - dc)
            if r1 <= r0 or c1 <= c0:
                continue
            src = m[:, r0:r1, c0:c1]
            dst = m[:, r0 + dr : r1 + dr, c0 + dc : c1 + dc]
            counts += np.bincount(((base + src) * n + dst).ravel(), minlength=bc * n * n)
        c = counts.reshape(bc, n, n).astype(np.float64)
        c[:, diag, diag] = 0.0
        rows = c.sum(axis=2, keepdims=True)
        total += (c / np.where(rows > 0, rows, 1.0)).sum(axis=0)
        n_present += (np.bincount((base + m).ravel(), minlength=bc * n).reshape(bc, n) > 0).sum(axis=0)
        n_rows += (rows[:, :, 0] > 0).sum(axis=0)
    return total, n_present, n_rows


def cooccurrence_matrix(sum_norm: np.ndarray, n_present: np.ndarray) -> np.ndarray:
    """Row i averaged over the images where node i occurs (zero rows for nodes that never occur)."""
    n = np.asarray(n_present, dtype=np.float64)[:, None]
    return np.where(n > 0, sum_norm / np.where(n > 0, n, 1.0), 0.0)


def network_edges(m: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Undirected edges ``(i, j, w)``, ``i < j``, where both ``m[i, j]`` and ``m[j, i]`` reach ``threshold``;
    ``w = min`` of the two. Zero-weight pairs never make an edge."""
    w = np.minimum(m, m.T)
    iu, ju = np.triu_indices(m.shape[0], k=1)
    keep = (w[iu, ju] >= threshold) & (w[iu, ju] > 0)
    return [(int(i), int(j), float(x)) for i, j, x in zip(iu[keep], ju[keep], w[iu, ju][keep])]


@dataclass
class Communities:
    modules: dict[int, int]  # node -> Infomap module id (nodes without edges are absent)
    codelength: float
    num_modules: int


def detect_communities(
    n_nodes: int, edges: Sequence[tuple[int, int, float]], markov_time: float, n_modules: int | None, seed: int,
    trials: int = 1,
) -> Communities:
    """Two-level undirected Infomap on the co-occurrence network (run in a child process: see
    :mod:`transfgu.leopart.infomap_worker`)."""
    if not edges:
        return Communities({}, 0.0, 0)
    for i, j, _ in edges:
        if not (0 <= i < n_nodes and 0 <= j < n_nodes):
            raise ValueError(f"edge ({i}, {j}) outside the {n_nodes} nodes")
    req = {"edges": [[int(i), int(j), float(w)] for i, j, w in edges], "seed": int(seed) + 1,  # Infomap seeds >= 1
           "trials": int(trials), "markov_time": float(markov_time), "n_modules": n_modules}
    worker = Path(__file__).with_name("infomap_worker.py")
    proc = subprocess.run([sys.executable, str(worker)], input=json.dumps(req), capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"Infomap failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    res = json.loads(proc.stdout)
    return Communities({int(k): int(v) for k, v in res["modules"].items()}, float(res["codelength"]),
                       int(res["num_modules"]))


def community_map(n_nodes: int, modules: dict[int, int], bg_node: int) -> np.ndarray:
    """Node -> segment id: 0 for the background node's community and for nodes in none, then 1.. in the order of
    each community's smallest node id (deterministic)."""
    out = np.zeros(n_nodes, dtype=np.int64)
    bg_module = modules.get(bg_node)
    ids: dict[int, int] = {}
    for node in range(n_nodes):
        mod = modules.get(node)
        if mod is None or mod == bg_module:
            continue
        if mod not in ids:
            ids[mod] = len(ids) + 1
        out[node] = ids[mod]
    return out
