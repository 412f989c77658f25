"""Tests of transfgu.store: Parquet contracts read with plain pyarrow, atomic writes, the run manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from transfgu.crops import CropRecords
from transfgu.store import formats
from transfgu.store.atomic import atomic_open, atomic_write_bytes, atomic_write_json, atomic_write_text
from transfgu.store.formats import (
    features_table,
    iter_feature_shards,
    label_bank_table,
    read_features,
    read_label_bank,
    write_parquet_atomic,
)
from transfgu.store.manifest import Manifest, config_hash

D = 12


def _records(n: int, seed: int) -> CropRecords:
    rng = np.random.default_rng(seed)
    return CropRecords(
        crop_index=np.sort(rng.choice(142, n, replace=False)).astype(np.int32),
        scale=rng.choice([0.5, 0.4, 0.3, 0.2], n).astype(np.float32),
        box=rng.integers(0, 640, size=(n, 4)).astype(np.int32),
        pool=rng.choice(["fg", "bg"], n),
        cls=rng.normal(size=(n, D)).astype(np.float32),
    )


def _visible(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# ----------------------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------------------
def test_features_round_trip_with_plain_pyarrow(tmp_path):
    recs = [_records(5, 0), _records(0, 1), _records(3, 2)]
    table = features_table(["a", "b", "c"], "train", recs)
    path = tmp_path / "features" / "part-000.parquet"
    write_parquet_atomic(table, path)

    t = pq.read_table(path)  # plain pyarrow, no transfgu code
    types = {f.name: f.type for f in t.schema}
    assert types == {
        "image_id": pa.string(),
        "split": pa.string(),
        "crop_index": pa.int32(),
        "scale": pa.float32(),
        "box": pa.list_(pa.int32(), 4),
        "pool": pa.string(),
        "cls": pa.list_(pa.float32(), D),
    }
    assert t.num_rows == 8
    assert t["image_id"].to_pylist() == ["a"] * 5 + ["c"] * 3
    assert set(t["split"].to_pylist()) == {"train"}
    want_cls = np.concatenate([r.cls for r in recs])
    got_cls = np.array(t["cls"].to_pylist(), dtype=np.float32)
    assert np.array_equal(got_cls, want_cls)
    assert t["box"].to_pylist() == np.concatenate([r.box for r in recs]).tolist()
    assert t["crop_index"].to_pylist() == np.concatenate([r.crop_index for r in recs]).tolist()
    assert t["pool"].to_pylist() == np.concatenate([r.pool for r in recs]).tolist()
    assert np.array_equal(t["scale"].to_numpy(), np.concatenate([r.scale for r in recs]))
    assert t.schema.metadata[b"dim"] == str(D).encode()

    # chunked and sliced columns (what filters and concatenation produce) convert correctly
    sliced = pa.chunked_array([t["cls"].chunk(0).slice(1, 3), t["cls"].chunk(0).slice(6, 2)])
    assert np.array_equal(formats.fixed_list_to_numpy(sliced), want_cls[[1, 2, 3, 6, 7]])

    meta, cls = read_features(path)
    assert meta.column_names == ["image_id", "split", "crop_index", "scale", "box", "pool"]
    assert cls.dtype == np.float32 and np.array_equal(cls, want_cls)


def test_read_features_directory_pools_and_columns(tmp_path):
    d = tmp_path / "features"
    recs0, recs1 = [_records(6, 3), _records(4, 4)], [_records(7, 5)]
    write_parquet_atomic(features_table(["x0", "x1"], "train", recs0), d / "part-000.parquet")
    write_parquet_atomic(features_table(["y0"], "val", recs1), d / "part-001.parquet")
    (d / ".part-002.parquet.abc.tmp").write_bytes(b"torn")  # a crashed writer's leftover
    (d / "_SUCCESS").write_bytes(b"")
    all_recs = recs0 + recs1
    meta, cls = read_features(d)
    assert meta.num_rows == 17 and cls.shape == (17, D)
    assert np.array_equal(cls, np.concatenate([r.cls for r in all_recs]))
    # plain pyarrow.dataset sees the same rows and skips the hidden temp file
    assert ds.dataset(d, format="parquet").count_rows() == 17

    fg_meta, fg_cls = read_features(d, pools=["fg"])
    pools = np.concatenate([r.pool for r in all_recs])
    assert fg_meta["pool"].to_pylist() == ["fg"] * int((pools == "fg").sum())
    assert np.array_equal(fg_cls, np.concatenate([r.cls for r in all_recs])[pools == "fg"])

    ids_meta, _ = read_features(d, columns=["image_id"], pools=["bg"])
    assert ids_meta.column_names == ["image_id"]
    with pytest.raises(ValueError):
        read_features(d, columns=["nope"])

    shards = list(iter_feature_shards(d))
    assert [p.name for p, _, _ in shards] == ["part-000.parquet", "part-001.parquet"]
    assert [len(c) for _, _, c in shards] == [10, 7]
    with pytest.raises(FileNotFoundError):
        read_features(tmp_path / "missing")


def test_features_table_edge_cases():
    empty = features_table([], "train", [], dim=384)
    assert empty.num_rows == 0 and empty.schema.field("cls").type == pa.list_(pa.float32(), 384)
    with pytest.raises(ValueError):
        features_table([], "train", [])
    with pytest.raises(ValueError):
        features_table(["a", "b"], "train", [_records(2, 0)])
    bad = _records(3, 0)
    bad.cls = bad.cls[:2]
    with pytest.raises(ValueError):
        features_table(["a"], "train", [bad])
    per_image_split = features_table(["a", "b"], ["train", "val"], [_records(1, 0), _records(2, 1)])
    assert per_image_split["split"].to_pylist() == ["train", "val", "val"]


# ----------------------------------------------------------------------------------------------------------
# label bank
# ----------------------------------------------------------------------------------------------------------
def test_label_bank_v2_schema_and_exact_values(tmp_path):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 1 << 32, 16 * 8 * 8, dtype=np.uint64).astype(np.uint32)
    arbitrary = bits.view(np.float32).reshape(16, 8, 8)  # any float32 bit pattern (NaNs included) ...
    arbitrary[arbitrary == 0] = 1.0  # ... except the two zeros, which are "gate closed"
    maps = [arbitrary, rng.random((3, 5, 7)).astype(np.float32)]
    path = tmp_path / "label_bank" / "part-000.parquet"
    write_parquet_atomic(label_bank_table(["img1", "img2"], maps), path)

    t = pq.read_table(path)  # plain pyarrow
    types = {f.name: f.type for f in t.schema}
    assert types == {
        "image_id": pa.string(), "h": pa.int32(), "w": pa.int32(), "K": pa.int32(),
        "attn": pa.large_list(pa.float32()), "gate": pa.binary(),
        "bonus_index": pa.large_list(pa.int32()), "bonus_value": pa.large_list(pa.float32()),
    }
    assert t.schema.metadata[b"format"] == b"transfgu.label_bank/2"
    assert t.to_pydict()["K"] == [16, 3] and t["h"].to_pylist() == [8, 5] and t["w"].to_pylist() == [8, 7]

    bank = read_label_bank(path)
    assert list(bank) == ["img1", "img2"]
    assert bank["img1"].dtype == np.float32 and bank["img1"].shape == (16, 8, 8)
    assert np.array_equal(bank["img1"].view(np.uint32), maps[0].view(np.uint32))
    assert np.array_equal(bank["img2"], maps[1])


def test_label_bank_v1_float16_files_are_still_read(tmp_path, caplog):
    maps = np.random.default_rng(0).random((3, 4, 5)).astype(np.float16)
    v1 = pa.table(
        {"image_id": ["a"], "h": pa.array([4], pa.int32()), "w": pa.array([5], pa.int32()),
         "K": pa.array([3], pa.int32()), "maps": pa.array([maps.reshape(-1)], type=pa.large_list(pa.float16()))}
    ).replace_schema_metadata({"format": "transfgu.label_bank/1"})
    write_parquet_atomic(v1, tmp_path / "part-000.parquet")
    got = read_label_bank(tmp_path)["a"]
    assert got.dtype == np.float32 and np.array_equal(got, maps.astype(np.float32))
    assert "lose most concept decisions" in caplog.text


def test_read_label_bank_directory_and_filter(tmp_path):
    d = tmp_path / "label_bank"
    rng = np.random.default_rng(1)
    maps = {f"im{i}": rng.random((4, 6, 6)).astype(np.float16) for i in range(5)}
    ids = list(maps)
    write_parquet_atomic(label_bank_table(ids[:3], [maps[i] for i in ids[:3]]), d / "part-000.parquet")
    write_parquet_atomic(label_bank_table(ids[3:], [maps[i] for i in ids[3:]]), d / "part-001.parquet")
    got = read_label_bank(d)
    assert sorted(got) == ids and all(np.array_equal(got[i], maps[i]) for i in ids)
    sub = read_label_bank(d, image_ids=["im4", "im1"])
    assert sorted(sub) == ["im1", "im4"] and np.array_equal(sub["im4"], maps["im4"])
    with pytest.raises(KeyError):
        read_label_bank(d, image_ids=["im1", "nope"])
    with pytest.raises(ValueError):
        label_bank_table(["a"], [np.zeros((4, 4), np.float16)])
    assert label_bank_table([], []).num_rows == 0


# ----------------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------------
def test_parquet_write_failing_half_way_leaves_no_file(tmp_path, monkeypatch):
    path = tmp_path / "out" / "part-000.parquet"
    table = features_table(["a"], "train", [_records(4, 0)])

    def broken_write(tbl, where, **kwargs):
        where.write(b"PAR1" + b"\0" * 100)  # some bytes reach the temporary file, then the writer dies
        raise OSError("disk gone")

    monkeypatch.setattr(formats.pq, "write_table", broken_write)
    with pytest.raises(OSError, match="disk gone"):
        write_parquet_atomic(table, path)
    assert _visible(path.parent) == []  # neither the final name nor a temporary file

    monkeypatch.undo()
    write_parquet_atomic(table, path)
    before = path.read_bytes()
    monkeypatch.setattr(formats.pq, "write_table", broken_write)
    with pytest.raises(OSError):
        write_parquet_atomic(features_table(["b"], "train", [_records(9, 1)]), path)
    assert path.read_bytes() == before  # the old complete file survives a failed overwrite
    assert _visible(path.parent) == ["part-000.parquet"]


def test_parquet_writer_failing_mid_stream_leaves_no_file(tmp_path):
    path = tmp_path / "part.parquet"
    table = features_table(["a"], "train", [_records(4, 0)])
    with (
        pytest.raises(RuntimeError, match="producer failed"),
        atomic_open(path) as f,
        pq.ParquetWriter(f, table.schema) as writer,
    ):
        writer.write_table(table)  # a first row group is written ...
        raise RuntimeError("producer failed")  # ... then the producer dies
    assert not path.exists() and _visible(tmp_path) == []


def test_atomic_text_json_bytes(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "héllo")
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\x01")
    atomic_write_json(tmp_path / "sub" / "c.json", {"x": np.float32(1.5), "p": Path("/tmp"), "s": {2, 1}})
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert json.loads((tmp_path / "sub" / "c.json").read_text()) == {"x": 1.5, "p": "/tmp", "s": [1, 2]}
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "d.json", {"x": object()})
    assert not (tmp_path / "d.json").exists()
    assert _visible(tmp_path) == ["a.txt", "b.bin", "sub"]


# ----------------------------------------------------------------------------------------------------------
# manifest and hashes
# ----------------------------------------------------------------------------------------------------------
def test_manifest_semantics(tmp_path):
    m = Manifest.load(tmp_path)
    assert m.stages == {} and not m.is_done("extract") and not (tmp_path / "_manifest.json").exists()

    m.mark_running("extract", input_hash="h1", shards=4)
    assert json.loads((tmp_path / "_manifest.json").read_text())["stages"]["extract"]["status"] == "running"
    assert not m.is_done("extract", "h1")

    m.mark_done("extract", rows=1234, input_hash="h1", outputs=["features/part-000.parquet"], n_images=10)
    assert m.is_done("extract") and m.is_done("extract", "h1") and not m.is_done("extract", "h2")

    disk = Manifest.load(tmp_path)
    rec = disk.stage("extract")
    assert rec["status"] == "done" and rec["rows"] == 1234 and rec["input_hash"] == "h1"
    assert rec["outputs"] == ["features/part-000.parquet"]
    assert rec["extra"] == {"shards": 4, "n_images": 10}
    assert rec["started_at"] and rec["finished_at"] and rec["error"] is None
    assert disk.is_done("extract", "h1")

    # a second writer (another process) records another stage; neither update is lost
    other = Manifest.load(tmp_path)
    other.mark_failed("concepts", error="ValueError: pool 'fg' has 3 crops")
    m.mark_done("label_bank", rows={"label_bank": 10}, input_hash="h3")
    final = Manifest.load(tmp_path)
    assert set(final.stages) == {"extract", "concepts", "label_bank"}
    assert final.stage("concepts")["status"] == "failed" and not final.is_done("concepts")
    assert "3 crops" in final.stage("concepts")["error"]
    assert final.stage("label_bank")["rows"] == {"label_bank": 10}

    # re-running a stage: running clears done; done again with a new hash
    final.mark_running("extract", input_hash="h2")
    assert not final.is_done("extract")
    final.mark_done("extract", rows=5)
    assert final.is_done("extract", "h2")  # the hash given when it started is kept
    assert _visible(tmp_path) == ["_manifest.json"]


def test_config_hash_is_canonical():
    a = {"b": [1, 2], "a": 1, "nested": {"y": 0.5, "x": "s"}}
    b = {"nested": {"x": "s", "y": 0.5}, "a": 1, "b": [1, 2]}
    assert config_hash(a) == config_hash(b)
    canonical = '{"a":1,"b":[1,2],"nested":{"x":"s","y":0.5}}'
    assert config_hash(a) == hashlib.sha256(canonical.encode()).hexdigest()
    assert config_hash(a) != config_hash({**a, "a": 2})
    assert config_hash({"t": (1, 2), "n": np.int64(3)}) == config_hash({"t": [1, 2], "n": 3})
    with pytest.raises(ValueError):
        config_hash({"x": float("nan")})
