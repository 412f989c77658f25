"""Integrity of resumable runs (issue 11): each numbered finding reproduced on the tiny config, and the units.

Findings: (1) a changed config never reuses outputs, ``--force`` recomputes; (2) training resumes only from states
of the same train settings; (3) resume by image id: growing, shrinking and reordering the image list between
kills gives every image exactly once; (4) ``report`` and ``predict --out`` refuse to touch files they did not
create; (5) non-finite values, oversized images and unreachable services are refused with the key or file named.
"""

from __future__ import annotations

import json
import shutil
import socket
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers.configs import tiny_config
from helpers.data import require_shared_data

from transfgu import integrity
from transfgu.store.formats import features_table, list_parquet_files, read_features, read_label_bank


# -- helpers ---------------------------------------------------------------------------------------------------------
def _features_by_crop(run: Path) -> dict[tuple[str, int, float], np.ndarray]:
    meta, cls = read_features(run / "features")
    keys = zip(meta["image_id"].to_pylist(), meta["crop_index"].to_pylist(), meta["scale"].to_pylist())
    out: dict[tuple[str, int, float], np.ndarray] = {}
    for k, v in zip(keys, cls):
        assert k not in out, f"crop {k} stored twice"
        out[k] = v
    return out


def _assert_same_features(a: Path, b: Path) -> None:
    fa, fb = _features_by_crop(a), _features_by_crop(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k])


def _covered_ids(out_dir: Path) -> Counter:
    c: Counter = Counter()
    for p in list_parquet_files(out_dir):
        c.update(integrity.read_stamp(p).image_ids)
    return c


def _copy_run(src: Path, root: Path, name: str = "tiny") -> Path:
    dst = root / name
    shutil.copytree(src, dst)
    return dst


def _decoder(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "decoder.safetensors"))


