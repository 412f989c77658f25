"""The fitted CBFE + CD model: PCA, CBFE centroids and foreground flags, foreground-cluster centroids and the
cluster -> segment map; segmentation of patch features, save/load without pickle, prediction on new images.

Files (``<run>/model/``): ``leopart.safetensors`` (every array) and ``model.json`` (format ``leopart-model/1``,
backbone, sizes, class names, the cluster -> class matching found at evaluation, the config).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from transfgu.kmeans import nearest
from transfgu.leopart.pca import PCA
from transfgu.model_meta import CheckpointMeta
from transfgu.store import fix_mode

log = logging.getLogger(__name__)

MODEL_FORMAT = "leopart-model/1"
ARRAYS_FILE = "leopart.safetensors"


@dataclass
class LeopartModel:
    pca: PCA
    cbfe_centroids: np.ndarray  # (K, p) unit rows
    foreground: np.ndarray  # (K,) bool
    cd_centroids: np.ndarray | None = None  # (k, p) foreground overclustering
    cluster_to_segment: np.ndarray | None = None  # (k + 1,) node -> segment, node k = background
    # CBFE flags of the dense files of one directory (a split) that differ from ``foreground``: the authors'
    # protocol recomputes the cluster precision of val from val's own attention masks
    foreground_by_dir: dict[str, np.ndarray] = field(default_factory=dict)

    def for_file(self, path: str | Path) -> LeopartModel:
        """The model with the CBFE flags of ``path``'s directory (itself when that directory has none)."""
        fg = self.foreground_by_dir.get(str(Path(path).parent))
        return self if fg is None else replace(self, foreground=fg)

    @property
    def k_community(self) -> int:
        if self.cd_centroids is None:
            raise ValueError("the model has no foreground clusters yet")
        return int(self.cd_centroids.shape[0])

    @property
    def n_segments(self) -> int:
        if self.cluster_to_segment is None:
            raise ValueError("the model has no communities yet")
        return int(self.cluster_to_segment.max()) + 1

    def project(self, feats: np.ndarray) -> np.ndarray:
        return self.pca.transform(feats)

    def cbfe_labels(self, points: np.ndarray) -> np.ndarray:
        return nearest(points, self.cbfe_centroids, normalize=True)

    def foreground_mask(self, points: np.ndarray) -> np.ndarray:
        """CBFE: a patch is foreground when its (spherical) cluster is."""
        return self.foreground[self.cbfe_labels(points)]

    def clusters(self, points: np.ndarray) -> np.ndarray:
        """Foreground cluster of every patch, ``k`` (the background node) for CBFE background patches."""
        k = self.k_community
        out = np.full(points.shape[0], k, dtype=np.int64)
        fg = self.foreground_mask(points)
        if fg.any():
            out[fg] = nearest(points[fg], self.cd_centroids, normalize=False)
        return out

    def segments(self, points: np.ndarray) -> np.ndarray:
        if self.cluster_to_segment is None:
            raise ValueError("the model has no communities yet")
        return self.cluster_to_segment[self.clusters(points)]

    # -- files ----------------------------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "pca_mean": self.pca.mean, "pca_std": self.pca.std, "pca_components": self.pca.components,
            "pca_eigenvalues": self.pca.eigenvalues, "cbfe_centroids": self.cbfe_centroids,
            "cbfe_foreground": self.foreground.astype(np.uint8),
        }
        if self.cd_centroids is not None:
            out["cd_centroids"] = self.cd_centroids
        if self.cluster_to_segment is not None:
            out["cluster_to_segment"] = self.cluster_to_segment.astype(np.int64)
        return {k: np.ascontiguousarray(v) for k, v in out.items()}

    def save_arrays(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.arrays(), str(tmp))
        fix_mode(tmp)  # safetensors writes 0600; the umask decides
        tmp.replace(path)

    @classmethod
    def load_arrays(cls, path: str | Path, n_pca: int = 0) -> LeopartModel:
        return cls.from_arrays(load_file(str(path)), n_pca)

    @classmethod
    def from_arrays(cls, t: dict[str, np.ndarray], n_pca: int = 0) -> LeopartModel:
        pca = PCA(t["pca_mean"], t["pca_std"], t["pca_components"], t["pca_eigenvalues"], n_pca)
        return cls(pca, t["cbfe_centroids"], t["cbfe_foreground"].astype(bool), t.get("cd_centroids"),
                   t.get("cluster_to_segment"))


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """torch's ``nearest`` source index: ``min(floor(i * (float32) n_in / n_out), n_in - 1)``, in float32."""
    if n_in == n_out:
        return np.arange(n_out)
    scale = np.float32(n_in) / np.float32(n_out)
    src = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(src, n_in - 1)


