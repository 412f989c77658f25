"""The Parquet formats of a pipeline run (docs/architecture.md, "Stages"): the crop features and the label bank.

Every file is readable with plain ``pyarrow.parquet`` or ``json``; nothing is pickled.

``features/*.parquet`` -- one row per kept crop (stage 1, extract; docs/architecture.md)::

    image_id    string                        image identifier (unique within the data set)
    split       string                        data split the image came from
    crop_index  int32                         window index in the image's WindowLayout
    scale       float32                       window scale beta
    box         fixed_size_list<int32>[4]     box (x0, y0, x1, y1) in the stage-size image (exclusive ends)
    pool        string                        "fg" | "bg" | "all"
    cls         fixed_size_list<float32>[D]   final-LayerNorm CLS token of the resized crop (raw)

``label_bank/*.parquet`` -- one row per image (stage 3, label_bank), format ``transfgu.label_bank/2``::

    image_id     string
    h, w, K      int32                   token grid and number of concept maps
    attn         large_list<float>       a_hat, the shared normalised CLS attention (h*w values, float32)
    gate         binary                  1[g_k <= 0] for the K*h*w positions, C order, np.packbits(bitorder="little")
    bonus_index  large_list<int32>       flat positions k*h*w + j (ascending) where concept k has a kept bonus
    bonus_value  large_list<float>       the map value M_k(j) = a_hat(j) + r_k(j) there (float32, exact)

The maps of eq. 7 are ``M_k = gate_k * (a_hat + bonus_k)``: every concept that passes the gate shares ``a_hat``, so
the decision between concepts comes from the small bonus alone (the median gap between the best and second-best
concept is ~3e-5 on CamVid at K = 171, issue 12). Storing ``a_hat`` once, the gate as bits and the final value at
the kept-bonus positions as float32 reconstructs the float32 maps **bit for bit** (:meth:`LabelMaps.dense`), so
every argmax and gate decision of the definition survives storage, for a fraction of the reference's float32
pickles (BENCHMARKS.md, "Label bank format"). The previous format (``transfgu.label_bank/1``, dense float16) kept
only 9-43 % of the argmax decisions; it is still read (as float32, with a warning) so old runs stay inspectable.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from transfgu.store.atomic import PathLike, atomic_open

_log = logging.getLogger(__name__)

FEATURES_FORMAT = "transfgu.features/1"
LABEL_BANK_FORMAT = "transfgu.label_bank/2"
LABEL_BANK_FORMAT_V1 = "transfgu.label_bank/1"
FEATURE_META_COLUMNS = ("image_id", "split", "crop_index", "scale", "box", "pool")

#: zstd levels, chosen by measurement (``python -m bench.storage``; BENCHMARKS.md §8, "zstd level"): the smallest
#: file whose write on one thread keeps up with the H200 rate of the stage's model. The label bank: level 1 (the
#: fastest; at K = 171 no level keeps up with ~1,000 images/s on one thread of the 2-core VM, level 3 costs 1.4x the
#: time for 4 % fewer bytes). Features and the other tables: level 3 (every level well within the extract model's
#: ~36 ms/image; 3 is the smallest file).
ZSTD_LEVEL = 3
ZSTD_LEVEL_LABEL_BANK = 1


def parquet_options(table: pa.Table, compression: str = "zstd", **kwargs: Any) -> dict[str, Any]:
    """The ``pq.write_table`` options the pipeline writes ``table`` with (also what ``bench.storage`` times).

    Label-bank tables get their measured encodings (BENCHMARKS.md, "Label bank format"): sorted positions delta-
    encoded, float32 values byte-stream-split, which zstd then compresses to 0.40 of the reference's pickles
    instead of 0.61 with Parquet's defaults. zstd runs at :data:`ZSTD_LEVEL_LABEL_BANK` (label bank) or
    :data:`ZSTD_LEVEL` (other tables) unless ``compression_level`` is given.
    """
    bank = (table.schema.metadata or {}).get(b"format") == LABEL_BANK_FORMAT.encode()
    if bank and "column_encoding" not in kwargs:
        kwargs.setdefault("use_dictionary", ["image_id"])
        kwargs["column_encoding"] = {"attn": "BYTE_STREAM_SPLIT", "bonus_index": "DELTA_BINARY_PACKED",
                                     "bonus_value": "BYTE_STREAM_SPLIT"}
    if compression == "zstd":
        kwargs.setdefault("compression_level", ZSTD_LEVEL_LABEL_BANK if bank else ZSTD_LEVEL)
    return {"compression": compression, **kwargs}


def write_parquet_atomic(table: pa.Table, path: PathLike, compression: str = "zstd", **kwargs: Any) -> None:
    """``pq.write_table`` to a temporary name in the same directory, fsync, ``os.replace`` onto ``path``, with
    :func:`parquet_options` (the label bank's encodings, the measured zstd level)."""
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f, **parquet_options(table, compression, **kwargs))


