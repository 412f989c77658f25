"""Tests of transfgu.concepts: faiss k-means against naive numpy Lloyd's, blobs, the concept bank on disk."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest
from helpers.data import require_shared_data
from PIL import Image

from transfgu.concepts import ConceptBank, fit_concepts
from transfgu.kmeans import assign, kmeans, lloyd_step_stats


@pytest.fixture(autouse=True)
def _few_threads():
    faiss.omp_set_num_threads(2)


def _blobs(k: int, d: int, n_per: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(k, d) * sep + rng.normal(size=(k, d))  # all pairs about sep * sqrt(2) apart
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + rng.normal(size=(k * n_per, d))
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), labels[perm]


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to relabelling: the contingency table is a permutation matrix (times the cluster sizes)."""
    ka, kb = a.max() + 1, b.max() + 1
    table = np.zeros((ka, kb), dtype=np.int64)
    np.add.at(table, (a, b), 1)
    return ka == kb and bool(((table > 0).sum(0) == 1).all() and ((table > 0).sum(1) == 1).all())


def _naive_lloyd(x: np.ndarray, c0: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Textbook Lloyd's in float64: assign to nearest, move each non-empty centroid to its members' mean."""
    x = x.astype(np.float64)
    c = c0.astype(np.float64).copy()
    inertias = []
    labels = np.zeros(len(x), dtype=np.int64)
    for _ in range(steps):
        d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        labels = d2.argmin(1)
        inertias.append(float(d2[np.arange(len(x)), labels].sum()))
        for j in range(len(c)):
            if (labels == j).any():
                c[j] = x[labels == j].mean(0)
    return c, labels, inertias


def _real_pixels(n_max: int = 6000) -> np.ndarray:
    """RGB values of a real photo: a realistic, not well-separated clustering problem."""
    root = require_shared_data("weizmann_horse")
    img = np.asarray(Image.open(sorted((root / "images" / "train").glob("*.jpg"))[0]).convert("RGB"))
    x = img.reshape(-1, 3).astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    # jitter below the 8-bit step: quantised colours make exact distance ties that Lloyd's breaks arbitrarily
    x = x + rng.uniform(-0.5, 0.5, size=x.shape) / 255.0
    return x[rng.permutation(len(x))[:n_max]].astype(np.float32)


# ----------------------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("init", "nredo"), [("random", 10), ("kmeans++", 1)])
def test_kmeans_recovers_separated_blobs(init, nredo):
    for seed in range(2):
        x, truth = _blobs(k=6, d=16, n_per=100, sep=30.0, seed=seed)
        res = kmeans(x, 6, niter=30, seed=1, use_gpu=False, nredo=nredo, init=init)
        assert _same_partition(res.assignments, truth)
        means = np.stack([x[truth == j].astype(np.float64).mean(0) for j in range(6)])
        within = sum(((x[truth == j] - means[j]) ** 2).sum() for j in range(6))
        assert res.inertia == pytest.approx(within, rel=1e-5)
        assert res.centroids.dtype == np.float32 and res.centroids.shape == (6, 16)


def test_kmeans_reference_settings_are_faiss_defaults_plus_means_step():
    # the reference: faiss.Clustering, L2, 100 iterations, seed 1, no subsampling, random init, one run; then the means.
    x, _ = _blobs(k=4, d=8, n_per=200, sep=30.0, seed=7)
    res = kmeans(x, 4, use_gpu=False)
    ref = faiss.Kmeans(8, 4, niter=100, seed=1, max_points_per_centroid=10**7)
    ref.train(x)
    want_c, want_l, _ = _naive_lloyd(x, ref.centroids, 1)
    assert np.array_equal(res.assignments, want_l)
    assert np.abs(res.centroids - want_c).max() < 1e-5
    again = kmeans(x, 4, use_gpu=False)
    assert np.array_equal(res.centroids, again.centroids)  # deterministic for a fixed seed
    # one random-init run can end in a local optimum on blobs (as in the reference); restarts fix that
    best = kmeans(x, 4, use_gpu=False, nredo=10)
    assert best.inertia <= res.inertia


@pytest.mark.parametrize("niter", [0, 1, 4])
def test_kmeans_equals_naive_lloyd_plus_means_step(niter):
    # faiss runs `niter` Lloyd steps from the given init; the means recomputation is one more step.
    x = _real_pixels()
    c0 = x[[10, 2000, 4000, 5999]].copy()
    res = kmeans(x, 4, niter=niter, init_centroids=c0, use_gpu=False)
    want_c, want_l, _ = _naive_lloyd(x, c0, niter + 1)
    assert np.array_equal(res.assignments, want_l)
    assert np.abs(res.centroids - want_c).max() < 1e-5
    # centroids are the plain means of the members, inertia is measured against them
    for j in range(4):
        assert np.allclose(res.centroids[j], x[res.assignments == j].astype(np.float64).mean(0), atol=1e-6)
    naive_inertia = ((x.astype(np.float64) - res.centroids[res.assignments]) ** 2).sum()
    assert res.inertia == pytest.approx(naive_inertia, rel=1e-6)


def test_empty_cluster_keeps_its_faiss_centroid():
    x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    init = np.concatenate([x[:2], np.full((1, 4), 100.0, np.float32)])
    res = kmeans(x, 3, niter=0, init_centroids=init, use_gpu=False)
    assert (res.assignments != 2).all()
    assert np.array_equal(res.centroids[2], init[2])
    assert np.allclose(res.centroids[0], x[res.assignments == 0].mean(0), atol=1e-6)


def test_assign_equals_naive_nearest_centroid():
    x = _real_pixels(3000)
    c = x[:5]
    labels, d2 = assign(x, c)
    naive = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    assert np.array_equal(labels, naive.argmin(1))
    assert np.allclose(d2, naive.min(1), atol=1e-6)
    assert labels.dtype == np.int64 and d2.dtype == np.float32 and (d2 >= 0).all()


def test_lloyd_step_stats_iterated_equals_naive_lloyd():
    x = _real_pixels()
    c = x[[1, 50, 700, 3000, 4500]].copy()
    _, _, naive_inertias = _naive_lloyd(x, c, 6)
    for step in range(6):
        # two shards reduced, as the distributed driver does
        stats = [lloyd_step_stats(s, c) for s in np.array_split(x, 2)]
        sums = sum(s[0] for s in stats)
        counts = sum(s[1] for s in stats)
        inertia = sum(s[2] for s in stats)
        assert sums.dtype == np.float64 and sums.shape == c.shape and counts.sum() == len(x)
        assert inertia == pytest.approx(naive_inertias[step], rel=1e-6)
        c = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], c).astype(np.float32)
    want_c, _, _ = _naive_lloyd(x, x[[1, 50, 700, 3000, 4500]], 6)
    assert np.abs(c - want_c).max() < 1e-5


def test_kmeans_errors():
    x = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="at least k points"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match="2-D"):
        kmeans(np.zeros(5, np.float32), 2)
    with pytest.raises(ValueError, match="NaN"):
        kmeans(np.full((5, 3), np.nan, np.float32), 2)
    with pytest.raises(ValueError, match="init_centroids"):
        kmeans(np.random.rand(10, 3).astype(np.float32), 2, init_centroids=np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="init"):
        kmeans(np.random.rand(10, 3).astype(np.float32), 2, init="farthest")  # type: ignore[arg-type]
    if faiss.get_num_gpus() == 0:
        with pytest.raises(RuntimeError, match="GPU"):
            kmeans(np.random.rand(10, 3).astype(np.float32), 2, use_gpu=True)


# ----------------------------------------------------------------------------------------------------------
# concept bank
# ----------------------------------------------------------------------------------------------------------
def _pools() -> dict[str, np.ndarray]:
    fg, _ = _blobs(k=3, d=8, n_per=60, sep=30.0, seed=1)
    bg, _ = _blobs(k=4, d=8, n_per=50, sep=30.0, seed=2)
    return {"bg": bg + 50.0, "fg": fg, "other": fg[:10]}  # bg listed first on purpose


def test_fit_concepts_orders_fg_first_and_clusters_pools_separately():
    pools = _pools()
    bank = fit_concepts(pools, {"bg": 4, "fg": 3}, niter=20, seed=1)
    assert bank.pools == ["fg"] * 3 + ["bg"] * 4
    assert list(bank.k_per_pool) == ["fg", "bg"]
    assert bank.centroids.shape == (7, 8) and bank.centroids.dtype == np.float32
    assert np.array_equal(bank.centroids[:3], kmeans(pools["fg"], 3, niter=20, seed=1).centroids)
    assert np.array_equal(bank.centroids[3:], kmeans(pools["bg"], 4, niter=20, seed=1).centroids)
    assert bank.centroids[3:].mean() > 25  # bg pool lives around +50: no mixing between pools
    assert bank.n_points == {"fg": 180, "bg": 200}
    assert set(bank.inertia) == {"fg", "bg"}
    assert bank.pool_slice("bg") == slice(3, 7)
    single = fit_concepts({"all": pools["fg"]}, {"all": 3}, niter=5)
    assert single.pools == ["all"] * 3


def test_concept_bank_save_load_round_trip(tmp_path):
    bank = fit_concepts(_pools(), {"fg": 3, "bg": 4}, niter=10, seed=3)
    bank.save(tmp_path / "concepts")
    files = sorted(p.name for p in (tmp_path / "concepts").iterdir())
    assert files == ["centroids.npy", "concepts.json"]  # nothing else (no temp files)
    meta = json.loads((tmp_path / "concepts" / "concepts.json").read_text())
    assert meta["pools"] == bank.pools and meta["k_per_pool"] == {"fg": 3, "bg": 4} and meta["seed"] == 3
    raw = np.load(tmp_path / "concepts" / "centroids.npy", allow_pickle=False)
    assert np.array_equal(raw, bank.centroids)
    back = ConceptBank.load(tmp_path / "concepts")
    assert np.array_equal(back.centroids, bank.centroids) and back.centroids.dtype == np.float32
    assert back.pools == bank.pools and list(back.k_per_pool.items()) == list(bank.k_per_pool.items())
    assert (back.seed, back.niter) == (bank.seed, bank.niter)
    assert (back.inertia, back.n_points) == (bank.inertia, bank.n_points)
    assert back.extra == bank.extra


def test_fit_concepts_errors():
    pools = _pools()
    with pytest.raises(ValueError, match=">= 1"):
        fit_concepts(pools, {"fg": 0})
    with pytest.raises(ValueError, match="fewer than its k"):
        fit_concepts(pools, {"fg": 3, "other": 11})
    with pytest.raises(ValueError, match="no features"):
        fit_concepts(pools, {"stuff": 2})
    with pytest.raises(ValueError):
        fit_concepts(pools, {})
