"""Distributed k-means (Ray tasks over Parquet shards) against single-process faiss k-means and a naive Lloyd."""

from __future__ import annotations

import numpy as np
import pytest

from transfgu.kmeans import kmeans
from transfgu.store.formats import features_table, read_features, write_parquet_atomic

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray

# float64 sums here, float32 sums in faiss: centroids agree to ~1e-6 relative; 1e-4 absolute on O(1) data is ample
# and still far below any real difference (a single point moving between clusters shifts a mean by ~1e-2).
ATOL = 1e-4


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024**2,
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


class _Rec:
    def __init__(self, cls: np.ndarray, pools: list[str]) -> None:
        n = cls.shape[0]
        self.crop_index = np.arange(n)
        self.scale = np.full(n, 0.5, np.float32)
        self.box = np.zeros((n, 4), np.int32)
        self.pool = np.asarray(pools)
        self.cls = cls


def _write_shards(tmp_path, x: np.ndarray, pools: list[str], n_files: int) -> list:
    """Split rows into ``n_files`` Parquet shards of the features schema (uneven sizes on purpose)."""
    cuts = np.sort(np.random.default_rng(5).choice(np.arange(1, len(x)), n_files - 1, replace=False))
    files = []
    for i, (a, b) in enumerate(zip([0, *cuts], [*cuts, len(x)])):
        t = features_table([f"img{i}"], "train", [_Rec(x[a:b], pools[a:b])])
        p = tmp_path / f"part-{i:05d}.parquet"
        write_parquet_atomic(t, p)
        files.append(p)
    return files


def _blobs(n: int, d: int, centers: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(scale=4.0, size=(centers, d))
    return (c[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


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