def upsample_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer ``(h, w)`` map with torch's ``F.interpolate(mode="nearest")`` rule
    (the rule the ground truth is resized with), in numpy so that shard actors need not import torch."""
    lab = np.asarray(labels)
    rows = _nearest_index(lab.shape[0], int(size[0]))
    cols = _nearest_index(lab.shape[1], int(size[1]))
    return lab[rows[:, None], cols[None, :]].astype(np.int64)


class LeopartPredictor(CheckpointMeta):
    """A loaded CBFE + CD checkpoint with the interface of :class:`transfgu.predict.Predictor`."""

    def __init__(self, backbone: Any, model: LeopartModel, meta: dict[str, Any], device: Any,
                 amp_dtype: Any = None, batch_size: int = 8) -> None:
        self.backbone, self.model, self.meta, self.device = backbone, model, meta, device
        self.amp_dtype, self.batch_size = amp_dtype, batch_size

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.meta["input_size"][0]), int(self.meta["input_size"][1])

    @property
    def n_clusters(self) -> int:
        return self.model.n_segments

    def predict(self, images: np.ndarray | Sequence[np.ndarray], as_classes: bool = False,
                batch_size: int | None = None) -> np.ndarray | list[np.ndarray]:
        """Segment ids (or matched class ids, -1 = unmatched) at each input's original size."""
        from transfgu.leopart.dense import dense_features

        single = isinstance(images, np.ndarray) and images.ndim == 3
        stacked = isinstance(images, np.ndarray) and images.ndim == 4
        items = [images] if single else list(images)
        mapping = self.cluster_to_class
        if as_classes and mapping is None:
            raise ValueError("this checkpoint has no segment -> class matching (evaluate the run first)")
        outs = dense_features(self.backbone, items, self.input_size, self.device, batch_size or self.batch_size,
                              self.amp_dtype)
        result = []
        for im, (feats, _, grid) in zip(items, outs):
            seg = self.model.segments(self.model.project(feats)).reshape(grid)
            lab = upsample_labels(seg, (int(im.shape[0]), int(im.shape[1])))
            if as_classes:
                lab = mapping[lab]
            result.append(lab.astype(np.int64))
        if single:
            return result[0]
        if stacked:
            return np.stack(result)
        return result


def save_leopart_model(directory: Path, model: LeopartModel, meta: dict[str, Any], backbone: Any = None) -> None:
    """``leopart.safetensors`` + ``model.json`` (+ the backbone when it is random, as TransFGU's checkpoint)."""
    from transfgu.checkpoint import BACKBONE_FILE, _save_tensors
    from transfgu.store import atomic_write_json

    directory.mkdir(parents=True, exist_ok=True)
    model.save_arrays(directory / ARRAYS_FILE)
    if backbone is not None and not getattr(backbone, "pretrained", True):
        _save_tensors(backbone.vit.state_dict(), directory / BACKBONE_FILE)
        meta = {**meta, "backbone_file": BACKBONE_FILE}
    atomic_write_json(directory / "model.json", {**meta, "format": MODEL_FORMAT})


def load_predictor(ckpt: Path, meta: dict[str, Any], device: Any, weights: str | None = None,
                   amp_dtype: Any = None, batch_size: int = 8) -> LeopartPredictor:
    from transfgu.predict import _build_backbone
    from transfgu.schemas import check_leopart_arrays

    arrays = load_file(str(ckpt / ARRAYS_FILE))
    check_leopart_arrays(ckpt / ARRAYS_FILE, arrays, meta, ckpt / "model.json")
    backbone = _build_backbone(ckpt, meta, weights).to(device).eval()
    model = LeopartModel.from_arrays(arrays)
    if model.cluster_to_segment is None:
        raise ValueError(f"{ckpt} holds no community map (the communities stage did not finish)")
    if not meta["backbone"].get("pretrained", False):
        log.info("checkpoint %s uses a RANDOM backbone: its predictions are not the method's", ckpt)
    return LeopartPredictor(backbone, model, meta, device, amp_dtype, batch_size)


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
