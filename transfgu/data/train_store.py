"""Training input that streams in bounded memory (issue 14 item 1): a packed label bank and a train-size image store.

Training reads every image and its pseudo labels once per epoch, in the epoch order of :mod:`transfgu.ddp`. Holding
the label bank in a dict grows with the data set (COCO-Stuff-171: 117k images x 171 maps, docs/cost_model.md), and
reading rows of Parquet shards by id scans every shard. Both stores below are written once next to the label bank
(``label_bank/_train_input/``, a name every bank reader skips) and then read by **positional reads**: ``os.pread``
of exactly one record's bytes at an offset from a small index. Nothing is memory-mapped (touched mapped pages count
in a process's RSS), and nothing but the index (8 bytes a row) stays in memory, so a training process holds the
same memory at 20k and at 80k images and reads bytes in proportion to its batch (bench/train_input.py).

* **Packed label bank** ``bank-<key12>.rows``: the compact rows of the bank (:class:`transfgu.store.formats.LabelMaps`,
  lossless) one after another, each a small header and a zstd-compressed payload (``a_hat``, the gate bits, the
  kept-bonus positions as deltas and their values; :func:`encode_record`), so a row costs about what it costs in
  the Parquet bank. :meth:`PackedLabelBank.row` returns the same ``LabelMaps``
  as :func:`transfgu.store.formats.read_label_bank` (``dense()`` bit-identical, tested).
* **Image store** ``images-<key12>.u8`` (``train.image_store``): every training image resized to the train size
  as ``3 x H x W`` uint8 (:func:`transfgu.data.transforms.to_uint8_chw`, the very bytes training used to decode),
  row ``i`` at ``i * 3HW``; written once, so epochs do not decode JPEGs again.

Each store is **stamped** like the stage outputs (:mod:`transfgu.integrity`): a JSON file written last records
its format, the label bank's input hash and a key of what it was built from (the bank's shard files, or the image
paths and train size). A store whose stamp is missing, of another key, or whose data file has the wrong length is
never read; it is rebuilt. Writes go to a temporary name and are renamed, so concurrent builders (Ray Train
workers, Tune trials sharing a bank) at worst build the same file twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from transfgu.data.io import load_rgb
from transfgu.data.transforms import to_uint8_chw
from transfgu.layout import TRAIN_INPUT_DIR
from transfgu.store.atomic import atomic_open, atomic_write_json
from transfgu.store.formats import LabelMaps, list_parquet_files, read_label_bank
from transfgu.store.manifest import config_hash

log = logging.getLogger(__name__)

STORE_DIR = TRAIN_INPUT_DIR  # the name RunLayout.train_input has
PACKED_FORMAT = "transfgu.packed_label_bank/1"
IMAGES_FORMAT = "transfgu.train_images/1"
_HEADER = struct.Struct("<5i")  # K, h, w, n_bonus, bytes of the uncompressed payload
_CODEC = "zstd"


def _shuffle(a: np.ndarray) -> bytes:
    """Byte-stream split of 4-byte values (Parquet's BYTE_STREAM_SPLIT): the k-th bytes of all values together,
    which zstd compresses far better for floats and small deltas."""
    return np.ascontiguousarray(a).view(np.uint8).reshape(-1, 4).T.tobytes()


def _unshuffle(buf: bytes, n: int, offset: int, dtype: str) -> np.ndarray:
    return np.frombuffer(buf, np.uint8, 4 * n, offset).reshape(4, n).T.copy().view(dtype).reshape(n)


def encode_record(lm: LabelMaps) -> bytes:
    """The packed bytes of one image's compact maps (lossless; :func:`decode_record` inverts it).

    Payload: ``a_hat`` (float32), the gate bits, the bonus positions as deltas (int32) and the values (float32),
    the 4-byte arrays byte-stream split, compressed with zstd as a whole (the label bank's Parquet encodings, per
    row).
    """
    k, h, w = lm.shape
    index = np.asarray(lm.index, dtype=np.int64)
    delta = np.diff(index, prepend=0).astype("<i4")
    payload = b"".join((
        _shuffle(np.asarray(lm.attn, dtype="<f4").reshape(-1)),
        np.packbits(lm.gate.reshape(-1), bitorder="little").tobytes(),
        _shuffle(delta),
        _shuffle(np.asarray(lm.value, dtype="<f4")),
    ))
    body = pa.compress(payload, codec=_CODEC, asbytes=True)
    return _HEADER.pack(k, h, w, int(index.size), len(payload)) + body


def decode_record(buf: bytes | memoryview, where: str = "packed label bank") -> LabelMaps:
    """:class:`LabelMaps` of one packed record; ``ValueError`` (naming ``where``) when the bytes do not add up."""
    if len(buf) < _HEADER.size:
        raise ValueError(f"{where}: a record of {len(buf)} bytes has no header")
    k, h, w, nb, raw = _HEADER.unpack_from(buf, 0)
    n = k * h * w
    sizes = (4 * h * w, (n + 7) // 8, 4 * nb, 4 * nb)
    if min(k, h, w, nb) < 0 or raw != sum(sizes):
        raise ValueError(f"{where}: a record does not hold K={k} x {h} x {w} maps")
    try:
        payload = pa.decompress(memoryview(buf)[_HEADER.size :], decompressed_size=raw, codec=_CODEC, asbytes=True)
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{where}: a record does not hold K={k} x {h} x {w} maps ({exc})") from exc
    o = 0
    attn = _unshuffle(payload, h * w, o, "<f4").reshape(h, w)
    o += sizes[0]
    gate = np.unpackbits(np.frombuffer(payload, np.uint8, sizes[1], o), count=n, bitorder="little").astype(bool)
    o += sizes[1]
    index = np.cumsum(_unshuffle(payload, nb, o, "<i4"), dtype=np.int64)
    o += sizes[2]
    value = _unshuffle(payload, nb, o, "<f4")
    if nb and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(f"{where}: bonus positions outside K*h*w={n}")
    return LabelMaps(attn.astype(np.float32), gate.reshape(k, h, w), index, value.astype(np.float32))


# -- positional reads ------------------------------------------------------------------------------------------------
class PositionalFile:
    """A file read only with ``os.pread``/``os.preadv`` at given offsets; counts the bytes it read.

    The descriptor is opened lazily in each process (DataLoader workers fork or unpickle the dataset), so one
    object serves the main process and every worker.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.bytes_read = 0
        self.reads = 0
        self._fd: int | None = None
        self._pid = -1

    def _fileno(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd = os.open(self.path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fileno(), length, offset)
        if len(data) != length:
            raise ValueError(f"{self.path}: short read ({len(data)} of {length} bytes at {offset}); file truncated?")
        self.bytes_read += length
        self.reads += 1
        return data

    def readinto(self, offset: int, out: np.ndarray) -> np.ndarray:
        got = os.preadv(self._fileno(), [memoryview(out).cast("B")], offset)
        if got != out.nbytes:
            raise ValueError(f"{self.path}: short read ({got} of {out.nbytes} bytes at {offset}); file truncated?")
        self.bytes_read += got
        self.reads += 1
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)


# -- stamps ----------------------------------------------------------------------------------------------------------
def _read_stamp(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _valid(stamp: dict[str, Any] | None, fmt: str, key: str, data: Path) -> bool:
    return (stamp is not None and stamp.get("format") == fmt and stamp.get("key") == key and data.is_file()
            and data.stat().st_size == int(stamp.get("bytes", -1)))


def store_dir(bank_dir: Path) -> Path:
    """Where a bank's training stores live (skipped by every bank reader: the name starts with ``_``)."""
    return Path(bank_dir) / STORE_DIR


# -- packed label bank -----------------------------------------------------------------------------------------------
def bank_key(bank_dir: Path, bank_hash: str | None) -> str:
    """What a packed bank is built from: the bank's input hash and its shard files (name, size, rows)."""
    shards = [(p.name, p.stat().st_size, pq.ParquetFile(p).metadata.num_rows) for p in list_parquet_files(bank_dir)]
    return config_hash({"format": PACKED_FORMAT, "input_hash": bank_hash, "shards": shards})


def _bank_rows(bank_dir: Path) -> Iterator[tuple[str, LabelMaps]]:
    """Every bank row, one shard file in memory at a time (file-name order, rows in file order)."""
    for path in list_parquet_files(bank_dir):
        for image_id, m in read_label_bank(path, dense=False).items():
            yield image_id, m if isinstance(m, LabelMaps) else LabelMaps.from_dense(m)


def write_packed_bank(bank_dir: Path, bank_hash: str | None) -> Path:
    """Pack the bank of ``bank_dir`` once; returns its stamp file. Memory: one shard file's rows."""
    key = bank_key(bank_dir, bank_hash)
    out = store_dir(bank_dir)
    data, index, id_file, stamp = (out / f"bank-{key[:12]}.{ext}" for ext in ("rows", "index.npy", "ids.json", "json"))
    ids: list[str] = []
    offsets = [0]
    with atomic_open(data, "wb") as f:
        for image_id, lm in _bank_rows(bank_dir):
            rec = encode_record(lm)
            f.write(rec)
            ids.append(image_id)
            offsets.append(offsets[-1] + len(rec))
    if len(set(ids)) != len(ids):
        raise ValueError(f"{bank_dir}: the label bank lists an image twice")
    with atomic_open(index, "wb") as f:
        np.save(f, np.asarray(offsets, dtype=np.int64), allow_pickle=False)
    atomic_write_json(id_file, ids, indent=None)
    atomic_write_json(stamp, {"format": PACKED_FORMAT, "key": key, "input_hash": bank_hash, "rows": len(ids),
                              "bytes": offsets[-1], "data": data.name, "index": index.name, "ids": id_file.name})
    log.info("[train] packed %d label-bank rows (%.1f MiB) into %s", len(ids), offsets[-1] / 2**20, data)
    return stamp


class PackedLabelBank:
    """Rows of a packed label bank by row number, each read with one ``pread`` of exactly its bytes."""

    def __init__(self, stamp: Path) -> None:
        meta = _read_stamp(stamp)
        if meta is None or meta.get("format") != PACKED_FORMAT:
            raise ValueError(f"{stamp}: not a {PACKED_FORMAT} stamp")
        self.stamp = Path(stamp)
        self.offsets = np.load(self.stamp.parent / meta["index"])
        self.file = PositionalFile(self.stamp.parent / meta["data"])
        if len(self.offsets) != int(meta["rows"]) + 1 or self.file.path.stat().st_size != int(self.offsets[-1]):
            raise ValueError(f"{stamp}: index and data file do not match; delete {self.stamp.parent} to rebuild")
        self.input_hash = meta.get("input_hash")
        self.ids_file = str(meta["ids"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """Row number of each id (-1 when not in the bank), from the stamp's id list (read now, not kept)."""
        ids = json.loads((self.stamp.parent / self.ids_file).read_text(encoding="utf-8"))
        if len(ids) != len(self):
            raise ValueError(f"{self.stamp}: {len(ids)} image ids for {len(self)} rows")
        pos = {i: r for r, i in enumerate(ids)}
        return np.asarray([pos.get(i, -1) for i in image_ids], dtype=np.int64)

    def row(self, r: int) -> LabelMaps:
        lo, hi = int(self.offsets[r]), int(self.offsets[r + 1])
        return decode_record(self.file.pread(lo, hi - lo), f"{self.file.path} row {r}")


def open_packed_bank(bank_dir: Path, bank_hash: str | None) -> PackedLabelBank:
    """The packed form of ``bank_dir`` (written now when missing or stale)."""
    key = bank_key(bank_dir, bank_hash)
    stamp = store_dir(bank_dir) / f"bank-{key[:12]}.json"
    meta = _read_stamp(stamp)
    if not _valid(meta, PACKED_FORMAT, key, stamp.parent / f"bank-{key[:12]}.rows"):
        stamp = write_packed_bank(bank_dir, bank_hash)
    return PackedLabelBank(stamp)


# -- image store -----------------------------------------------------------------------------------------------------
class _DecodeRecords(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[str], size: tuple[int, int]) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return to_uint8_chw(load_rgb(self.paths[i]), self.size)


def images_key(paths: Sequence[str], size: tuple[int, int]) -> str:
    """What an image store is built from: the image paths in row order and the train size (like every stage input
    of the pipeline, the files are identified by path, not content)."""
    return config_hash({"format": IMAGES_FORMAT, "size": list(size), "paths": [str(p) for p in paths]})


def write_image_store(out: Path, paths: Sequence[str], size: tuple[int, int], bank_hash: str | None,
                      num_workers: int = 0) -> Path | None:
    """Decode every image once (``num_workers`` processes) into a train-size uint8 store; returns its stamp, or
    None (with a warning) when the store would not fit on the disk -- training then decodes every epoch."""
    key = images_key(paths, size)
    stride = 3 * int(size[0]) * int(size[1])
    need = stride * len(paths)
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if need > 0.8 * free:
        log.warning("[train] the train-size image store needs %.1f GiB but %s has %.1f GiB free; decoding the "
                    "images every epoch instead (train.image_store=false silences this)", need / 2**30, out,
                    free / 2**30)
        return None
    data, stamp = out / f"images-{key[:12]}.u8", out / f"images-{key[:12]}.json"
    loader = torch.utils.data.DataLoader(_DecodeRecords(paths, size), batch_size=None, num_workers=num_workers)
    with atomic_open(data, "wb") as f:
        for img in loader:
            f.write(img.contiguous().numpy().tobytes())
    atomic_write_json(stamp, {"format": IMAGES_FORMAT, "key": key, "input_hash": bank_hash, "rows": len(paths),
                              "size": list(size), "bytes": need, "data": data.name})
    log.info("[train] wrote %d train-size images (%.1f MiB) to %s", len(paths), need / 2**20, data)
    return stamp


class ImageStore:
    """Row ``i`` of a train-size uint8 image store: one ``preadv`` of ``3 x H x W`` bytes into a fresh tensor."""

    def __init__(self, stamp: Path) -> None:
        meta = _read_stamp(stamp)
        if meta is None or meta.get("format") != IMAGES_FORMAT:
            raise ValueError(f"{stamp}: not a {IMAGES_FORMAT} stamp")
        self.size = (int(meta["size"][0]), int(meta["size"][1]))
        self.rows = int(meta["rows"])
        self.file = PositionalFile(Path(stamp).parent / meta["data"])

    def row(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.rows:
            raise IndexError(f"image store row {i} of {self.rows}")
        h, w = self.size
        buf = np.empty((3, h, w), dtype=np.uint8)
        return torch.from_numpy(self.file.readinto(i * buf.nbytes, buf))


def open_image_store(bank_dir: Path, paths: Sequence[str], size: tuple[int, int], bank_hash: str | None,
                     num_workers: int = 0) -> ImageStore | None:
    key = images_key(paths, size)
    out = store_dir(bank_dir)
    stamp = out / f"images-{key[:12]}.json"
    if not _valid(_read_stamp(stamp), IMAGES_FORMAT, key, out / f"images-{key[:12]}.u8"):
        written = write_image_store(out, paths, size, bank_hash, num_workers)
        if written is None:
            return None
        stamp = written
    return ImageStore(stamp)


# -- the training dataset --------------------------------------------------------------------------------------------
@dataclass
class ReadCounters:
    """Bytes and reads of a dataset's stores in this process (DataLoader workers count their own)."""

    bank_bytes: int
    bank_reads: int
    image_bytes: int
    image_reads: int


class StreamingBankDataset(torch.utils.data.Dataset):
    """Training images at the train size (uint8) with their pseudo labels, read per item from the stores above.

    Items, their order and their values are :class:`transfgu.data.loaders.BankDataset`'s (the records that are in
    the bank, ``repeat`` passes), so the epoch order of :mod:`transfgu.ddp` is unchanged; what differs is memory:
    this holds the bank row of each image (int64) and the image paths (one bytes array) instead of every bank
    row, and reads one row per item.
    """

    def __init__(self, bank_rows: np.ndarray, image_paths: Sequence[str], bank: PackedLabelBank,
                 train_size: tuple[int, int], repeat: int = 1, images: ImageStore | None = None) -> None:
        self.bank_rows = np.asarray(bank_rows, dtype=np.int64)
        if len(image_paths) != len(self.bank_rows):
            raise ValueError(f"{len(image_paths)} image paths for {len(self.bank_rows)} bank rows")
        # one bytes array, not a list of str objects: no per-image Python object (nor refcount writes in forked
        # DataLoader workers, which would copy the pages)
        self.paths = np.asarray([os.fsencode(str(p)) for p in image_paths], dtype=np.bytes_)
        self.bank = bank
        self.size = (int(train_size[0]), int(train_size[1]))
        self.repeat = int(repeat)
        self.images = images
        if images is not None and (images.rows != len(self.bank_rows) or images.size != self.size):
            raise ValueError(f"image store of {images.rows} x {images.size} for {len(self.bank_rows)} images at "
                             f"{self.size}")

    @property
    def n_images(self) -> int:
        return len(self.bank_rows)

    def __len__(self) -> int:
        return self.n_images * self.repeat

    def image(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images.row(i)
        return to_uint8_chw(load_rgb(os.fsdecode(self.paths[i])), self.size)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        i = idx % self.n_images
        pseudo = torch.from_numpy(self.bank.row(int(self.bank_rows[i])).dense())
        return {"image": self.image(i), "pseudo": pseudo}

    def counters(self) -> ReadCounters:
        img = self.images.file if self.images is not None else None
        return ReadCounters(self.bank.file.bytes_read, self.bank.file.reads,
                            img.bytes_read if img else 0, img.reads if img else 0)


def resolve_loader_workers(setting: int | str, cpus: float | None = None) -> int:
    """``train.num_workers``: a number, or ``auto`` = the CPUs of this process (or ``cpus``) less one for the
    training step, at most 8; 0 (decode in the training process) on two CPUs or fewer."""
    if setting != "auto":
        return int(setting)
    n = int(cpus) if cpus is not None else len(os.sched_getaffinity(0))
    return 0 if n <= 2 else min(8, n - 1)
