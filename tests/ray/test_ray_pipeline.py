"""The Ray pipeline on a real multi-node Ray cluster (one head + two worker nodes on this machine).

Checks: the distributed run reproduces the one-process run of the same config (same features, concepts, label bank,
training and metrics: every stage runs the same functions on the same shards, and one Train worker sees exactly the
one-process batches); resume after an interruption recomputes nothing finished; row counts with an undecodable
image; no deprecated Ray API in the logs.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from helpers.configs import tiny_config
from helpers.data import camvid_subset
from helpers.ray import multi_node_cluster

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]

#: Ray settings that fit three 1-CPU nodes: half-CPU actors and one Train worker.
RAY_OVERRIDES = {
    "ray.cpus_per_actor": "0.5",
    "ray.cpus_per_worker": "0.5",
    "ray.extract_actors": "[1, 2]",
    "ray.kmeans_shards": "2",
    "ray.num_workers": "1",
    "ray.fit_per_round": "false",
}


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes, 1 CPU each."""
    with multi_node_cluster(1, [1, 1]) as c:
        yield c


#: Emitted by Ray Data's own ``DataContext()`` constructor (it assigns its deprecated fields), whatever the caller
#: does: not a use of a deprecated API by this project.
RAY_INTERNAL = ("`use_push_based_shuffle` is deprecated", "`use_polars` is deprecated",
                "`use_arrow_tensor_v2` is deprecated")


def ray_deprecations(caught: list, text: str) -> list[str]:
    """Deprecation messages from Ray or transfgu (driver warnings and streamed worker logs), less RAY_INTERNAL."""
    found = [str(w.message) for w in caught
             if "deprecat" in str(w.message).lower() and ("/ray/" in w.filename or "transfgu" in w.filename)]
    found += [line for line in text.splitlines() if "deprecat" in line.lower()]
    return [m for m in found if not any(k in m for k in RAY_INTERNAL)]


def _mtimes(run_dir: Path, subdirs: tuple[str, ...]) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns
            for d in subdirs for p in sorted((run_dir / d).rglob("*")) if p.is_file()}


def test_cluster_has_three_nodes(cluster):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3


def test_full_pipeline_matches_one_process_and_resumes(cluster, tiny_run_dir, tmp_path, capfd):
    from transfgu.concepts import ConceptBank
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.store.formats import read_features, read_label_bank
    from transfgu.store.manifest import Manifest

    cfg = tiny_config(tmp_path / "runs", **RAY_OVERRIDES, **{"mlflow.enabled": "true"})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # interrupted after the concepts stage ...
        run_pipeline_ray(cfg, only=["extract", "concepts"])
        first = Manifest.load(cfg.run_dir).stages
        before = _mtimes(cfg.run_dir, ("features", "concepts"))
        # ... then resumed: only the remaining stages run
        manifest = run_pipeline_ray(cfg)
    run_dir = cfg.run_dir
    assert all(rec["status"] == "done" for rec in manifest["stages"].values())
    for stage in ("extract", "concepts"):
        assert manifest["stages"][stage]["finished_at"] == first[stage]["finished_at"]
    assert _mtimes(run_dir, ("features", "concepts")) == before

    # same numbers as the one-process pipeline at every stage
    ma, fa = read_features(tiny_run_dir / "features")
    mb, fb = read_features(run_dir / "features")
    assert ma.equals(mb)
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_allclose(ConceptBank.load(run_dir / "concepts").centroids,
                               ConceptBank.load(tiny_run_dir / "concepts").centroids, atol=1e-5)
    bank_a, bank_b = read_label_bank(tiny_run_dir / "label_bank"), read_label_bank(run_dir / "label_bank")
    assert bank_a.keys() == bank_b.keys()
    for k in bank_a:
        np.testing.assert_allclose(bank_a[k].astype(np.float32), bank_b[k].astype(np.float32), atol=1e-3)
    ref = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    got = json.loads((run_dir / "eval" / "metrics.json").read_text())
    # identical inputs and batches; the tolerance only covers float summation order across processes
    assert got["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], abs=1e-6)
    assert got["pretrained"] is False
    # the evaluation runs as one Ray task; its progress reached the driver's log (transfgu.distributed.progress)
    assert re.search(r"INFO transfgu: \[evaluate\] (\d+)/\1 \(100\.0%\)", (run_dir / "pipeline.log").read_text())

    # a second run recomputes nothing
    everything = ("features", "concepts", "label_bank", "train", "model", "eval")
    before_all = _mtimes(run_dir, everything)
    stamps = {k: v["finished_at"] for k, v in manifest["stages"].items()}
    again = run_pipeline_ray(cfg)
    assert {k: v["finished_at"] for k, v in again["stages"].items()} == stamps
    assert _mtimes(run_dir, everything) == before_all

    # no deprecated Ray API: warnings in the driver, and worker logs streamed to the driver
    out = capfd.readouterr()
    assert not ray_deprecations(caught, out.out + out.err)


def test_extract_counts_with_an_undecodable_image(cluster, tmp_path):
    from transfgu.distributed.executor import RayExecutor
    from transfgu.distributed.pipeline import prepare_run_dir
    from transfgu.methods import run_context
    from transfgu.stages import ExtractStage
    from transfgu.store.formats import read_features

    root, names = camvid_subset(tmp_path / "camvid", 4, broken=1)
    bad = root / "images" / "train" / f"{names[1]}.jpg"
    cfg = tiny_config(tmp_path / "runs", **RAY_OVERRIDES, **{"data.root": str(root), "run.error_budget": "0.5"})
    prepare_run_dir(cfg)
    ctx = run_context(cfg)
    info = RayExecutor(cfg).run_sharded(ctx, ExtractStage)
    assert info["images"] == 3 and info["errors"] == 1
    meta, _ = read_features(cfg.run_dir / "features")
    assert set(meta["image_id"].to_pylist()) == {names[0], names[2], names[3]}
    assert info["rows"] == meta.num_rows
    assert [e["file"] for e in ctx.errors.entries("extract")] == [str(bad)]
    # every image of the input is covered exactly once, so a re-run sends nothing to the actors
    again = RayExecutor(cfg).run_sharded(ctx, ExtractStage)
    assert again["new_images"] == 0 and again["rows"] == info["rows"]