def _assert_same_decoder(a: Path, b: Path) -> None:
    da, db = _decoder(a), _decoder(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert np.array_equal(da[k].numpy(), db[k].numpy()), k


def _strict_json(path: Path):
    def bad(token):
        raise ValueError(f"{path}: bare {token} is not JSON")

    return json.loads(path.read_text(), parse_constant=bad)


class _Crop:
    def __init__(self, n: int, dim: int = 4, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.crop_index = np.arange(n)
        self.scale = np.full(n, 0.5)
        self.box = np.zeros((n, 4))
        self.pool = np.array(["all"] * n)
        self.cls = rng.standard_normal((n, dim)).astype(np.float32)


def _write_shard(out_dir: Path, name: str, h: str, ids: list[str], failed: tuple[str, ...] = ()) -> Path:
    ok = [i for i in ids if i not in failed]
    table = features_table(ok, "train", [_Crop(2, seed=len(i)) for i in ok], dim=4)
    path = out_dir / name
    pq.write_table(integrity.stamp_table(table, h, ids, failed), path)
    return path


# -- units: plan, verify, set aside ----------------------------------------------------------------------------------
def test_plan_keeps_only_this_hash_and_listed_ids_and_sets_the_rest_aside(tmp_path):
    run = tmp_path / "run"
    out = run / "features"
    out.mkdir(parents=True)
    _write_shard(out, "part-00000.parquet", "h1", ["a", "b"])
    _write_shard(out, "part-00001.parquet", "h1", ["c", "d"])  # d is no longer listed: set aside, c redone
    _write_shard(out, "part-00002.parquet", "h0", ["e"])  # another hash
    _write_shard(out, "part-00003.parquet", "h1", ["b", "f"])  # repeats b
    pq.write_table(pa.table({"x": [1]}), out / "part-00004.parquet")  # unstamped (an older version's file)
    (out / "part-00005.parquet").write_bytes(b"PAR1 torn")
    plan = integrity.plan_shards(out, run, "extract", "h1", ["a", "b", "c", "e", "f"], shard_images=2)
    assert [p.name for p in plan.kept] == ["part-00000.parquet"]
    assert plan.covered == {"a", "b"}
    assert [(g.name, g.positions) for g in plan.groups] == [
        ("part-00001.parquet", [2, 3]),  # c, e: the whole of shard 1, the fresh-run name
        ("part-00002.parquet", [4]),  # f: shard 2 is only one image long
    ]
    assert [p.name for p in list_parquet_files(out)] == ["part-00000.parquet"]
    stale = sorted(p.relative_to(run / "_stale").as_posix() for p in (run / "_stale").rglob("*.parquet"))
    assert stale == ["extract/h0/part-00002.parquet", "extract/h1/part-00001.parquet",
                     "extract/h1/part-00003.parquet", "extract/unstamped/part-00004.parquet",
                     "extract/unstamped/part-00005.parquet"]


def test_plan_names_never_overwrite_a_kept_file(tmp_path):
    run = tmp_path / "run"
    out = run / "features"
    out.mkdir(parents=True)
    _write_shard(out, "part-00000.parquet", "h", ["y", "z"])  # the old order's shard 0
    plan = integrity.plan_shards(out, run, "extract", "h", ["a", "b", "y", "z"], shard_images=2)
    assert plan.covered == {"y", "z"}
    (g,) = plan.groups
    assert g.positions == [0, 1] and g.name != "part-00000.parquet" and g.name.startswith("part-00000")


def test_set_aside_never_overwrites(tmp_path):
    run = tmp_path / "run"
    for content in (b"one", b"two"):
        (run / "eval").mkdir(parents=True)
        (run / "eval" / "metrics.json").write_bytes(content)
        integrity.set_aside(run / "eval", run, "evaluate", "abc", "test")
    kept = sorted((run / "_stale" / "evaluate" / "abc").iterdir())
    assert [p.name for p in kept] == ["eval", "eval.1"]
    assert {(p / "metrics.json").read_bytes() for p in kept} == {b"one", b"two"}


def test_verify_counts_from_disk_and_catches_duplicates_and_gaps(tmp_path):
    out = tmp_path / "features"
    out.mkdir()
    _write_shard(out, "part-00000.parquet", "h", ["a", "b"], failed=("b",))
    _write_shard(out, "part-00001.parquet", "h", ["c"])
    s = integrity.verify_shards(out, "extract", "h", ["a", "b", "c"])
    assert (s.rows, s.images, s.failed, s.files) == (4, 2, 1, 2)
    with pytest.raises(integrity.IntegrityError, match="missing"):
        integrity.verify_shards(out, "extract", "h", ["a", "b", "c", "d"])
    with pytest.raises(integrity.IntegrityError, match="not listed"):
        integrity.verify_shards(out, "extract", "h", ["a", "b"])
    with pytest.raises(integrity.IntegrityError, match="other inputs"):
        integrity.verify_shards(out, "extract", "h2", ["a", "b", "c"])
    _write_shard(out, "part-00002.parquet", "h", ["c"])
    with pytest.raises(integrity.IntegrityError, match="covered twice"):
        integrity.verify_shards(out, "extract", "h", ["a", "b", "c"])


# -- finding 1: a changed config never reuses outputs; --force recomputes ---------------------------------------------
CHANGED = {"crops.betas": "[0.5, 0.4]", "pseudo.grad_scale": "0.25", "concepts.k_per_pool": "{all: 6}"}


@pytest.mark.slow
def test_rerun_with_changed_crops_concepts_pseudo_equals_a_fresh_run(tmp_path, tiny_run_dir):
    from transfgu.concepts import ConceptBank
    from transfgu.pipeline import run_pipeline, stage_hashes

    run = _copy_run(tiny_run_dir, tmp_path / "runs")
    old_hashes = stage_hashes(tiny_config(tmp_path / "runs"))
    cfg = tiny_config(tmp_path / "runs", **CHANGED)
    manifest = run_pipeline(cfg)
    fresh_cfg = tiny_config(tmp_path / "fresh", **CHANGED)
    fresh_manifest = run_pipeline(fresh_cfg)
    fresh = fresh_cfg.run_dir

    _assert_same_features(run, fresh)
    assert manifest["stages"]["extract"]["rows"] == fresh_manifest["stages"]["extract"]["rows"]
    assert ConceptBank.load(run / "concepts").num_concepts == 6
    np.testing.assert_array_equal(ConceptBank.load(run / "concepts").centroids,
                                  ConceptBank.load(fresh / "concepts").centroids)
    bank, fresh_bank = read_label_bank(run / "label_bank"), read_label_bank(fresh / "label_bank")
    assert sorted(bank) == sorted(fresh_bank)
    for k in bank:
        assert bank[k].shape[0] == 6
        np.testing.assert_array_equal(bank[k], fresh_bank[k])
    _assert_same_decoder(run, fresh)
    m, fm = _strict_json(run / "eval" / "metrics.json"), _strict_json(fresh / "eval" / "metrics.json")
    assert m["mIoU"] == fm["mIoU"] and m["per_class_iou"] == fm["per_class_iou"]
    # the old outputs were moved aside, not deleted
    old_feat = run / "_stale" / "extract" / old_hashes["extract"][:12] / "part-00000.parquet"
    assert pq.read_table(old_feat).equals(pq.read_table(tiny_run_dir / "features" / "part-00000.parquet"))
    assert (run / "_stale" / "label_bank" / old_hashes["label_bank"][:12] / "part-00000.parquet").is_file()
    assert (run / "_stale" / "train" / old_hashes["train"][:12] / "round_000" / "state.json").is_file()


@pytest.mark.slow
def test_force_really_recomputes_and_keeps_the_old_outputs_aside(tmp_path, tiny_run_dir):
    from transfgu.pipeline import run_pipeline, stage_hashes

    run = _copy_run(tiny_run_dir, tmp_path / "runs")
    cfg = tiny_config(tmp_path / "runs")
    h = stage_hashes(cfg)
    part = run / "label_bank" / "part-00000.parquet"
    before = part.stat().st_mtime_ns
    manifest = run_pipeline(cfg, only=["extract", "concepts", "label_bank"], force=["label_bank"])
    assert part.stat().st_mtime_ns != before  # written again
    aside = run / "_stale" / "label_bank" / "unstamped" / "label_bank" / "part-00000.parquet"
    assert aside.is_file()
    assert pq.read_table(part).equals(pq.read_table(aside))  # same inputs, same values
    assert manifest["stages"]["label_bank"]["input_hash"] == h["label_bank"]
    assert manifest["stages"]["label_bank"]["extra"]["images"] == 6


# -- finding 2: training resumes only from states of the same train settings -----------------------------------------
@pytest.mark.slow
def test_changed_train_setting_trains_from_scratch(tmp_path, tiny_run_dir, caplog):
    import logging

    from transfgu.pipeline import run_pipeline

    run = _copy_run(tiny_run_dir, tmp_path / "runs")
    cfg = tiny_config(tmp_path / "runs", **{"train.w_div": "0.5"})
    with caplog.at_level(logging.INFO):
        run_pipeline(cfg)
    assert "resuming after epoch" not in caplog.text
    assert json.loads((run / "train" / "round_001" / "state.json").read_text())["input_hash"] == \
        json.loads((run / "model" / "model.json").read_text())["input_hash"]
    # the oracle: the same upstream outputs, training started from nothing under w_div=0.5
    fresh = _copy_run(tiny_run_dir, tmp_path / "fresh")
    for name in ("train", "model", "eval"):
        shutil.rmtree(fresh / name)
    man = json.loads((fresh / "_manifest.json").read_text())
    for name in ("train", "evaluate"):
        man["stages"].pop(name)
    (fresh / "_manifest.json").write_text(json.dumps(man))
    run_pipeline(tiny_config(tmp_path / "fresh", **{"train.w_div": "0.5"}))
    _assert_same_decoder(run, fresh)
    with pytest.raises(AssertionError):
        _assert_same_decoder(run, tiny_run_dir)


# -- finding 3: resume by image id -----------------------------------------------------------------------------------
def _extract(root: Path, name: str, **over: str) -> Path:
    from transfgu.pipeline import run_pipeline

    cfg = tiny_config(root, name=name, **over)
    run_pipeline(cfg, only=["extract"])
    return cfg.run_dir


@pytest.fixture
def small_shards(monkeypatch):
    import transfgu.local as local

    monkeypatch.setattr(local, "SHARD_IMAGES", 2)


def test_growing_and_shrinking_the_image_list_gives_every_image_once(tmp_path, small_shards):
    from transfgu.data.loaders import split_records

    run = _extract(tmp_path / "runs", "r", **{"data.max_train_images": "3"})
    run = _extract(tmp_path / "runs", "r", **{"data.max_train_images": "6"})  # grow
    ids = [r.image_id for r in split_records(tiny_config(tmp_path, **{"data.max_train_images": "6"}),
                                                    "train")]
    assert _covered_ids(run / "features") == Counter(ids)
    _assert_same_features(run, _extract(tmp_path / "fresh", "six", **{"data.max_train_images": "6"}))
    man = json.loads((run / "_manifest.json").read_text())["stages"]["extract"]
    assert man["extra"]["images"] == 6 and man["rows"] == len(_features_by_crop(run))

    run = _extract(tmp_path / "runs", "r", **{"data.max_train_images": "3"})  # shrink
    assert _covered_ids(run / "features") == Counter(ids[:3])
    _assert_same_features(run, _extract(tmp_path / "fresh", "three", **{"data.max_train_images": "3"}))
    man = json.loads((run / "_manifest.json").read_text())["stages"]["extract"]
    assert man["extra"]["images"] == 3 and man["rows"] == len(_features_by_crop(run))


def test_images_that_sort_first_after_a_kill_are_added_once(tmp_path, small_shards, monkeypatch):
    import transfgu.stages as stages

    src = sorted((require_shared_data("camvid") / "images" / "train").iterdir())[:9]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, p in enumerate(src[:5]):
        shutil.copy(p, folder / f"m{i}.jpg")
    over = {"data.name": "folder", "data.root": str(folder), "data.val_split": "null",
            "data.max_train_images": "null"}
    real = stages.extract_features
    calls = {"n": 0}

    def killed_after_two(*a, **k):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(stages, "extract_features", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        _extract(tmp_path / "runs", "r", **over)
    monkeypatch.setattr(stages, "extract_features", real)
    assert sum(_covered_ids(tmp_path / "runs" / "r" / "features").values()) == 4
    for i, p in enumerate(src[5:9]):  # new images that sort before every earlier one
        shutil.copy(p, folder / f"a{i}.jpg")
    run = _extract(tmp_path / "runs", "r", **over)
    want = [f"a{i}" for i in range(4)] + [f"m{i}" for i in range(5)]
    assert _covered_ids(run / "features") == Counter(want)
    _assert_same_features(run, _extract(tmp_path / "fresh", "f", **over))


# -- finding 4: commands that would destroy user files refuse ---------------------------------------------------------
def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    from transfgu.report import main

    mine = tmp_path / "photos"
    (mine / "report").mkdir(parents=True)
    (mine / "report" / "holiday.png").write_bytes(b"precious")
    assert main([str(mine)]) == 2
    assert (mine / "report" / "holiday.png").read_bytes() == b"precious"
    # in a run directory, only the files an earlier report wrote are replaced
    from transfgu.report import write_report

    (mine / "pipeline.log").write_text("")
    (mine / "report" / "_report.json").write_text(json.dumps({"files": ["old.png", "../../escape.png"]}))
    (mine / "report" / "old.png").write_bytes(b"an earlier report's")
    (tmp_path / "escape.png").write_bytes(b"outside")
    write_report(mine)
    assert (mine / "report" / "holiday.png").read_bytes() == b"precious"
    assert not (mine / "report" / "old.png").exists() and (tmp_path / "escape.png").is_file()
    assert (mine / "report" / "index.html").is_file()


def test_predict_refuses_to_write_over_or_inside_its_inputs(tmp_path, tiny_run_dir, capsys):
    from transfgu.predict import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for p in sorted((require_shared_data("camvid") / "images" / "val").iterdir())[:2]:
        shutil.copy(p, imgs / (p.stem + ".png"))
    before = {p.name: p.read_bytes() for p in imgs.iterdir()}
    model = str(tiny_run_dir / "model")
    assert main([model, str(imgs), "--out", str(imgs), "--device", "cpu"]) == 2
    assert "inside" in capsys.readouterr().err
    assert main([model, str(imgs), "--out", str(imgs / "pred"), "--device", "cpu"]) == 2
    assert main([model, str(imgs / next(iter(before))), "--out", str(imgs), "--device", "cpu"]) == 2
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "x.png").write_bytes(b"mine")
    assert main([model, str(imgs), "--out", str(foreign), "--device", "cpu"]) == 2
    assert (foreign / "x.png").read_bytes() == b"mine"
    assert {p.name: p.read_bytes() for p in imgs.iterdir()} == before
    # a proper output folder can be written twice, and is never read back as input
    out = tmp_path / "pred"
    assert main([model, str(imgs), "--out", str(out), "--device", "cpu"]) == 0
    assert main([model, str(imgs), "--out", str(out), "--device", "cpu"]) == 0
    shutil.move(str(out), str(imgs / "old_pred"))
    from transfgu.predict import collect_inputs

    assert sorted(s for _, s in collect_inputs([imgs])) == sorted(Path(n).stem for n in before)


# -- finding 5: validation -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("train.lr", ".inf"), ("train.lr", "nan"), ("pseudo.grad_scale", "inf"),
                                       ("crops.th_fg", "nan")])
