"""Dense shards held in memory, projected by the PCA: what the k-means, CBFE and co-occurrence steps read.

One :class:`DenseShards` holds a group of dense-feature files (the one-process executor: all of them; the Ray
executor: one group per actor) and answers every question per file, in file order, so the driver reduces the same
numbers in the same order whichever executor asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfgu.kmeans import Stats, l2_normalize, nearest, shard_stats
from transfgu.leopart import cbfe as cbfe_mod
from transfgu.leopart.communities import cooccurrence_stats
from transfgu.leopart.dense import read_dense
from transfgu.leopart.foreground import attention_mask
from transfgu.leopart.model import LeopartModel, upsample_labels
from transfgu.leopart.pca import PCA


class DenseShards:
    """Points (PCA of the patch tokens) and attention masks of a group of dense files.

    ``select_foreground`` restricts the points that ``counts``/``rows``/``stats`` see to CBFE foreground patches.
    Every method answers per file, in file order, except those in :data:`PER_FILE`, which take a file index first
    (what :meth:`transfgu.method.Executor.hold` needs to spread the files over several holders).
    """

    PER_FILE = ("rows",)

    def __init__(self, files: Sequence[str | Path], pca: PCA, mask: dict[str, Any] | None = None) -> None:
        self.files = [str(f) for f in files]
        self.ids: list[list[str]] = []
        self.grids: list[list[tuple[int, int]]] = []
        self.offsets: list[np.ndarray] = []
        self.points: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        mask = mask or {}
        for f in self.files:
            imgs = read_dense(f)
            self.ids.append([im.image_id for im in imgs])
            self.grids.append([im.grid for im in imgs])
            sizes = [im.feats.shape[0] for im in imgs]
            self.offsets.append(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
            if imgs:
                self.points.append(pca.transform(np.concatenate([im.feats for im in imgs])))
                self.masks.append(np.concatenate([attention_mask(im.attn, im.grid, **mask) for im in imgs]))
            else:
                self.points.append(np.zeros((0, pca.dim), dtype=np.float32))
                self.masks.append(np.zeros(0, dtype=bool))
        self.selection: list[np.ndarray | None] = [None] * len(self.files)
        self._unit: tuple[list, list[np.ndarray]] | None = None

    def _selected(self, f: int) -> np.ndarray:
        sel = self.selection[f]
        return self.points[f] if sel is None else self.points[f][sel]

    def select_all(self) -> list[int]:
        self.selection = [None] * len(self.files)
        return self.counts()

    def select_foreground(self, model: LeopartModel) -> list[int]:
        self.selection = [model.foreground_mask(p) if len(p) else np.zeros(0, bool) for p in self.points]
        return self.counts()

    # -- the k-means protocol -------------------------------------------------------------------------------------
    def counts(self) -> list[int]:
        return [int(self._selected(f).shape[0]) for f in range(len(self.files))]

    def rows(self, file: int, local_rows: Sequence[int]) -> np.ndarray:
        return self._selected(file)[np.asarray(local_rows, dtype=np.int64)]

    def stats(self, centroids: np.ndarray, normalize: bool) -> list[Stats]:
        if not normalize:
            return [shard_stats(self._selected(f), centroids, False) for f in range(len(self.files))]
        if self._unit is None or self._unit[0] is not self.selection:  # unit rows once per selection, not per step
            self._unit = (self.selection, [l2_normalize(self._selected(f)) for f in range(len(self.files))])
        return [shard_stats(u, centroids, False) for u in self._unit[1]]

    # -- method statistics ----------------------------------------------------------------------------------------
    def _per_image(self, f: int, values: np.ndarray) -> list[np.ndarray]:
        o = self.offsets[f]
        return [values[o[i] : o[i + 1]] for i in range(len(o) - 1)]

    def precision_stats(self, model: LeopartModel) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per file: CBFE precision sums and occurrence counts (:func:`transfgu.leopart.cbfe.precision_stats`)."""
        k = model.cbfe_centroids.shape[0]
        out = []
        for f in range(len(self.files)):
            labels = model.cbfe_labels(self.points[f]) if len(self.points[f]) else np.zeros(0, np.int64)
            out.append(cbfe_mod.precision_stats(self._per_image(f, labels), self._per_image(f, self.masks[f]), k))
        return out

    def label_maps(self, model: LeopartModel, what: str) -> list[list[tuple[str, np.ndarray]]]:
        """Per file, per image: ``(image_id, (h, w) map)`` of ``cbfe`` clusters, ``clusters`` or ``segments``."""
        fn = {"cbfe": model.cbfe_labels, "clusters": model.clusters, "segments": model.segments}[what]
        out = []
        for f in range(len(self.files)):
            lab = fn(self.points[f]) if len(self.points[f]) else np.zeros(0, np.int64)
            per = self._per_image(f, lab)
            out.append([(i, m.reshape(g)) for i, m, g in zip(self.ids[f], per, self.grids[f])])
        return out

    def assign_maps(self, centroids: np.ndarray, normalize: bool) -> list[list[tuple[str, np.ndarray]]]:
        """Per file, per image: ``(image_id, (h, w) map)`` of the nearest of ``centroids`` (overclustering)."""
        out = []
        for f in range(len(self.files)):
            lab = nearest(self.points[f], centroids, normalize) if len(self.points[f]) else np.zeros(0, np.int64)
            per = self._per_image(f, lab)
            out.append([(i, m.reshape(g)) for i, m, g in zip(self.ids[f], per, self.grids[f])])
        return out

    def cooc_stats(self, model: LeopartModel, size: tuple[int, int] | None,
                   offsets: Sequence[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per file: co-occurrence sums of the foreground-cluster maps (node k = background)."""
        n = model.k_community + 1
        out = []
        for file_maps in self.label_maps(model, "clusters"):
            total = (np.zeros((n, n)), np.zeros(n, dtype=np.int64))
            # images of one size are counted in one vectorised call
            by_size: dict[tuple[int, int], list[np.ndarray]] = {}
            for _, m in file_maps:
                mm = upsample_labels(m, size) if size is not None else m
                by_size.setdefault(mm.shape, []).append(mm)
            for maps in by_size.values():
                s, c = cooccurrence_stats(np.stack(maps), n, offsets)
                total = (total[0] + s, total[1] + c)
            out.append(total)
        return out
