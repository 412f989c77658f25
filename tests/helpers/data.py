"""Paths to the real shared images and to the committed test assets, and synthetic data several modules use."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

#: The repository root.
REPO = Path(__file__).resolve().parents[2]
#: Committed test assets (the stand-in prior's weights).
ASSETS = REPO / "tests" / "assets"
#: The real images with ground truth: ``../shared/data`` next to the repository, or ``TRANSFGU_SHARED_DATA``.
SHARED_DATA = Path(os.environ.get("TRANSFGU_SHARED_DATA", REPO.parent / "shared" / "data"))


def camvid_subset(root: Path, n: int, broken: int | None = None) -> tuple[Path, list[str]]:
    """A CamVid tree at ``root`` with the first ``n`` real training images and their labels; with ``broken``, that
    image's file is overwritten with bytes no decoder accepts. Returns the root and the image names."""
    import shutil

    src = require_shared_data("camvid")
    for sub in ("images/train", "labels/train"):
        (root / sub).mkdir(parents=True)
    shutil.copy(src / "classes.txt", root / "classes.txt")
    names = sorted(p.stem for p in (src / "images" / "train").glob("*.jpg"))[:n]
    for name in names:
        shutil.copy(src / "images" / "train" / f"{name}.jpg", root / "images" / "train" / f"{name}.jpg")
        shutil.copy(src / "labels" / "train" / f"{name}.png", root / "labels" / "train" / f"{name}.png")
    if broken is not None:
        (root / "images" / "train" / f"{names[broken]}.jpg").write_bytes(b"not a jpeg at all")
    return root, names


def require_shared_data(name: str = "") -> Path:
    """Path to ``../shared/data/<name>``; fails under CI, skips elsewhere, when it is missing."""
    path = SHARED_DATA / name if name else SHARED_DATA
    if not path.exists():
        msg = f"shared data not found at {path} (set TRANSFGU_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


# -- synthetic concepts ------------------------------------------------------------------------------------------------
def concepts_near_cls(bb, x, k: int):
    """``k`` concepts near the images' own CLS tokens (backbone ``bb`` on images ``x``), so cosine objectives have
    gradients of both signs."""
    import torch

    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        cls = bb(x).cls
    base = cls[torch.arange(k) % cls.shape[0]]
    return base + 0.5 * base.std() * torch.randn(base.shape, generator=g)


# -- synthetic k-means data ------------------------------------------------------------------------------------------
#: float64 sums in the Ray k-means, float32 sums in faiss: centroids agree to ~1e-6 relative; 1e-4 absolute on O(1)
#: data is ample and still far below any real difference (a point moving between clusters shifts a mean by ~1e-2).
KMEANS_ATOL = 1e-4


def blobs(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    """``n`` float32 points in ``d`` dimensions around ``centers`` Gaussian centres (scale 4, unit noise)."""
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=4.0, size=(centers, d))
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


class _Rec:
    """One image's crop records as ``features_table`` reads them (only ``cls`` and ``pool`` matter here)."""

    def __init__(self, cls: np.ndarray, pools: list[str]) -> None:
        n = cls.shape[0]
        self.crop_index = np.arange(n)
        self.scale = np.full(n, 0.5, np.float32)
        self.box = np.zeros((n, 4), np.int32)
        self.pool = np.asarray(pools)
        self.cls = cls


def write_feature_shards(tmp_path: Path, x: np.ndarray, pools: list[str], n_files: int) -> list[Path]:
    """Split rows into ``n_files`` Parquet shards of the features schema (uneven sizes on purpose)."""
    from transfgu.store.formats import features_table, write_parquet_atomic

    cuts = np.sort(np.random.default_rng(5).choice(np.arange(1, len(x)), n_files - 1, replace=False))
    files = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(x)])):
        t = features_table([f"img{i}"], "train", [_Rec(x[a:b], pools[a:b])])
        p = tmp_path / f"part-{i:05d}.parquet"
        write_parquet_atomic(t, p)
        files.append(p)
    return files
