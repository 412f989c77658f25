"""The benchmark commands in quick mode: they run, write the documented JSON, and measure what they compare.

Every bench runs in this process (one import of torch for all) with ``--quick`` (tiny model, small sizes, one
thread). Timing *values* are not asserted (the machine is shared); that both sides of every comparison were
actually timed, that the fast and naive pseudo labels agree, and the FLOP formula against torch's own counter are.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.data import require_shared_data

BENCH_KEYS = {"bench", "quick", "command", "machine", "config", "results", "comparisons", "notes", "wall_s"}
MACHINE_KEYS = {
    "cpu_model",
    "logical_cpus",
    "torch",
    "torch_threads",
    "device",
    "loadavg_start",
    "loadavg_end",
}
COMPARISON_KEYS = {"name", "baseline", "candidate", "value", "unit", "target", "target_met", "measured"}


def run_bench(name: str, tmp_path: Path, *extra: str) -> dict:
    import importlib

    mod = importlib.import_module(f"bench.{name}")
    out = tmp_path / f"{name}.json"
    returned = mod.main(["--quick", "--out", str(out), *extra])
    on_disk = json.loads(out.read_text())
    assert on_disk["comparisons"] == json.loads(json.dumps(returned["comparisons"]))
    assert on_disk.keys() >= BENCH_KEYS
    assert on_disk["bench"] == name and on_disk["quick"] is True
    assert on_disk["command"].startswith(f"python -m bench.{name} --quick")
    assert on_disk["machine"].keys() >= MACHINE_KEYS
    assert on_disk["machine"]["torch"] == torch.__version__
    assert on_disk["comparisons"], "a bench must compare at least two things"
    for c in on_disk["comparisons"]:
        assert c.keys() >= COMPARISON_KEYS
        assert math.isfinite(c["value"])
        assert c["target_met"] in (True, False, None)
    return on_disk


def _positive_times(d: dict) -> None:
    assert d["min_s"] > 0 and d["median_s"] >= d["min_s"] and all(t > 0 for t in d["runs_s"])


def test_vit_flop_formula_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from bench.common import backbone_flops, vit_forward_flops
    from transfgu.models.backbone import build_backbone

    bb = build_backbone("vit_test_tiny", "none")
    for blk in bb.vit.blocks:
        blk.attn.fused_attn = False  # explicit q k^T and attn @ v matmuls, which the counter sees
    x = torch.randn(1, 3, 64, 80)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        bb.vit.forward_features(x)
    assert backbone_flops(bb, 64, 80) == fc.get_total_flops()
    # the figure of docs/cost_model.md: the 12 blocks of ViT-S/8 at 320x320 = 57.6 GMAC
    assert 12 * vit_forward_flops(320, 320)["per_block"] / 2 == pytest.approx(57.6e9, rel=1e-3)


def test_pseudo_labels_bench(tmp_path):
    r = run_bench("pseudo_labels", tmp_path)
    res = r["results"]
    ks = r["config"]["ks"]
    for per_batch in res["fast_and_forward"].values():
        _positive_times(per_batch["forward"])
        for k in ks:
            _positive_times(per_batch[f"fast_K{k}"])
    naive = res["naive"]
    for k in ks:  # quick mode times every K directly: nothing extrapolated
        assert naive["direct_s"][str(k)] > 0
    assert max(naive["max_abs_diff_vs_fast"].values()) < 1e-4
    assert all(a["entries_differing_gt_1e-4"] == 0 for a in naive["agreement_vs_fast"].values())
    speed = [c for c in r["comparisons"] if c["name"].startswith("naive / fast")]
    direct = [c for c in speed if "line model" not in c["name"]]
    model = [c for c in speed if "line model" in c["name"]]
    assert len(direct) == len(ks)
    assert all(c["measured"] and c["naive_s"] > 0 and c["fast_s"] > 0 for c in direct)
    fit = naive["fit"]
    # the line model is reported only when its slope (one backward per concept) is positive; on a loaded machine
    # the two small-K timings can be noise, and the bench says so instead of reporting a negative cost
    assert fit["valid"] == (fit["per_concept_backward_s"] > 0)
    if fit["valid"]:
        assert len(model) == len(ks)
        assert all(not c["measured"] and c["naive_model_s"] > 0 for c in model)  # a model is never "measured"
    else:
        assert model == [] and any("line model not reported" in n for n in r["notes"])
    assert fit["per_concept_backward_s"] == pytest.approx(
        (
            res["fast_and_forward"]["1"][f"naive_K{fit['from_ks'][1]}"]["min_s"]
            - res["fast_and_forward"]["1"][f"naive_K{fit['from_ks'][0]}"]["min_s"]
        )
        / (fit["from_ks"][1] - fit["from_ks"][0])
    )


def test_pseudo_labels_bench_marks_extrapolation(tmp_path):
    r = run_bench("pseudo_labels", tmp_path, "--ks", "3,6", "--naive-direct-max-k", "3", "--fast-batches", "")
    c6 = next(c for c in r["comparisons"] if c["name"].startswith("naive / fast, K=6"))
    assert c6["measured"] is False and "EXTRAPOLATED" in c6["naive_how"]
    assert "6" not in r["results"]["naive"]["direct_s"]
    assert any("EXTRAPOLATED" in n for n in r["notes"])


def test_crop_embedding_bench(tmp_path):
    r = run_bench("crop_embedding", tmp_path)
    res = r["results"]
    assert res["matmul_peak"]["flops_per_s"] > 0
    for side in ("batched", "one_at_a_time"):
        _positive_times(res[side])
        assert res[side]["crops_per_s"] > 0 and res[side]["fraction_of_peak"] > 0
    assert res["batched"]["fraction_of_peak"] == pytest.approx(
        res["batched"]["flops_per_s"] / res["matmul_peak"]["flops_per_s"]
    )
    assert res["extract_crops_batch_2_images"]["min_s"] > 0


def test_kmeans_bench(tmp_path):
    r = run_bench("kmeans", tmp_path, "--no-ray")
    res = r["results"]
    assert res["faiss"]["per_iter_s"] > 0 and res["shard_loop"]["per_iter_s"] > 0
    assert len(res["shard_loop"]["iter_s"]) == r["config"]["niter"] + 1
    # same data, same init, same number of Lloyd updates: the inertias agree
    assert res["shard_loop"]["inertia"] == pytest.approx(res["faiss"]["inertia"], rel=1e-3)


def test_training_bench(tmp_path):
    r = run_bench("training", tmp_path)
    res = r["results"]
    boot, plain = res["bootstrapping_epoch"], res["plain_epoch"]
    assert boot["images_per_s"] > 0 and plain["images_per_s"] > 0
    assert boot["batches"] == plain["batches"] == r["config"]["steps"]
    assert res["backbone_forward_only"]["images_per_s"] > 0
    assert (
        res["memory"]["peak_rss_after_bootstrapping_epoch_mib"] >= res["memory"]["rss_before_epoch_mib"] > 0
    )


def test_storage_bench(tmp_path):
    r = run_bench("storage", tmp_path)
    f = r["results"]["features"]
    assert f["crops"] > 0 and f["parquet_bytes_per_image"] > 0
    # the reference pickle of n x D float32 is at least its raw bytes
    assert f["reference_bytes_per_crop"] >= 4 * 48
    for lb in r["results"]["label_bank"].values():
        assert (
            lb["reference_pickle_bytes_per_image"]
            >= 4 * (lb["k_fg"] + lb["k_bg"]) * lb["grid"][0] * lb["grid"][1]
        )
        assert lb["parquet_bytes_per_image"] > 0


def test_end_to_end_bench(tmp_path):
    require_shared_data("camvid")
    r = run_bench("end_to_end", tmp_path)
    stages = r["results"]["stages"]
    assert set(stages) == {"extract", "concepts", "label_bank", "train", "evaluate"}
    assert all(s["status"] == "done" and s["seconds"] > 0 for s in stages.values())
    assert r["results"]["wall_s"] >= sum(s["seconds"] for s in stages.values()) - 0.5


def test_end_to_end_quick_config_is_the_tests_tiny_config(tmp_path):
    require_shared_data("camvid")
    from helpers.configs import tiny_config

    from bench.end_to_end import build_config

    ours = json.loads(build_config(True, tmp_path, "tiny", "auto", []).model_dump_json())
    theirs = json.loads(tiny_config(tmp_path, "tiny").model_dump_json())
    assert ours == theirs


def test_cost_model_bench(tmp_path):
    r = run_bench("cost_model", tmp_path)
    per = r["results"]["per_image"]
    ratio = per["label_bank_naive"]["flops"] / per["label_bank_fast"]["flops"]
    assert ratio == pytest.approx(1 + 2 * (80 + 91))  # one forward + K backward passes of ~2 forwards each
    assert all(not c["measured"] for c in r["comparisons"])  # projections are never labelled as measurements
    assert r["results"]["gpu_measured"] is None


def test_throughput_bench(tmp_path):
    r = run_bench("throughput", tmp_path)
    res = r["results"]
    names = [c["name"] for c in r["comparisons"]]
    assert any(n.startswith("extract crops/s") for n in names)
    assert "label bank images/s / concept_maps-only images/s" in names
    assert "bootstrapping epoch images/s / frozen-backbone-only images/s" in names
    assert any(n.startswith("pseudo labels / one forward (fp32") for n in names)
    # both sides of every comparison were timed in this run
    assert res["extract"]["stage_crops_per_s"] > 0 and res["extract"]["plain_timm_eager_crops_per_s"] > 0
    assert res["extract"]["crops"] > 0
    assert res["label_bank"]["stage_images_per_s"] > 0 and res["label_bank"]["kernel_images_per_s"] > 0
    assert res["training"]["images_per_s"] > 0 and res["training"]["backbone_only_images_per_s"] > 0
    assert min(res["pseudo_labels"]["fp32"]["concept_maps_s"]) > 0
    assert "partial" not in r
