"""Training input that streams in bounded memory (issue 14 item 1, transfgu/data/train_store.py).

* the packed label bank gives back the bits of the one bank reader (``LabelMaps.dense()``), and a torn store is
  refused or rebuilt, never read;
* the streaming loader yields exactly the batches of the in-memory ``BankDataset`` loader it replaces (same epoch
  order, same images, same pseudo-label bits) for one process and for each rank of two, with and without loader
  processes and the image store;
* bytes read per training step do not depend on the number of images (N vs 4N), and the same measurement catches
  a reader that loads the whole bank.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import tiny_config
from PIL import Image

from transfgu.data import train_store as ts
from transfgu.data.loaders import BankDataset, make_train_loader, split_records
from transfgu.ddp import step_loader
from transfgu.integrity import stamp_table
from transfgu.methods import stage_hashes
from transfgu.store.formats import LabelMaps, label_bank_table, read_label_bank, write_parquet_atomic


def _maps(rng: np.random.Generator, k: int = 5, h: int = 8, w: int = 10) -> LabelMaps:
    a = rng.random((h, w), dtype=np.float32)
    g = rng.random((k, h, w)) < 0.5
    b = np.where(g & (rng.random((k, h, w)) < 0.3), rng.random((k, h, w), dtype=np.float32) * 1e-3, 0)
    b = b.astype(np.float32)
    return LabelMaps.from_parts(a, g, b, np.where(g, a[None] + b, np.float32(0)).astype(np.float32))


def _write_bank(bank: Path, ids: list[str], bank_hash: str, per_file: int, seed: int = 0, **shape) -> None:
    rng = np.random.default_rng(seed)
    for j in range(0, len(ids), per_file):
        part = ids[j : j + per_file]
        table = label_bank_table(part, [_maps(rng, **shape) for _ in part])
        write_parquet_atomic(stamp_table(table, bank_hash, part), bank / f"part-{j // per_file:05d}.parquet")


def test_packed_rows_are_the_bank_readers_bits(tmp_path):
    rng = np.random.default_rng(1)
    lms = [_maps(rng) for _ in range(4)]
    arbitrary = rng.standard_normal((3, 4, 4)).astype(np.float32)  # stored exactly, no shared part
    arbitrary[0, 0, 0] = -0.0
    write_parquet_atomic(label_bank_table(["a", "b"], lms[:2]), tmp_path / "part-00000.parquet")
    write_parquet_atomic(label_bank_table(["c", "d", "e"], [*lms[2:], arbitrary]), tmp_path / "part-00001.parquet")
    bank = ts.open_packed_bank(tmp_path, "h")
    dense = read_label_bank(tmp_path)
    rows = bank.rows_of(["e", "a", "zz", "c"])
    assert rows.tolist()[2] == -1
    for image_id, r in zip(["e", "a", "c"], rows[[0, 1, 3]]):
        got = bank.row(int(r)).dense()
        assert got.dtype == np.float32 and got.tobytes() == dense[image_id].tobytes()
    # each row is one positional read of exactly its bytes
    assert bank.file.reads == 3 and bank.file.bytes_read == sum(
        int(bank.offsets[r + 1] - bank.offsets[r]) for r in rows[[0, 1, 3]])
    with pytest.raises(ValueError, match="does not hold"):
        ts.decode_record(ts.encode_record(lms[0])[:-4])
    with pytest.raises(ValueError, match="no header"):
        ts.decode_record(ts.encode_record(lms[0])[:8])


def test_stale_or_torn_stores_are_rebuilt_not_read(tmp_path):
    ids = [f"im{i}" for i in range(6)]
    _write_bank(tmp_path, ids[:4], "h1", per_file=2)
    first = ts.open_packed_bank(tmp_path, "h1")
    # the bank grows under the same hash: another key, another packed file with the new rows
    _write_bank(tmp_path, ids, "h1", per_file=2, seed=0)
    grown = ts.open_packed_bank(tmp_path, "h1")
    assert grown.stamp != first.stamp and len(grown) == 6 and len(first) == 4
    # another label-bank hash never reuses a store
    assert ts.open_packed_bank(tmp_path, "h2").stamp != grown.stamp
    # a truncated data file fails the stamp's length check: rebuilt, and the rebuilt rows are right
    data = grown.file.path
    data.write_bytes(data.read_bytes()[:-10])
    again = ts.open_packed_bank(tmp_path, "h1")
    assert again.file.path.stat().st_size == int(again.offsets[-1])
    dense = read_label_bank(tmp_path)
    assert again.row(5).dense().tobytes() == dense["im5"].tobytes()
    meta = json.loads(again.stamp.read_text())
    assert meta["format"] == ts.PACKED_FORMAT and meta["input_hash"] == "h1"


@pytest.mark.parametrize(("workers", "world", "store"), [(0, 1, "true"), (2, 2, "true"), (0, 2, "false")])
def test_streaming_loader_equals_the_in_memory_loader(tmp_path, workers, world, store):
    """Real CamVid images: the batches of every rank are the rank's slice of the one-process BankDataset batches."""
    cfg = tiny_config(tmp_path, **{"data.max_train_images": "7", "train.num_workers": str(workers),
                                   "train.image_store": store})
    records = split_records(cfg, cfg.data.train_split)
    bank_dir = cfg.run_dir / "label_bank"
    ids = [r.image_id for r in records][:6]  # the 7th image is not in the bank: left out, as BankDataset does
    _write_bank(bank_dir, ids, stage_hashes(cfg)["label_bank"], per_file=4)
    ref = step_loader(BankDataset(records, read_label_bank(bank_dir, dense=False), (64, 80)), 4, cfg.run.seed)
    loaders = [make_train_loader(cfg, bank_dir, stage_hashes(cfg)["label_bank"], rank, world) for rank in range(world)]
    assert (bank_dir / ts.STORE_DIR).is_dir()
    assert any(p.suffix == ".u8" for p in (bank_dir / ts.STORE_DIR).iterdir()) == (store == "true")
    for epoch in range(2):
        ref.batch_sampler.set_epoch(epoch)
        for ld in loaders:
            ld.batch_sampler.set_epoch(epoch)
        for want, *pieces in zip(ref, *loaders, strict=True):
            real = [p for p in pieces if bool(p["real"][0])]
            image = torch.cat([p["image"] for p in real])
            pseudo = torch.cat([p["pseudo"] for p in real])
            assert torch.equal(torch.cat([p["index"] for p in real]), want["index"])
            assert torch.equal(image, want["image"])
            assert pseudo.numpy().tobytes() == want["pseudo"].numpy().tobytes()