def test_non_finite_config_values_are_refused_with_the_key(tmp_path, key, value):
    from transfgu.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_config(tmp_path, **{key: value})


def test_cli_refuses_an_infinite_learning_rate_before_creating_anything(tmp_path, capsys):
    from transfgu.cli import run_main

    assert run_main(["run.root=" + str(tmp_path / "r"), "train.lr=.inf", "mlflow.enabled=false"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_undefined_scores_are_written_as_null_with_a_reason(tmp_path):
    from transfgu.evaluate_stage import write_eval
    from transfgu.store.manifest import Manifest

    scores = {"mIoU": float("nan"), "pixel_accuracy": float("nan"), "per_class_iou": {"road": float("nan")},
              "mapping": [0, 1], "confusion": np.zeros((2, 2))}
    write_eval(tmp_path / "eval", scores, ["road", "sky"], pretrained=False, n_images=1, input_hash="h")
    m = _strict_json(tmp_path / "eval" / "metrics.json")
    assert m["mIoU"] is None and m["per_class_iou"]["road"] is None
    assert "not finite" in m["null_reasons"]["mIoU"] and "per_class_iou.road" in m["null_reasons"]
    Manifest(tmp_path).mark_done("evaluate", rows=1, mIoU=float("nan"))
    assert _strict_json(tmp_path / "_manifest.json")["stages"]["evaluate"]["extra"]["mIoU"] is None
    # and JSON read back from a checkpoint refuses them, naming the file
    from transfgu.model_meta import read_model_meta

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text('{"decoder": {"n_classes": 4}, "lr": NaN}')
    with pytest.raises(ValueError, match=r"model\.json: non-finite number NaN"):
        read_model_meta(tmp_path / "model")


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    import resource

    from PIL import Image

    from transfgu.data.io import DecodeError, load_rgb

    path = tmp_path / "bomb.png"
    Image.new("1", (13000, 13000)).save(path, optimize=True)
    assert path.stat().st_size < 2_000_000
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DecodeError, match=r"bomb\.png.*data\.max_image_pixels"):
        load_rgb(path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200_000  # KiB: nothing was decoded


def test_pixel_limit_comes_from_the_config_and_refused_images_are_recorded(tmp_path):
    from transfgu.data import io
    from transfgu.errors import ErrorBudgetExceeded
    from transfgu.pipeline import run_pipeline

    cfg = tiny_config(tmp_path, **{"data.max_image_pixels": "1000", "run.error_budget": "0.5"})
    try:
        with pytest.raises(ErrorBudgetExceeded):
            run_pipeline(cfg, only=["extract"])
    finally:
        io.set_max_image_pixels(64_000_000)
    lines = [json.loads(x) for x in (cfg.run_dir / "errors.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all("max_image_pixels=1,000" in x["reason"] for x in lines)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_and_ray_fail_fast_with_the_key(tmp_path, monkeypatch):
    from transfgu.preflight import PreflightError, check_ray_address, preflight

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    port = _closed_port()
    cfg = tiny_config(tmp_path, **{"mlflow.enabled": "true", "mlflow.tracking_uri": f"http://127.0.0.1:{port}"})
    t0 = time.time()
    with pytest.raises(PreflightError, match="mlflow.tracking_uri"):
        preflight(cfg)
    assert time.time() - t0 < 10
    cfg = tiny_config(tmp_path, **{"ray.address": f"127.0.0.1:{port}"})
    (problem,) = check_ray_address(cfg)
    assert problem[0] == "ray.address"


def test_unknown_reader_option_is_named_by_preflight(tmp_path):
    from transfgu.preflight import PreflightError, preflight

    with pytest.raises(PreflightError, match="granularty"):
        preflight(tiny_config(tmp_path, **{"data.options": "{granularty: 27}"}))


def test_readers_refuse_artifacts_of_other_inputs(tmp_path, tiny_run_dir):
    from transfgu.methods import run_context as Context
    from transfgu.stages import load_checked_concepts
    from transfgu.training import load_model_decoder

    def load_student(ctx):
        return load_model_decoder(ctx.cfg, ctx.layout, ctx.backbone.embed_dim, ctx.device, ctx.hashes["train"])

    run = _copy_run(tiny_run_dir, tmp_path / "runs")
    ctx = Context(tiny_config(tmp_path / "runs", **{"concepts.k_per_pool": "{all: 6}"}))
    with pytest.raises(integrity.IntegrityError, match="concept bank"):
        load_checked_concepts(ctx)
    with pytest.raises(integrity.IntegrityError, match="the model"):
        load_student(ctx)
    ctx = Context(tiny_config(tmp_path / "runs"))
    assert load_checked_concepts(ctx).num_concepts == 4
    load_student(ctx)
    with pytest.raises(integrity.IntegrityError, match="label_bank"):
        integrity.require_stamped(run / "label_bank", "label_bank", "another")


# -- the Ray executor follows the same rules -------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.ray
def test_ray_rerun_with_changed_crops_and_grown_list_equals_a_fresh_run(tmp_path, tiny_run_dir, ray_local):
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.pipeline import run_pipeline

    over = {"crops.betas": "[0.5, 0.4]", "pseudo.grad_scale": "0.25", "data.max_train_images": "8",
            "ray.cpus_per_actor": "0.5", "ray.extract_actors": "[1, 1]", "ray.kmeans_shards": "2", "ray.num_cpus": "2"}
    run = _copy_run(tiny_run_dir, tmp_path / "runs")
    manifest = run_pipeline_ray(tiny_config(tmp_path / "runs", **over), only=["extract", "concepts", "label_bank"])
    fresh_cfg = tiny_config(tmp_path / "fresh", **over)
    run_pipeline(fresh_cfg, only=["extract", "concepts", "label_bank"])
    _assert_same_features(run, fresh_cfg.run_dir)
    assert _covered_ids(run / "features") == _covered_ids(fresh_cfg.run_dir / "features")
    assert sum(_covered_ids(run / "label_bank").values()) == 8
    bank, fresh_bank = read_label_bank(run / "label_bank"), read_label_bank(fresh_cfg.run_dir / "label_bank")
    assert sorted(bank) == sorted(fresh_bank)
    for k in bank:
        np.testing.assert_allclose(bank[k].astype(np.float32), fresh_bank[k].astype(np.float32), atol=2e-3)
    assert manifest["stages"]["extract"]["extra"]["images"] == 8


def test_k_beyond_the_crops_extract_can_give_is_refused_before_any_work(tmp_path, tiny_run_dir):
    """The bound is the real crop count: the tiny run (crops.selection=all) extracted exactly that many crops."""
    from transfgu.preflight import PreflightError, preflight

    meta, _ = read_features(tiny_run_dir / "features")
    crops = meta.num_rows
    preflight(tiny_config(tmp_path, **{"concepts.k_per_pool": f"{{all: {crops}}}"}))  # exactly enough: accepted
    with pytest.raises(PreflightError, match=rf"concepts.k_per_pool.all.*at most {crops} crops"):
        preflight(tiny_config(tmp_path, **{"concepts.k_per_pool": f"{{all: {crops + 1}}}"}))
    assert not (tmp_path / "tiny").exists()  # refused before any work
