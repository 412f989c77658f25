"""Distributed k-means (Ray tasks over Parquet shards) against single-process faiss k-means and a naive Lloyd."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.data import KMEANS_ATOL as ATOL
from helpers.data import blobs as _blobs
from helpers.data import write_feature_shards as _write_shards

from transfgu.kmeans import kmeans
from transfgu.store.formats import read_features

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

def _naive_lloyd(x: np.ndarray, init: np.ndarray, niter: int) -> np.ndarray:
    """Textbook Lloyd (keep a centroid whose cluster empties), then the plain means of the last assignment."""
    c = init.astype(np.float64)
    for _ in range(niter + 1):
        d = ((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1)
        lab = d.argmin(1)
        new = c.copy()
        for j in range(len(c)):
            if (lab == j).any():
                new[j] = x[lab == j].mean(0)
        c = new
    return c.astype(np.float32)


def test_same_as_single_process_faiss_random_init(ray_local, tmp_path):
    from transfgu.distributed.kmeans import distributed_kmeans

    x = _blobs(900, 12, 6, seed=0)
    pools = ["fg" if i % 3 else "bg" for i in range(len(x))]
    files = _write_shards(tmp_path, x, pools, n_files=5)
    _, cls_fg = read_features(tmp_path, pools=["fg"])
    _, cls_bg = read_features(tmp_path, pools=["bg"])
    res = distributed_kmeans(files, {"fg": 5, "bg": 3}, niter=15, seed=1, num_tasks=3)
    for pool, xs, k in (("fg", cls_fg, 5), ("bg", cls_bg, 3)):
        ref = kmeans(xs, k, niter=15, seed=1, use_gpu=False)
        np.testing.assert_allclose(res[pool].centroids, ref.centroids, atol=ATOL)
        assert res[pool].inertia == pytest.approx(ref.inertia, rel=1e-5)
        assert res[pool].n_points == len(xs)


def test_same_as_naive_lloyd_with_given_init(ray_local, tmp_path):
    from transfgu.distributed.kmeans import distributed_kmeans

    x = _blobs(400, 6, 4, seed=1)
    files = _write_shards(tmp_path, x, ["all"] * len(x), n_files=4)
    init = x[[3, 50, 100, 399]].copy()
    res = distributed_kmeans(files, {"all": 4}, niter=7, init_centroids={"all": init}, num_tasks=2)
    np.testing.assert_allclose(res["all"].centroids, _naive_lloyd(x, init, 7), atol=ATOL)
    np.testing.assert_allclose(res["all"].centroids, kmeans(x, 4, niter=7, init_centroids=init).centroids, atol=ATOL)


def test_empty_cluster_is_split_like_faiss(ray_local, tmp_path):
    from transfgu.distributed.kmeans import distributed_kmeans

    x = _blobs(300, 4, 2, seed=2)
    files = _write_shards(tmp_path, x, ["all"] * len(x), n_files=3)
    init = np.concatenate([x[:2], np.full((1, 4), 1e3, np.float32)])  # the far centroid gets no point
    res = distributed_kmeans(files, {"all": 3}, niter=5, init_centroids={"all": init}, num_tasks=3)
    ref = kmeans(x, 3, niter=5, init_centroids=init)
    np.testing.assert_allclose(res["all"].centroids, ref.centroids, atol=ATOL)
    assert np.abs(res["all"].centroids).max() < 100  # the empty cluster was re-seeded, not kept far away


def test_too_few_points(ray_local, tmp_path):
    from transfgu.distributed.kmeans import distributed_kmeans

    files = _write_shards(tmp_path, _blobs(10, 3, 2, 0), ["all"] * 10, n_files=2)
    with pytest.raises(ValueError, match="fewer than its k"):
        distributed_kmeans(files, {"all": 11}, niter=2)
