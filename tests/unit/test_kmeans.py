"""The one sharded k-means driver (transfgu.kmeans.lloyd_kmeans) against faiss itself and a brute-force Lloyd."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers.data import REPO

from transfgu.kmeans import ArrayShards, KMeansResult, kmeans, l2_normalize, lloyd_kmeans

ATOL = 1e-4  # float64 sums here, float32 in faiss


def _blobs(n: int, d: int, centers: int, seed: int, offset: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=4.0, size=(centers, d)) + offset
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


def _faiss(x: np.ndarray, k: int, **kw) -> np.ndarray:
    km = faiss.Kmeans(x.shape[1], k, **{"max_points_per_centroid": 10**7, **kw})
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=kw.pop("init", None))
    return km.centroids


@pytest.mark.parametrize("spherical", [False, True])
def test_restarts_use_faiss_seeds_and_keep_faiss_best(spherical):
    x = _blobs(700, 6, 9, seed=3, offset=2.0)
    shards = ArrayShards(np.array_split(x, 3))
    fit = lloyd_kmeans(shards, 8, niter=6, seed=5, nredo=4, spherical=spherical)
    ref = _faiss(x, 8, niter=6, seed=5, nredo=4, spherical=spherical)
    np.testing.assert_allclose(fit.centroids, ref, atol=ATOL)
    assert fit.redo > 0  # the kept restart is not the first: the restart seeds are faiss's


@pytest.mark.parametrize("spherical", [False, True])
def test_subsampling_is_faiss_default_subsampling(spherical):
    x = _blobs(2000, 5, 6, seed=4, offset=1.0)
    shards = ArrayShards(np.array_split(x, 5))
    fit = lloyd_kmeans(shards, 6, niter=10, seed=7, spherical=spherical, max_points_per_centroid=30)
    ref = _faiss(x, 6, niter=10, seed=7, spherical=spherical, max_points_per_centroid=30)
    np.testing.assert_allclose(fit.centroids, ref, atol=ATOL)
    assert fit.n_points == 2000
    # the subsample matters: with every point the centroids differ
    full = lloyd_kmeans(shards, 6, niter=10, seed=7, spherical=spherical)
    assert not np.allclose(full.centroids, fit.centroids, atol=1e-3)
    # faiss's default (256 per centroid) leaves these 2000 points alone: 6 * 256 < 2000 does subsample
    np.testing.assert_allclose(
        lloyd_kmeans(shards, 6, niter=10, seed=7, spherical=spherical, max_points_per_centroid=256).centroids,
        _faiss(x, 6, niter=10, seed=7, spherical=spherical, max_points_per_centroid=256), atol=ATOL)


def _brute_spherical_raw(x: np.ndarray, c: np.ndarray, niter: int) -> np.ndarray:
    """Lloyd with unit centroids on the raw points: nearest by L2 to the unit centroid, mean of the raw members,
    normalised (no cluster empties on this data)."""
    c = c / np.linalg.norm(c, axis=1, keepdims=True)
    for _ in range(niter):
        lab = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[lab == j].mean(0) for j in range(len(c))])
        c = c / np.linalg.norm(c, axis=1, keepdims=True)
    return c


def test_raw_versus_normalized_spherical():
    """Raw points with unit centroids (faiss spherical, the authors' choice) and L2-normalised points are different
    clusterings; each equals faiss on its own input and a brute-force Lloyd."""
    rng = np.random.default_rng(8)
    x = (_blobs(600, 4, 5, seed=8, offset=3.0) * rng.uniform(0.2, 5.0, size=(600, 1))).astype(np.float32)
    shards = ArrayShards(np.array_split(x, 4))
    raw = lloyd_kmeans(shards, 5, niter=12, seed=2, spherical=True, normalize=False)
    unit = lloyd_kmeans(shards, 5, niter=12, seed=2, spherical=True, normalize=True)
    np.testing.assert_allclose(raw.centroids, _faiss(x, 5, niter=12, seed=2, spherical=True), atol=ATOL)
    np.testing.assert_allclose(unit.centroids, _faiss(l2_normalize(x), 5, niter=12, seed=2, spherical=True),
                               atol=ATOL)
    init = x[faiss_rows(len(x), 5, 2)]
    np.testing.assert_allclose(raw.centroids, _brute_spherical_raw(x, init, 12), atol=ATOL)
    assert not np.allclose(raw.centroids, unit.centroids, atol=1e-3)


def faiss_rows(n: int, k: int, seed: int) -> np.ndarray:
    from transfgu.kmeans import init_rows

    return init_rows(n, k, seed)


def test_empty_cluster_split_and_means_step_equal_the_in_memory_kmeans():
    x = _blobs(300, 4, 2, seed=2)
    init = np.concatenate([x[:2], np.full((1, 4), 1e3, np.float32)])  # the far centroid gets no point
    fit = lloyd_kmeans(ArrayShards(np.array_split(x, 3)), 3, niter=5, init_centroids=init, means_step=True)
    ref = kmeans(x, 3, niter=5, init_centroids=init, use_gpu=False)
    assert isinstance(fit, KMeansResult) and isinstance(ref, KMeansResult)
    np.testing.assert_allclose(fit.centroids, ref.centroids, atol=ATOL)
    assert fit.inertia == pytest.approx(ref.inertia, rel=1e-5)
    assert np.abs(fit.centroids).max() < 100


def test_in_memory_kmeans_passes_the_faiss_options_through():
    x = _blobs(1500, 5, 4, seed=9, offset=2.0)
    res = kmeans(x, 4, niter=8, seed=3, use_gpu=False, max_points_per_centroid=40, spherical=True)
    km = faiss.Kmeans(5, 4, niter=8, seed=3, max_points_per_centroid=40, spherical=True)
    km.train(x)
    lab = ((x[:, None, :] - km.centroids[None]) ** 2).sum(-1).argmin(1)
    means = np.stack([x[lab == j].mean(0) for j in range(4)])  # the means step after faiss
    np.testing.assert_allclose(res.centroids, means, atol=ATOL)
    assert res.n_points == 1500 and res.assignments is not None


def test_bad_options_fail_with_a_message():
    shards = ArrayShards([_blobs(20, 3, 2, 0)])
    with pytest.raises(ValueError, match="fewer than its k=30"):
        lloyd_kmeans(shards, 30, niter=2)
    with pytest.raises(ValueError, match="max_points_per_centroid"):
        lloyd_kmeans(shards, 2, niter=2, max_points_per_centroid=0)
    with pytest.raises(ValueError, match="nredo"):
        lloyd_kmeans(shards, 2, niter=2, nredo=0)


def test_leopart_kmeans_settings_are_explicit_and_hashed_only_when_set():

    from transfgu.config import load_config
    from transfgu.leopart.pipeline import kmeans_options
    from transfgu.methods import stage_hashes
    from transfgu.store.manifest import config_hash

    conf = REPO / "conf" / "leopart_horse.yaml"
    default = load_config(conf)
    assert kmeans_options(default.leopart) == {"normalize": True, "max_points_per_centroid": None}
    paper = load_config(conf, ["leopart.kmeans_points=raw", "leopart.kmeans_max_points_per_centroid=256",
                               "leopart.community_nredo=2"])
    assert kmeans_options(paper.leopart) == {"normalize": False, "max_points_per_centroid": 256}
    h0, h1 = stage_hashes(default), stage_hashes(paper)
    assert h0["pca"] == h1["pca"]
    assert all(h0[s] != h1[s] for s in ("cbfe", "communities", "evaluate"))
    # the defaults keep the hash of a config written before these settings existed
    lp = default.leopart.model_dump(mode="json")
    old = ["protocol", "attn_mass", "blur_kernel", "blur_sigma", "min_component", "k_cbfe", "cbfe_niter", "cbfe_nredo",
           "precision_threshold", "seed"]
    assert h0["cbfe"] == config_hash({"up": h0["pca"], **{k: lp[k] for k in old}})
