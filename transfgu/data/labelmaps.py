"""Ground-truth label maps: raw on-disk label ids -> evaluated class ids, as numpy lookup tables.

Every map sends raw ids to ``0..n_classes-1`` or to the project ignore index :data:`IGNORE_INDEX` (255).
Raw ``255`` and ``-1`` are ignore everywhere (``-1`` is how the reference code writes ignore, and is the
Cityscapes license-plate id). A raw id that is neither in the table nor an ignore value is a data error:
:meth:`LabelMap.apply` raises :class:`LabelMapError` naming the file, or records it as ignore with
``on_unknown="ignore"``.

Mappings follow the authors' label mappings:

- COCO-Stuff stuffthingmaps ids 0..181 -> COCO-171 / COCO-27 / COCO-80 (+ background 0), read from
  the package copy of ``coco_stuff_labels.csv`` (columns ``stuffthingmap_id, name, kind, used, fine171,
  coarse27, coarse27_name, coco80``).
  The 11 thing ids COCO never annotates (``used == 0``) go to ignore for 171 and 80 (they have no class
  there); for 27 they follow the CSV's supercategory column. They never occur in the stuffthingmaps.
- Cityscapes ``gtFine_labelIds`` 7..33 -> 0..26 (the 27 non-void ids, PiCIE protocol); 0..6, -1, 255 ->
  ignore; any other id is an error (it is not a labelIds file).
- LIP raw 0..19 (0 = background) -> LIP-19 (20 classes), LIP-16 (17), LIP-5 (6): supplementary Table 3.
- Pascal VOC 0..20 (21 classes), 255 -> ignore.
- The stand-in sets of ``shared/data``: from their ``classes.txt`` (:func:`label_map_from_classes_file`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache, lru_cache
from importlib import resources
from pathlib import Path

import numpy as np

IGNORE_INDEX = 255
"""The project-wide ignore index of evaluated labels."""

RAW_IGNORE_VALUES: tuple[int, ...] = (-1, 255)
"""Raw label values that mean "unlabelled" in every data set."""

_UNMAPPED = -2  # table entry for a raw id the map does not know


class LabelMapError(ValueError):
    """A label file holds ids the label map does not know."""


@dataclass(frozen=True, eq=False)
class LabelMap:
    """A lookup table ``raw id -> class id`` (or :data:`IGNORE_INDEX`) plus the class names.

    ``table[r]`` is the class id of raw id ``r``, ``IGNORE_INDEX`` for ignored raw ids, or -2 for ids the map
    does not know. Raw ids ``< 0`` other than -1, or ``>= len(table)``, are unknown.
    """

    name: str
    class_names: tuple[str, ...]
    table: np.ndarray = field(repr=False)
    ignore_index: int = IGNORE_INDEX

    def __post_init__(self) -> None:
        table = np.asarray(self.table, dtype=np.int64)
        valid = (
            (table == _UNMAPPED) | (table == self.ignore_index) | ((table >= 0) & (table < self.n_classes))
        )
        if not valid.all():
            raise ValueError(f"label map {self.name}: table entries outside 0..{self.n_classes - 1}")
        table.setflags(write=False)
        object.__setattr__(self, "table", table)

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelMap):
            return NotImplemented
        mine = (self.name, self.class_names, self.ignore_index)
        theirs = (other.name, other.class_names, other.ignore_index)
        return mine == theirs and np.array_equal(self.table, other.table)

    def __hash__(self) -> int:
        return hash((self.name, self.class_names, self.ignore_index, self.table.tobytes()))

    def known_raw_ids(self) -> np.ndarray:
        """Raw ids the table maps (to a class or to ignore), besides -1."""
        return np.flatnonzero(self.table != _UNMAPPED)

    def apply(
        self, raw: np.ndarray, *, source: str | Path | None = None, on_unknown: str = "error"
    ) -> np.ndarray:
        """Map a raw label array to class ids (int64, same shape), ignore -> ``ignore_index``.

        ``on_unknown="error"`` raises :class:`LabelMapError` naming ``source`` and the offending ids;
        ``"ignore"`` sends them to the ignore index.
        """
        if on_unknown not in ("error", "ignore"):
            raise ValueError(f"on_unknown must be 'error' or 'ignore', got {on_unknown!r}")
        raw = np.asarray(raw)
        if raw.dtype.kind not in "iub":
            raise TypeError(f"label array must be integer, got {raw.dtype} ({source or 'array'})")
        if raw.dtype.kind == "b":
            raw = raw.astype(np.uint8)
        table = self.table
        if raw.dtype == np.uint8 and len(table) >= 256:
            out = table[raw]  # fast path: uint8 PNGs index the table directly
        else:
            r = raw.astype(np.int64, copy=False)
            out = np.full(r.shape, _UNMAPPED, dtype=np.int64)
            inside = (r >= 0) & (r < len(table))
            out[inside] = table[r[inside]]
            out[r == -1] = self.ignore_index
        unknown = out == _UNMAPPED
        if unknown.any():
            if on_unknown == "error":
                bad = np.unique(np.asarray(raw)[unknown])
                shown = ", ".join(str(v) for v in bad[:12]) + (" ..." if len(bad) > 12 else "")
                where = f"{source}: " if source is not None else ""
                raise LabelMapError(
                    f"{where}label ids [{shown}] are not in label map '{self.name}' "
                    f"(known raw ids {_ranges(self.known_raw_ids())}, plus -1/255 = ignore); "
                    "pass on_unknown='ignore' to treat them as ignore"
                )
            out[unknown] = self.ignore_index
        return out


def _ranges(ids: Iterable[int]) -> str:
    """Compact '0-6, 7, 9-12' text for a sorted id list."""
    ids = sorted(int(i) for i in ids)
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(parts)


def build_label_map(
    name: str,
    class_names: Sequence[str],
    mapping: Mapping[int, int],
    *,
    ignore_raw: Iterable[int] = (),
    ignore_index: int = IGNORE_INDEX,
) -> LabelMap:
    """A :class:`LabelMap` from ``{raw id: class id}``; ``ignore_raw`` (and always 255) map to ignore."""
    ignore_raw = set(int(v) for v in ignore_raw) | {255}
    ignore_raw.discard(-1)  # -1 is handled by apply(), it cannot index a table
    size = max([256, *(k + 1 for k in mapping), *(k + 1 for k in ignore_raw)])
    table = np.full(size, _UNMAPPED, dtype=np.int64)
    for raw_id in ignore_raw:
        if raw_id < 0:
            raise ValueError(f"label map {name}: negative raw ignore id {raw_id}")
        table[raw_id] = ignore_index
    for raw_id, cls in mapping.items():
        if raw_id < 0:
            raise ValueError(f"label map {name}: negative raw id {raw_id}")
        if raw_id in ignore_raw:
            raise ValueError(f"label map {name}: raw id {raw_id} is both a class and ignore")
        table[raw_id] = cls
    return LabelMap(name=name, class_names=tuple(class_names), table=table, ignore_index=ignore_index)


# --------------------------------------------------------------------------------------------- COCO-Stuff


@dataclass(frozen=True)
class _CocoRow:
    raw: int
    name: str
    kind: str
    used: bool
    fine171: int | None
    coarse27: int | None
    coarse27_name: str
    coco80: int | None


def _opt_int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text else None


@lru_cache(maxsize=1)
def _coco_rows() -> tuple[_CocoRow, ...]:
    text = resources.files("transfgu.data").joinpath("coco_stuff_labels.csv").read_text(encoding="utf-8")
    rows = []
    for rec in csv.DictReader(text.splitlines()):
        if rec["kind"] == "ignore":
            continue
        rows.append(
            _CocoRow(
                raw=int(rec["stuffthingmap_id"]),
                name=rec["name"],
                kind=rec["kind"],
                used=rec["used"].strip() == "1",
                fine171=_opt_int(rec["fine171"]),
                coarse27=_opt_int(rec["coarse27"]),
                coarse27_name=rec["coarse27_name"],
                coco80=_opt_int(rec["coco80"]),
            )
        )
    if [r.raw for r in rows] != list(range(182)):
        raise RuntimeError("coco_stuff_labels.csv must list stuffthingmap ids 0..181 in order")
    return tuple(rows)


def _names_by_index(pairs: Iterable[tuple[int, str]], n: int, what: str) -> tuple[str, ...]:
    names: dict[int, str] = {}
    for idx, name in pairs:
        if names.setdefault(idx, name) != name:
            raise RuntimeError(f"{what}: index {idx} has two names ({names[idx]!r}, {name!r})")
    if sorted(names) != list(range(n)):
        raise RuntimeError(f"{what}: class indices are not 0..{n - 1}")
    return tuple(names[i] for i in range(n))


@cache
def coco_stuff_label_map(granularity: int = 27) -> LabelMap:
    """COCO-Stuff stuffthingmaps (raw 0..181, 255 unlabeled) -> COCO-171, COCO-27 or COCO-80 (81 classes).

    COCO-80: the 80 things -> 1..80 and every stuff id -> 0 "background" (as the authors' code maps them).
    """
    rows = _coco_rows()
    if granularity == 171:
        mapping = {r.raw: r.fine171 for r in rows if r.fine171 is not None}
        names = _names_by_index(((r.fine171, r.name) for r in rows if r.fine171 is not None), 171, "COCO-171")
    elif granularity == 27:
        mapping = {r.raw: r.coarse27 for r in rows if r.coarse27 is not None}
        names = _names_by_index(
            ((r.coarse27, r.coarse27_name) for r in rows if r.coarse27 is not None), 27, "COCO-27"
        )
    elif granularity in (80, 81):
        mapping = {r.raw: r.coco80 for r in rows if r.coco80 is not None}
        pairs = [(0, "background")] + [(r.coco80, r.name) for r in rows if r.coco80]
        names = _names_by_index(pairs, 81, "COCO-80")
    else:
        raise ValueError(f"COCO-Stuff granularity must be 27, 171 or 80, got {granularity}")
    unused = [r.raw for r in rows if r.raw not in mapping]
    return build_label_map(f"coco_stuff_{granularity}", names, mapping, ignore_raw=unused)


# --------------------------------------------------------------------------------------------- Cityscapes

CITYSCAPES_27_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "parking", "rail track", "building", "wall", "fence", "guard rail", "bridge",
    "tunnel", "pole", "polegroup", "traffic light", "traffic sign", "vegetation", "terrain", "sky",
    "person", "rider", "car", "truck", "bus", "caravan", "trailer", "train", "motorcycle", "bicycle",
)  # fmt: skip
"""Names of Cityscapes labelIds 7..33 (cityscapesScripts ``labels.py``)."""


@cache
def cityscapes_label_map() -> LabelMap:
    """Cityscapes ``gtFine_labelIds`` 7..33 -> 0..26; void ids 0..6, -1 (license plate), 255 -> ignore."""
    return build_label_map(
        "cityscapes_27", CITYSCAPES_27_NAMES, {i: i - 7 for i in range(7, 34)}, ignore_raw=range(0, 7)
    )


# --------------------------------------------------------------------------------------------- LIP

LIP_19_NAMES: tuple[str, ...] = (
    "background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
    "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
    "right-shoe",
)  # fmt: skip
LIP_16_NAMES: tuple[str, ...] = (*LIP_19_NAMES[:14], "arm", "leg", "shoe")
LIP_5_NAMES: tuple[str, ...] = ("background", "head", "upper-body", "arms", "legs", "feet")

# Supplementary Table 3: raw LIP id (index) -> LIP-16 / LIP-5 id.
_LIP_TO_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 14, 15, 15, 16, 16)
_LIP_TO_5 = (0, 1, 1, 3, 1, 2, 2, 2, 5, 4, 2, 2, 2, 1, 3, 3, 4, 4, 5, 5)


@cache
def lip_label_map(granularity: int = 19) -> LabelMap:
    """LIP raw ids 0..19 (0 = background) -> LIP-19 (20 classes), LIP-16 (17) or LIP-5 (6)."""
    if granularity == 19:
        return build_label_map("lip_19", LIP_19_NAMES, {i: i for i in range(20)})
    if granularity == 16:
        return build_label_map("lip_16", LIP_16_NAMES, dict(enumerate(_LIP_TO_16)))
    if granularity == 5:
        return build_label_map("lip_5", LIP_5_NAMES, dict(enumerate(_LIP_TO_5)))
    raise ValueError(f"LIP granularity must be 19, 16 or 5, got {granularity}")


# --------------------------------------------------------------------------------------------- Pascal VOC

VOC_NAMES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


@cache
def voc_label_map() -> LabelMap:
    """Pascal VOC 2012 SegmentationClass: 0 background, 1..20 objects, 255 (object borders) -> ignore."""
    return build_label_map("pascal_voc", VOC_NAMES, {i: i for i in range(21)})


# --------------------------------------------------------------------------------------------- classes.txt

_IGNORE_COMMENT = re.compile(r"(\d+)\s*=\s*[\w ]*\(?\s*ignore", re.IGNORECASE)
_IGNORE_NAME = re.compile(r"\bignore\b|^void\b|\(void\b|^unlabell?ed\b", re.IGNORECASE)


def parse_classes_file(path: str | Path) -> tuple[dict[int, str], int]:
    """Read a ``classes.txt`` of ``"index name"`` lines; return ``({index: name}, raw ignore id)``.

    ``#`` starts a comment. The raw ignore id is the entry whose name says void/ignore/unlabelled
    (camvid: ``11 Unlabelled (void; ignore in eval)``), else an ``N = ... (ignore)`` statement in a comment
    (msrc_v2), else 255. A name of the form ``"group : members"`` keeps the group (ccp coarse).
    """
    path = Path(path)
    entries: dict[int, str] = {}
    ignore_from_comment: int | None = None
    ignore_from_name: int | None = None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        body, _, comment = line.partition("#")
        if comment and ignore_from_comment is None and (m := _IGNORE_COMMENT.search(comment)):
            ignore_from_comment = int(m.group(1))
        body = body.strip()
        if not body:
            continue
        idx_text, _, name = body.partition(" ")
        if not idx_text.lstrip("-").isdigit() or not name.strip():
            raise ValueError(f"{path}:{lineno}: expected 'index name', got {line!r}")
        idx = int(idx_text)
        if idx in entries:
            raise ValueError(f"{path}:{lineno}: index {idx} listed twice")
        name = name.split(" : ")[0].strip()
        if _IGNORE_NAME.search(name) and ignore_from_name is None:
            ignore_from_name = idx
        entries[idx] = name
    ignore = (
        ignore_from_name if ignore_from_name is not None
        else ignore_from_comment if ignore_from_comment is not None
        else IGNORE_INDEX
    )  # fmt: skip
    return entries, ignore


def label_map_from_classes_file(path: str | Path, name: str | None = None) -> LabelMap:
    """Identity map over the classes of a ``classes.txt``; raw ignore id (and 255) -> :data:`IGNORE_INDEX`.

    The non-ignore indices must be exactly ``0..n-1``.
    """
    path = Path(path)
    entries, raw_ignore = parse_classes_file(path)
    classes = {i: n for i, n in entries.items() if i != raw_ignore}
    if sorted(classes) != list(range(len(classes))):
        raise ValueError(f"{path}: class indices must be 0..{len(classes) - 1} (besides ignore {raw_ignore})")
    return build_label_map(
        name or path.parent.name,
        [classes[i] for i in range(len(classes))],
        {i: i for i in classes},
        ignore_raw=[raw_ignore],
    )