# ----------------------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------------------
class _CropRecordsLike(Protocol):
    crop_index: np.ndarray
    scale: np.ndarray
    box: np.ndarray
    pool: np.ndarray
    cls: np.ndarray


def features_schema(dim: int) -> pa.Schema:
    """Arrow schema of ``features/*.parquet`` for ``dim``-dimensional CLS features."""
    return pa.schema(
        [
            pa.field("image_id", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("crop_index", pa.int32(), nullable=False),
            pa.field("scale", pa.float32(), nullable=False),
            pa.field("box", pa.list_(pa.int32(), 4), nullable=False),
            pa.field("pool", pa.string(), nullable=False),
            pa.field("cls", pa.list_(pa.float32(), int(dim)), nullable=False),
        ],
        metadata={"format": FEATURES_FORMAT, "dim": str(int(dim))},
    )


def _fixed_list(values: np.ndarray, size: int, typ: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=typ)
    return pa.FixedSizeListArray.from_arrays(flat, size)


def features_table(
    image_ids: Sequence[str],
    split: str | Sequence[str],
    records: Sequence[_CropRecordsLike],
    dim: int | None = None,
) -> pa.Table:
    """One row per crop from per-image crop records (``transfgu.crops.CropRecords``), in image order."""
    if len(image_ids) != len(records):
        raise ValueError(f"{len(image_ids)} image ids for {len(records)} crop records")
    splits = [split] * len(records) if isinstance(split, str) else list(split)
    if len(splits) != len(records):
        raise ValueError(f"{len(splits)} splits for {len(records)} crop records")
    if dim is None:
        if not records:
            raise ValueError("dim is required to build a table from zero records")
        dim = int(np.shape(records[0].cls)[1])
    counts = np.array([len(r.crop_index) for r in records], dtype=np.int64)
    for r, n in zip(records, counts):
        if np.shape(r.cls) != (n, dim) or np.shape(r.box) != (n, 4) or len(r.scale) != n or len(r.pool) != n:
            raise ValueError(
                f"inconsistent crop record: {n} crops, cls {np.shape(r.cls)}, box {np.shape(r.box)}"
            )

    def cat(attr: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        parts = [np.asarray(getattr(r, attr), dtype=dtype).reshape(-1, *shape) for r in records]
        return np.concatenate(parts) if parts else np.zeros((0, *shape), dtype=dtype)

    schema = features_schema(dim)
    columns = [
        pa.array(np.repeat(np.asarray(list(image_ids), dtype=object), counts), type=pa.string()),
        pa.array(np.repeat(np.asarray(splits, dtype=object), counts), type=pa.string()),
        pa.array(cat("crop_index", np.int32, ()), type=pa.int32()),
        pa.array(cat("scale", np.float32, ()), type=pa.float32()),
        _fixed_list(cat("box", np.int32, (4,)), 4, pa.int32()),
        pa.array(cat("pool", object, ()).astype(str).tolist(), type=pa.string()),
        _fixed_list(cat("cls", np.float32, (dim,)), dim, pa.float32()),
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def list_parquet_files(path_or_dir: PathLike) -> list[Path]:
    """``[path]`` for a file, else the sorted visible ``*.parquet`` files of the directory."""
    p = Path(path_or_dir)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(f"no Parquet file or directory at {p}")
    return sorted(f for f in p.glob("*.parquet") if not f.name.startswith((".", "_")) and f.is_file())


def fixed_list_to_numpy(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """``(n, size)`` numpy view/copy of a fixed_size_list column (respects slicing of the chunks)."""
    chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
    size = col.type.list_size
    dtype = col.type.value_type.to_pandas_dtype()
    parts = [c.flatten().to_numpy(zero_copy_only=False).reshape(-1, size) for c in chunks if len(c)]
    return np.concatenate(parts) if parts else np.zeros((0, size), dtype=dtype)


def _read_one_features(
    path: Path, columns: Sequence[str] | None, pools: Sequence[str] | None
) -> tuple[pa.Table, np.ndarray]:
    meta_cols = list(FEATURE_META_COLUMNS if columns is None else columns)
    unknown = set(meta_cols) - set(FEATURE_META_COLUMNS)
    if unknown:
        raise ValueError(f"unknown feature columns {sorted(unknown)}; choose from {FEATURE_META_COLUMNS}")
    read_cols = [c for c in meta_cols if c != "cls"] + ["cls"]
    if pools is not None and "pool" not in read_cols:
        read_cols.append("pool")
    table = pq.read_table(path, columns=read_cols)
    if pools is not None:
        table = table.filter(pc.is_in(table["pool"], value_set=pa.array(list(pools), type=pa.string())))
    cls = fixed_list_to_numpy(table["cls"]).astype(np.float32, copy=False)
    return table.select([c for c in meta_cols if c != "cls"]), cls


def iter_feature_shards(
    path_or_dir: PathLike, columns: Sequence[str] | None = None, pools: Sequence[str] | None = None
) -> Iterator[tuple[Path, pa.Table, np.ndarray]]:
    """Yield ``(path, meta table, cls (n, D) float32)`` per features shard, in file-name order."""
    for path in list_parquet_files(path_or_dir):
        meta, cls = _read_one_features(path, columns, pools)
        yield path, meta, cls


def read_features(
    path_or_dir: PathLike, columns: Sequence[str] | None = None, pools: Sequence[str] | None = None
) -> tuple[pa.Table, np.ndarray]:
    """All crops of a features file or directory: ``(meta table without cls, cls (n, D) float32)``.

    Args:
        columns: meta columns to return (default: all but ``cls``).
        pools: keep only crops whose pool is in this list (e.g. ``["fg"]``).
    """
    metas, feats = [], []
    for _, meta, cls in iter_feature_shards(path_or_dir, columns, pools):
        metas.append(meta)
        feats.append(cls)
    if not metas:
        raise FileNotFoundError(f"no features Parquet files under {path_or_dir}")
    return pa.concat_tables(metas), np.concatenate(feats, axis=0)


# ----------------------------------------------------------------------------------------------------------
# Label bank
# ----------------------------------------------------------------------------------------------------------
LABEL_BANK_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("h", pa.int32(), nullable=False),
        pa.field("w", pa.int32(), nullable=False),
        pa.field("K", pa.int32(), nullable=False),
        pa.field("attn", pa.large_list(pa.float32()), nullable=False),
        pa.field("gate", pa.binary(), nullable=False),
        pa.field("bonus_index", pa.large_list(pa.int32()), nullable=False),
        pa.field("bonus_value", pa.large_list(pa.float32()), nullable=False),
    ],
    metadata={"format": LABEL_BANK_FORMAT},
)


@dataclass(frozen=True)
class LabelMaps:
    """One image's concept maps in the lossless label-bank layout (see the module docstring).

    ``attn`` ``(h, w)`` float32 is the shared ``a_hat``; ``gate`` ``(K, h, w)`` bool the per-concept gate;
    ``index`` (int64, flat positions into ``(K, h, w)``, ascending) and ``value`` (float32) the map values that
    differ from ``gate * attn``. :meth:`dense` gives the ``(K, h, w)`` float32 maps.
    """

    attn: np.ndarray
    gate: np.ndarray
    index: np.ndarray
    value: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(x) for x in self.gate.shape)  # type: ignore[return-value]

    def dense(self) -> np.ndarray:
        """``(K, h, w)`` float32: ``attn`` where the gate is open, 0 where closed, ``value`` at ``index``."""
        out = np.where(self.gate, self.attn[None], np.float32(0)).astype(np.float32, copy=False)
        out.reshape(-1)[self.index] = self.value
        return out

    def argmax(self) -> np.ndarray:
        """``(h, w)`` winning concept per position (lowest index on ties, as ``np.argmax`` and ``torch.argmax``)."""
        return self.dense().argmax(axis=0)

    @classmethod
    def from_parts(cls, a_hat: np.ndarray, gate: np.ndarray, bonus: np.ndarray, maps: np.ndarray) -> LabelMaps:
        """From eq. 7's pieces of one image: ``a_hat`` (h, w), ``gate`` and ``bonus`` (K, h, w) and the maps that
        the definition computed from them (so the stored values are the computed ones, bit for bit)."""
        index = np.flatnonzero(np.asarray(bonus).reshape(-1) != 0)
        value = np.asarray(maps, dtype=np.float32).reshape(-1)[index]
        return cls(
            attn=np.ascontiguousarray(a_hat, dtype=np.float32),
            gate=np.ascontiguousarray(gate, dtype=bool),
            index=index.astype(np.int64),
            value=np.ascontiguousarray(value, dtype=np.float32),
        )

    @classmethod
    def from_dense(cls, maps: np.ndarray) -> LabelMaps:
        """Any ``(K, h, w)`` float maps, losslessly (no shared part: every non-zero value is listed)."""
        m = np.asarray(maps, dtype=np.float32)
        if m.ndim != 3:
            raise ValueError(f"each label map must be (K, h, w), got shape {m.shape}")
        index = np.flatnonzero(m.reshape(-1))
        return cls(np.zeros(m.shape[1:], np.float32), m != 0, index.astype(np.int64), m.reshape(-1)[index].copy())


def _as_label_maps(m: LabelMaps | np.ndarray) -> LabelMaps:
    if isinstance(m, LabelMaps):
        if m.gate.ndim != 3 or m.attn.shape != m.gate.shape[1:] or m.index.shape != m.value.shape:
            raise ValueError(f"inconsistent LabelMaps: attn {m.attn.shape}, gate {m.gate.shape}")
        return m
    if np.ndim(m) != 3:
        raise ValueError(f"each label map must be (K, h, w), got shape {np.shape(m)}")
    return LabelMaps.from_dense(np.asarray(m))


def _large_list(parts: Sequence[np.ndarray], typ: pa.DataType) -> pa.LargeListArray:
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    dtype = typ.to_pandas_dtype()
    flat = np.concatenate([np.asarray(p, dtype=dtype) for p in parts]) if parts else np.zeros(0, dtype=dtype)
    return pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), pa.array(flat, type=typ))