# -- bytes per step: flat in the number of images ---------------------------------------------------------------------
def _synthetic_dataset(tmp_path: Path, n: int, reader=ts.PackedLabelBank) -> ts.StreamingBankDataset:
    bank_dir = tmp_path / f"bank{n}"
    ids = [f"im{i:06d}" for i in range(n)]
    _write_bank(bank_dir, ids, "h", per_file=max(1, n // 4), k=4, h=4, w=5)
    png = tmp_path / "one.png"
    if not png.exists():
        Image.fromarray(np.arange(3 * 8 * 10, dtype=np.uint8).reshape(8, 10, 3)).save(png)
    bank = reader(ts.open_packed_bank(bank_dir, "h").stamp)
    images = ts.open_image_store(bank_dir, [str(png)] * n, (8, 10), "h")
    return ts.StreamingBankDataset(bank.rows_of(ids), [str(png)] * n, bank, (8, 10), images=images)


def _bytes_per_step(ds: ts.StreamingBankDataset, batch: int = 8, steps: int = 3) -> tuple[list[int], list[int]]:
    """Bytes read per step, and the bytes of the step's own records and images."""
    loader = step_loader(ds, batch, seed=0)
    size = np.diff(ds.bank.offsets)
    got, own, before = [], [], 0
    for _, b in zip(range(steps), loader):
        c = ds.counters()
        got.append(c.bank_bytes + c.image_bytes - before)
        before = c.bank_bytes + c.image_bytes
        own.append(int(sum(size[ds.bank_rows[int(i)]] + 3 * 8 * 10 for i in b["index"])))
    return got, own


class _WholeBankReader(ts.PackedLabelBank):
    """Sabotage: a reader that reads the whole packed bank for each row (what loading the bank amounts to)."""

    def row(self, r: int) -> LabelMaps:
        buf = self.file.pread(0, int(self.offsets[-1]))
        return ts.decode_record(buf[int(self.offsets[r]) : int(self.offsets[r + 1])])


def test_bytes_per_step_do_not_grow_with_the_images(tmp_path):
    small, large = _synthetic_dataset(tmp_path, 50), _synthetic_dataset(tmp_path, 200)
    (got_small, own_small), (got_large, own_large) = _bytes_per_step(small), _bytes_per_step(large)
    # a step reads its batch's records and images and nothing else, at N and at 4N ...
    assert got_small == own_small and got_large == own_large
    assert np.mean(got_large) == pytest.approx(np.mean(got_small), rel=0.1)
    # ... and the same measurement catches a reader that reads the whole bank
    bad_small, _ = _bytes_per_step(_synthetic_dataset(tmp_path / "s", 50, _WholeBankReader))
    bad_large, _ = _bytes_per_step(_synthetic_dataset(tmp_path / "l", 200, _WholeBankReader))
    assert np.mean(bad_large) > 3 * np.mean(bad_small) and np.mean(bad_small) > 5 * np.mean(got_small)


def test_how_the_input_is_read_is_not_part_of_the_train_hash(tmp_path):
    plain = stage_hashes(tiny_config(tmp_path, **{"train.num_workers": "0", "train.image_store": "false"}))
    other = stage_hashes(tiny_config(tmp_path, **{"train.num_workers": "auto", "train.image_store": "true"}))
    assert plain["train"] == other["train"]
    assert stage_hashes(tiny_config(tmp_path, **{"train.epochs": "3"}))["train"] != plain["train"]
    # auto: the CPUs less one for the training step, at most 8; none on a 2-CPU worker
    assert [ts.resolve_loader_workers("auto", c) for c in (1, 2, 3, 4, 16)] == [0, 0, 2, 3, 8]
    assert ts.resolve_loader_workers(5, 2) == 5
