"""Scale rules on a real multi-node Ray cluster (ray.cluster_utils.Cluster): in-memory k-means holders, GPUs that are
requested rather than guessed, storage every node can see."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.configs import tiny_config
from helpers.data import KMEANS_ATOL as ATOL
from helpers.data import blobs as _blobs
from helpers.data import write_feature_shards as _write_shards
from helpers.ray import multi_node_cluster

from transfgu.kmeans import kmeans, lloyd_step_stats
from transfgu.store.formats import read_features

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    """A head with 1 CPU and one worker node with 2 CPUs."""
    with multi_node_cluster(1, [2]) as c:
        yield c


def test_holder_reads_each_shard_once(tmp_path, monkeypatch):
    """After construction, Lloyd statistics read nothing from disk (the shards may even be deleted)."""
    from transfgu.distributed import kmeans as dk

    x = _blobs(300, 8, 4, seed=3)
    files = [str(f) for f in _write_shards(tmp_path, x, ["all"] * len(x), n_files=3)]
    reads = []
    real = dk._read_pool
    monkeypatch.setattr(dk, "_read_pool", lambda path, pool: reads.append(path) or real(path, pool))
    holder = dk.ShardHolder(files, ["all"])
    assert len(reads) == 3
    assert holder.select("all") == [len(real(f, "all")) for f in files]  # (the oracle reads once more)
    expected = [lloyd_step_stats(real(f, "all"), x[:4]) for f in files]  # the from-disk path, as an oracle
    for f in files:
        (tmp_path / f).unlink()
    for _ in range(3):
        got = holder.stats(x[:4], False)
        for g, e in zip(got, expected):
            np.testing.assert_allclose(g[0], e[0])
            np.testing.assert_array_equal(g[1], e[1])
    assert len(reads) == 3  # monkeypatched reads: the holder's construction only
    assert sum(holder.bytes_read()) > 0 and holder.nbytes() == x.nbytes


def test_multinode_kmeans_equals_single_process_faiss(cluster, tmp_path):
    from transfgu.distributed.kmeans import distributed_kmeans

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    x = _blobs(1200, 16, 7, seed=4)
    pools = ["fg" if i % 4 else "bg" for i in range(len(x))]
    files = _write_shards(tmp_path, x, pools, n_files=6)
    res = distributed_kmeans(files, {"fg": 6, "bg": 3}, niter=12, seed=2, num_tasks=3,
                             task_options={"num_cpus": 0.5})
    for pool, k in (("fg", 6), ("bg", 3)):
        _, xs = read_features(tmp_path, pools=[pool])
        ref = kmeans(xs, k, niter=12, seed=2, use_gpu=False)
        np.testing.assert_allclose(res[pool].centroids, ref.centroids, atol=ATOL)
        assert res[pool].inertia == pytest.approx(ref.inertia, rel=1e-5)


def test_auto_gpu_refused_on_a_remote_cluster(cluster, tmp_path):
    from transfgu.distributed.cluster import cluster_has_gpus

    cfg = tiny_config(tmp_path, **{"ray.address": cluster.address})
    with pytest.raises(ValueError, match="ray.use_gpu=auto refuses to guess"):
        cluster_has_gpus(cfg)
    assert cluster_has_gpus(tiny_config(tmp_path, **{"ray.address": cluster.address, "ray.use_gpu": "false"})) is False


def test_required_gpus_that_never_come_fail_clearly(cluster, tmp_path):
    from transfgu.distributed.cluster import cluster_has_gpus

    cfg = tiny_config(tmp_path, **{"ray.address": cluster.address, "ray.use_gpu": "true", "ray.gpu_wait_s": "1"})
    with pytest.raises(RuntimeError, match=r"ray.use_gpu=true but the Ray cluster has no GPU after waiting 1 s"):
        cluster_has_gpus(cfg)


def test_storage_rules_on_a_multinode_cluster(cluster, tmp_path, monkeypatch):
    from transfgu.distributed.cluster import check_storage, task_resources

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    remote = {"ray.address": cluster.address}
    with pytest.raises(ValueError, match="run.root='runs' is relative"):
        check_storage(tiny_config("runs", **remote))
    with pytest.raises(ValueError, match="ray.storage_path is not set"):
        check_storage(tiny_config(tmp_path, **remote))
    warnings = check_storage(tiny_config(tmp_path, **remote, **{"ray.storage_path": str(tmp_path / "shared"),
                                                                "mlflow.enabled": "true"}))
    assert len(warnings) == 1 and "mlflow server" in warnings[0]
    assert check_storage(tiny_config(tmp_path, **remote, **{"ray.storage_path": "s3://bucket/ray",
                                                            "mlflow.enabled": "false"})) == []
    # a private local Ray is one machine: nothing to refuse
    assert check_storage(tiny_config("runs")) == []
    # fractional GPUs and CPUs per GPU actor are passed through, not capped
    cfg = tiny_config(tmp_path, **{"ray.gpus_per_actor": "0.25", "ray.cpus_per_actor": "3"})
    assert task_resources(cfg, gpu=True) == {"num_gpus": 0.25, "num_cpus": 3.0}


def test_driver_takes_the_final_model_from_result_checkpoint(tmp_path):
    """``run_train_ray`` writes ``model/`` from the last fit's ``result.checkpoint`` (Train's storage), not from the
    ``train/`` the driver's node sees; a checkpoint of other settings is refused."""
    from types import SimpleNamespace

    from ray.train import Checkpoint
    from safetensors.torch import load_file

    from transfgu.checkpoint import save_train_state
    from transfgu.distributed.train import finish_from_result
    from transfgu.engine.step import make_optimizer
    from transfgu.integrity import IntegrityError, stamp_table
    from transfgu.methods import run_context
    from transfgu.store.formats import LabelMaps, label_bank_table, write_parquet_atomic
    from transfgu.training import build_decoder

    ctx = run_context(tiny_config(tmp_path))
    ids = ["0001TP_006690", "0001TP_006720"]
    maps = [LabelMaps.from_dense(np.ones((4, 8, 10), np.float32)) for _ in ids]
    write_parquet_atomic(stamp_table(label_bank_table(ids, maps), ctx.hashes["label_bank"], ids),
                         ctx.layout.label_bank / "part-00000.parquet")

    def state(where, fill: float, input_hash: str) -> None:
        dec = build_decoder(ctx.cfg, ctx.backbone.embed_dim)
        with torch.no_grad():
            for p in dec.parameters():
                p.fill_(fill)
        initial = {k: v.clone() for k, v in dec.state_dict().items()}
        save_train_state(where, dec, None, initial, make_optimizer(dec, 1e-3),
                         {"epoch": 1, "round": 1, "metrics": {"loss": 0.5}, "input_hash": input_hash})

    state(ctx.layout.round_dir(1), 1.0, ctx.hashes["train"])  # what a (stale) shared disk would show
    state(tmp_path / "storage" / "ckpt", 2.0, ctx.hashes["train"])
    out = finish_from_result(ctx, SimpleNamespace(checkpoint=Checkpoint.from_directory(str(tmp_path / "storage" /
                                                                                          "ckpt"))))
    assert out["rounds"] == 2
    assert all(bool((v == 2.0).all()) for v in load_file(str(ctx.layout.model / "decoder.safetensors")).values())
    # no checkpoint (every round already trained): the run's own newest state
    finish_from_result(ctx, None)
    assert all(bool((v == 1.0).all()) for v in load_file(str(ctx.layout.model / "decoder.safetensors")).values())
    state(tmp_path / "storage" / "other", 3.0, "0" * 64)
    with pytest.raises(IntegrityError, match="final training checkpoint"):
        finish_from_result(ctx, SimpleNamespace(checkpoint=Checkpoint.from_directory(str(tmp_path / "storage" /
                                                                                        "other"))))