def label_bank_table(image_ids: Sequence[str], maps: Sequence[LabelMaps | np.ndarray]) -> pa.Table:
    """One row per image: ``maps[i]`` is a :class:`LabelMaps`, or any ``(K, h, w)`` float array (stored exactly)."""
    if len(image_ids) != len(maps):
        raise ValueError(f"{len(image_ids)} image ids for {len(maps)} maps")
    lm = [_as_label_maps(m) for m in maps]
    shapes = [m.shape for m in lm]
    columns = [
        pa.array(list(image_ids), type=pa.string()),
        pa.array([s[1] for s in shapes], type=pa.int32()),
        pa.array([s[2] for s in shapes], type=pa.int32()),
        pa.array([s[0] for s in shapes], type=pa.int32()),
        _large_list([m.attn.reshape(-1) for m in lm], pa.float32()),
        pa.array([np.packbits(m.gate.reshape(-1), bitorder="little").tobytes() for m in lm], type=pa.binary()),
        _large_list([m.index for m in lm], pa.int32()),
        _large_list([m.value for m in lm], pa.float32()),
    ]
    return pa.Table.from_arrays(columns, schema=LABEL_BANK_SCHEMA)


def _list_rows(col: pa.ChunkedArray) -> Iterator[np.ndarray]:
    for chunk in col.chunks:
        offsets = chunk.offsets.to_numpy()
        values = chunk.values.to_numpy(zero_copy_only=False)
        for j in range(len(chunk)):
            yield values[offsets[j] : offsets[j + 1]]


