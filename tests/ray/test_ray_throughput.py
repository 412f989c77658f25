"""The Ray stage actors run the one-process executor's throughput code (issue 15): the same compiled backbone
(``context.run_backbone``), the same per-shard data path (``ShardedStage.load``) off the model's thread (two calls
per actor, one at a time in the model), and give the one-process outputs.

The workers get ``TRANSFGU_COMPILE=on`` with the ``eager`` backend (dynamo tracing without code generation, fast
on a CPU); the one-process reference in this process runs uncompiled, so equal outputs also show that compiling
changes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.configs import tiny_config
from helpers.data import camvid_subset
from helpers.ray import local_ray

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]

WORKER_ENV = {"TRANSFGU_COMPILE": "on", "TRANSFGU_COMPILE_BACKEND": "eager"}
OVERRIDES = {"ray.cpus_per_actor": "0.5", "ray.extract_actors": "[1, 1]", "data.max_train_images": "4"}


@pytest.fixture(scope="module")
def compiling_ray():
    """A local Ray of this module's own: its workers compile (a job-level environment, fixed when Ray starts)."""
    with local_ray(object_store_memory=100 * 1024**2, runtime_env={"env_vars": WORKER_ENV}):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Extract, concepts and label bank of the one-process executor (uncompiled: this process has no env)."""
    import torch

    from transfgu import local
    from transfgu.methods import run_context

    torch.set_num_threads(2)
    cfg = tiny_config(tmp_path_factory.mktemp("ref"), "t", **OVERRIDES)
    ctx = run_context(cfg)
    assert not getattr(ctx.backbone, "_transfgu_compiled", False)
    for run in (local.run_extract, local.run_concepts, local.run_label_bank):
        run(ctx)
    return cfg.run_dir


def _check_features(got_dir, ref_dir) -> None:
    from transfgu.store.formats import read_features

    (ma, fa), (mb, fb) = read_features(ref_dir / "features"), read_features(got_dir / "features")
    assert len(fa) > 0 and ma.equals(mb)  # same crops (ids, boxes, pools), same order
    np.testing.assert_allclose(fb, fa, rtol=1e-5, atol=1e-5)


def test_stage_actor_compiles_and_keeps_the_model_to_one_call(compiling_ray, reference, tmp_path):
    """A StageActor built with the executor's own arguments: compiled backbone (no fallback), two concurrent calls
    of which at most one is in the model at a time, and the one-process shard files."""
    from transfgu.distributed.pipeline import prepare_run_dir
    from transfgu.distributed.shards import CALLS_PER_ACTOR, StageActor, actor_kwargs, shard_tables
    from transfgu.integrity import plan_shards
    from transfgu.methods import run_context
    from transfgu.stages import SHARD_IMAGES, ExtractStage

    cfg = tiny_config(tmp_path, "t", **OVERRIDES)
    prepare_run_dir(cfg)
    ctx = run_context(cfg)
    out_dir = ExtractStage.output(ctx.layout)
    out_dir.mkdir(parents=True)
    records = ExtractStage.records(cfg)
    # two shards of two images: two calls in flight at once
    plan = plan_shards(out_dir, ctx.run_dir, "extract", ctx.hashes["extract"], [r.image_id for r in records], 2)
    tables = shard_tables(records, plan)
    assert len(tables) == 2 and SHARD_IMAGES > 2
    actor = ray.remote(StageActor).options(max_concurrency=CALLS_PER_ACTOR, num_cpus=0.5).remote(
        **actor_kwargs(ctx, ExtractStage, 0.5, False)
    )
    batches = [{k: t[k].to_numpy(zero_copy_only=False) for k in t.column_names} for t in tables]
    outs = ray.get([actor.__call__.remote(b) for b in batches])
    info = ray.get(actor.info.remote())
    assert info["compiled"] and not info["compile_failed"], info
    assert info["max_calls_in_model"] == 1
    assert sum(int(o["rows"].sum()) for o in outs) > 0
    # the one-process files hold 32-image shards: compare the rows, not the files
    _check_features(ctx.run_dir, reference)


def test_ray_sharded_stages_equal_one_process(compiling_ray, reference, tmp_path):
    """Extract and label bank through the Ray Data actor pool (compiled actors, two calls per actor) == the
    one-process executor."""
    from transfgu import local
    from transfgu.distributed.pipeline import prepare_run_dir
    from transfgu.distributed.shards import run_sharded_stage
    from transfgu.methods import run_context
    from transfgu.stages import ExtractStage, LabelBankStage
    from transfgu.store.formats import read_label_bank

    cfg = tiny_config(tmp_path, "t", **OVERRIDES)
    prepare_run_dir(cfg)
    ctx = run_context(cfg)
    run_sharded_stage(ctx, ExtractStage)
    _check_features(ctx.run_dir, reference)
    local.run_concepts(ctx)
    run_sharded_stage(ctx, LabelBankStage)
    bank_a, bank_b = read_label_bank(reference / "label_bank"), read_label_bank(ctx.run_dir / "label_bank")
    assert bank_a.keys() == bank_b.keys() and bank_a
    for k in bank_a:
        np.testing.assert_allclose(bank_b[k], bank_a[k], rtol=1e-5, atol=1e-6)


def test_decode_stage_gives_the_one_process_shards(compiling_ray, tmp_path, monkeypatch):
    """``ray.decode_stage=true`` (decode + resize in CPU tasks ahead of the actor pool; forced on this CPU Ray):
    the same shard files as the one-process executor (names, integrity stamps, rows, features), and an undecodable
    image is recorded as there. Two-image shards, so the pool sees several shards and a short last one."""

    import pyarrow.parquet as pq

    from transfgu import local
    from transfgu.distributed import shards
    from transfgu.distributed.pipeline import prepare_run_dir
    from transfgu.methods import run_context
    from transfgu.stages import ExtractStage

    root, names = camvid_subset(tmp_path / "camvid", 5, broken=2)
    bad = root / "images" / "train" / f"{names[2]}.jpg"
    over = {**OVERRIDES, "data.root": str(root), "run.error_budget": "0.5", "data.max_train_images": "5"}
    monkeypatch.setattr(local, "SHARD_IMAGES", 2)
    monkeypatch.setattr(shards, "SHARD_IMAGES", 2)
    real_specs, specs = shards.shard_specs, []

    def spy(*a):  # the decode stage's input: one row per shard
        out = real_specs(*a)
        specs.extend(out)
        return out

    monkeypatch.setattr(shards, "shard_specs", spy)

    ref_ctx = run_context(tiny_config(tmp_path / "a", "t", **over))
    local.run_extract(ref_ctx)
    cfg = tiny_config(tmp_path / "b", "t", **{**over, "ray.decode_stage": "true", "ray.extract_actors": "[1, auto]"})
    prepare_run_dir(cfg)
    ctx = run_context(cfg)
    info = shards.run_sharded_stage(ctx, ExtractStage)
    assert len(specs) == 3  # the decode stage ran, one row per shard: 2 + 2 + 1 images
    assert info["images"] == 4 and info["errors"] == 1 and info["new_images"] == 4
    assert [e["file"] for e in ctx.errors.entries("extract")] == [str(bad)]
    assert [e["file"] for e in ref_ctx.errors.entries("extract")] == [str(bad)]
    ref_files = sorted(p.name for p in (ref_ctx.run_dir / "features").glob("*.parquet"))
    got_files = sorted(p.name for p in (ctx.run_dir / "features").glob("*.parquet"))
    assert got_files == ref_files and len(got_files) == 3
    for name in ref_files:
        a, b = pq.read_table(ref_ctx.run_dir / "features" / name), pq.read_table(ctx.run_dir / "features" / name)
        assert a.schema.metadata == b.schema.metadata  # integrity stamp: input hash, covered and failed ids
        assert a.drop_columns(["cls"]).equals(b.drop_columns(["cls"]))
        np.testing.assert_allclose(np.stack(b["cls"].to_numpy(zero_copy_only=False)),
                                   np.stack(a["cls"].to_numpy(zero_copy_only=False)), rtol=1e-5, atol=1e-5)

