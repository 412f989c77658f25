"""Standardisation + PCA of the patch tokens, fit on the training split only (Leopart's code, step 1; docs/leopart.md).

The authors standardise with scikit-learn's ``StandardScaler`` (population variance) and reduce to 50 dimensions with
``faiss.PCAMatrix``, both fit on train + val together (transductive). Here both are fit on the training split, from
statistics that add up over shards -- ``n``, ``sum x`` and ``sum x x^T`` in float64 -- so no process needs every
feature and the Ray executor, which computes them per shard in tasks, reduces them in the same file order as the
one-process loop: the same numbers, bit for bit. The projection equals ``faiss.PCAMatrix`` trained on the
standardised features up to the sign of each component (tested); signs are fixed so that the largest-magnitude
entry of every component is positive.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from transfgu.store.atomic import atomic_write_json, fix_mode

PCA_FILE = "pca.safetensors"


@dataclass
class MomentStats:
    """Additive statistics of a set of rows: count, sum and the Gram matrix (float64)."""

    n: int
    s: np.ndarray  # (d,)
    g: np.ndarray  # (d, d)

    @classmethod
    def of(cls, x: np.ndarray) -> MomentStats:
        x64 = np.asarray(x, dtype=np.float64)
        return cls(int(x64.shape[0]), x64.sum(axis=0), x64.T @ x64)

    def __add__(self, other: MomentStats) -> MomentStats:
        return MomentStats(self.n + other.n, self.s + other.s, self.g + other.g)


def reduce_moments(parts: Iterable[MomentStats]) -> MomentStats:
    """Sum in the given order (callers pass file order, so both executors add the same way)."""
    total: MomentStats | None = None
    for p in parts:
        total = p if total is None else total + p
    if total is None:
        raise ValueError("no statistics to reduce (no training features)")
    return total


@dataclass
class PCA:
    """``y = ((x - mean) / std) @ components.T``."""

    mean: np.ndarray  # (d,) float64
    std: np.ndarray  # (d,) float64, 1 where the variance is 0 (as StandardScaler)
    components: np.ndarray  # (p, d) float64, rows = eigenvectors of the standardised covariance, descending
    eigenvalues: np.ndarray  # (p,)
    n: int

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, x: np.ndarray) -> np.ndarray:
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.std
        return (z @ self.components.T).astype(np.float32)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (PCA_FILE + ".tmp")
        save_file({"mean": self.mean, "std": self.std, "components": self.components,
                   "eigenvalues": self.eigenvalues}, str(tmp))
        fix_mode(tmp)  # safetensors writes 0600; the umask decides
        tmp.replace(directory / PCA_FILE)
        atomic_write_json(directory / "pca.json", {"n": self.n, "dim": self.dim, "in_dim": int(self.mean.shape[0])})

    @classmethod
    def load(cls, directory: str | Path) -> PCA:
        directory = Path(directory)
        t = load_file(str(directory / PCA_FILE))
        meta = json.loads((directory / "pca.json").read_text())
        return cls(t["mean"], t["std"], t["components"], t["eigenvalues"], int(meta["n"]))


def fit_pca(stats: MomentStats, dim: int) -> PCA:
    """Standardise (population variance) and keep the ``dim`` leading eigenvectors of the standardised covariance."""
    if stats.n < 2:
        raise ValueError(f"PCA needs at least 2 feature rows, got {stats.n}")
    d = stats.s.shape[0]
    if dim > d:
        raise ValueError(f"leopart.pca_dim={dim} is larger than the feature width {d}")
    mean = stats.s / stats.n
    cov = stats.g / stats.n - np.outer(mean, mean)
    var = np.clip(np.diag(cov), 0.0, None)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    cov_z = cov / np.outer(std, std)
    vals, vecs = np.linalg.eigh((cov_z + cov_z.T) / 2)
    order = np.argsort(vals)[::-1][:dim]
    comps = vecs[:, order].T
    flip = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])
    comps = comps * flip[:, None]
    return PCA(mean, std, comps, vals[order], stats.n)


def stats_of_files(feats: Sequence[np.ndarray]) -> MomentStats:
    """The statistics of one shard's images (``feats``: per image ``(n_i, d)``)."""
    return MomentStats.of(np.concatenate(feats, axis=0))