def _read_v2(path: Path, table: pa.Table) -> Iterator[tuple[str, LabelMaps]]:
    ids = table["image_id"].to_pylist()
    hs, ws, ks = (table[c].to_numpy() for c in ("h", "w", "K"))
    gates = table["gate"].to_pylist()
    rows = zip(_list_rows(table["attn"]), _list_rows(table["bonus_index"]), _list_rows(table["bonus_value"]))
    for r, (attn, index, value) in enumerate(rows):
        k, h, w = int(ks[r]), int(hs[r]), int(ws[r])
        n = k * h * w
        bits = np.frombuffer(gates[r], dtype=np.uint8)
        if attn.size != h * w or bits.size != (n + 7) // 8 or index.size != value.size:
            raise ValueError(f"{path}: row {ids[r]!r} does not hold a K={k} x {h} x {w} label map")
        if index.size and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"{path}: row {ids[r]!r} has bonus positions outside K*h*w={n}")
        gate = np.unpackbits(bits, count=n, bitorder="little").astype(bool).reshape(k, h, w)
        yield ids[r], LabelMaps(
            attn.astype(np.float32, copy=False).reshape(h, w), gate, index.astype(np.int64), value.astype(np.float32)
        )


def _read_v1(path: Path, table: pa.Table) -> Iterator[tuple[str, np.ndarray]]:
    ids = table["image_id"].to_pylist()
    hs, ws, ks = (table[c].to_numpy() for c in ("h", "w", "K"))
    for r, a in enumerate(_list_rows(table["maps"])):
        k, h, w = int(ks[r]), int(hs[r]), int(ws[r])
        if a.size != k * h * w:
            raise ValueError(f"{path}: row {ids[r]!r} has {a.size} values, expected K*h*w={k * h * w}")
        yield ids[r], a.reshape(k, h, w).astype(np.float32)


def read_label_bank(
    path_or_dir: PathLike, image_ids: Sequence[str] | None = None, dense: bool = True
) -> dict[str, np.ndarray] | dict[str, LabelMaps]:
    """The label bank of a file or directory; KeyError for missing ids. The one reader of the bank.

    Args:
        image_ids: read only these images.
        dense: ``True`` -> ``{image_id: (K, h, w) float32}`` (bit-identical to the maps the stage computed);
            ``False`` -> ``{image_id: LabelMaps}``, the compact form (training keeps this in memory and expands
            one image at a time with :meth:`LabelMaps.dense`). Banks of the old float16 format are returned as
            dense float32 arrays in both cases, with a warning.
    """
    filters = None
    if image_ids is not None:
        filters = pc.is_in(pc.field("image_id"), value_set=pa.array(list(image_ids), type=pa.string()))
    out: dict[str, Any] = {}
    for path in list_parquet_files(path_or_dir):
        table = pq.read_table(path, filters=filters)
        fmt = (table.schema.metadata or {}).get(b"format", b"").decode()
        if fmt == LABEL_BANK_FORMAT_V1 or "maps" in table.column_names:
            _log.warning("%s is a %s label bank (float16 maps, which lose most concept decisions); rerun the "
                         "label_bank stage to get exact maps", path, LABEL_BANK_FORMAT_V1)
            out.update(_read_v1(path, table))
            continue
        for image_id, lm in _read_v2(path, table):
            out[image_id] = lm.dense() if dense else lm
    if image_ids is not None:
        missing = [i for i in image_ids if i not in out]
        if missing:
            raise KeyError(f"{len(missing)} image ids not in the label bank, e.g. {missing[:5]}")
    return out



def label_bank_image_ids(path_or_dir: PathLike) -> set[str]:
    """The image ids a label bank holds, without reading its maps."""
    ids: set[str] = set()
    for p in list_parquet_files(path_or_dir):
        ids.update(pq.read_table(p, columns=["image_id"])["image_id"].to_pylist())
    return ids


def parquet_rows(path_or_dir: PathLike) -> int:
    """Rows of a Parquet file or a directory of shards, from the footers alone."""
    return int(sum(pq.ParquetFile(p).metadata.num_rows for p in list_parquet_files(path_or_dir)))

