"""Data set readers: where images and ground truth live on disk, per data set, chosen by name.

``list_records(name, root, split, **opts)`` lists :class:`ImageRecord` s (sorted by image id) and
``dataset_info(name, root=None, **opts)`` gives ``(class_names, ignore_index, label_map)``.

Layouts (``root`` is the data set's top folder):

=====================  ===============================================================================
``coco_stuff``         ``images/<split>2017/*.jpg``; ``annotations/<split>2017/<id>.png`` or
                       ``stuffthingmaps_trainval2017/<split>2017/<id>.png`` (stuffthingmaps, raw 0..181).
                       Options ``granularity`` 27 (default) / 171 / 80, ``curated_list`` (file of image ids
                       or file names, one per line, e.g. the IIC/PiCIE curated lists: filters the split listed),
                       ``curated_list_train`` / ``curated_list_val`` (the list of the train / val split only;
                       the pipeline applies them to training and evaluation, never to the crop, concept and
                       label-bank stages, which use the full train split as the reference does), and
                       ``with_instances`` (keep only images with >= 1 object in
                       ``annotations/instances_<split>2017.json``: the reference's image lists, 117,266 / 4,952).
``pascal_voc``         ``VOC2012`` (or its parent ``VOCdevkit``): ``ImageSets/Segmentation/<split>.txt``,
                       ``JPEGImages/<id>.jpg``, ``SegmentationClass/<id>.png`` (palette, 255 = border).
``cityscapes``         ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png``,
                       ``gtFine/<split>/<city>/<id>_gtFine_labelIds.png``.
``lip``                ``TrainVal_images/<split>_images/*.jpg``,
                       ``TrainVal_parsing_annotations/<split>_segmentations/*.png``; option ``granularity``
                       19 (default) / 16 / 5.
stand-ins              ``images/<split>/<id>.jpg``, ``labels/<split>/<id>.png``, ``classes.txt``:
                       ``camvid``, ``msrc_v2``, ``ccp`` (option ``coarse=True``: ``labels_coarse/`` and
                       ``classes_coarse.txt``), ``weizmann_horse``, ``coco_stuff_samples`` (no classes.txt:
                       stuffthingmaps ids through the COCO maps, option ``granularity``; splits
                       ``train2017``/``val2017``, ``train``/``val`` accepted).
``folder``             any folder of images, searched recursively (jpg/jpeg/png/bmp/webp), no labels.
=====================  ===============================================================================

Rules common to all readers:

- Image ids are unique within a split. Labelled data sets raise :class:`DatasetError` on a duplicate
  (e.g. ``a.jpg`` and ``a.png`` in one split, or an id listed twice in a split file). ``folder`` ids are the
  relative path without extension; when two files collide that way (``x/a.jpg``, ``x/a.png``), both get
  their extension kept (``x/a.jpg``, ``x/a.png``), which is deterministic.
- Entries from user-provided lists (the curated list, VOC split files) must be plain relative names: absolute
  paths and ``..`` are rejected so a list cannot point outside the data root.
- A missing label file raises :class:`DatasetError` naming it; with ``on_missing_label="skip"`` the image is
  left out, logged, and recorded in the returned list's ``skipped`` attribute; with ``"keep"`` the record is kept
  with the label path it should have, so the consumer (e.g. the evaluation, which records and skips bad samples)
  decides, and :func:`load_sample` raises :class:`DatasetError` naming the missing file. Training never reads
  labels, so ``keep`` also lets a split train on images whose labels are incomplete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from transfgu.data.io import load_label, load_rgb
from transfgu.data.labelmaps import (
    IGNORE_INDEX,
    LabelMap,
    cityscapes_label_map,
    coco_stuff_label_map,
    label_map_from_classes_file,
    lip_label_map,
    voc_label_map,
)

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetSpec",
    "ImageRecord",
    "RecordList",
    "dataset_info",
    "dataset_spec",
    "list_records",
    "load_sample",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
STAND_INS: tuple[str, ...] = ("camvid", "msrc_v2", "ccp", "weizmann_horse")
DATASETS: tuple[str, ...] = (
    "coco_stuff",
    "pascal_voc",
    "cityscapes",
    "lip",
    *STAND_INS,
    "coco_stuff_samples",
    "folder",
)


class DatasetError(ValueError):
    """A data set folder does not have the expected layout or content."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: a unique ``image_id``, its file, and its ground-truth file (or ``None``)."""

    image_id: str
    image_path: Path
    label_path: Path | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What a data set evaluates: class names, ignore index, raw-id -> class-id map (``None``: no labels)."""

    name: str
    class_names: tuple[str, ...]
    ignore_index: int
    label_map: LabelMap | None

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


class RecordList(list):
    """A ``list[ImageRecord]`` that also carries ``skipped``: ``[(image_id, reason), ...]``."""

    def __init__(self, records: Iterable[ImageRecord] = (), skipped: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(records)
        self.skipped: list[tuple[str, str]] = list(skipped)


# --------------------------------------------------------------------------------------------- helpers


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} not found: {path}")
    return path


def _require_root(root: str | Path | None, name: str) -> Path:
    if root is None:
        raise DatasetError(f"data set '{name}' needs a root folder")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data root for '{name}' not found or not a folder: {root}")
    return root


def _check_relative(entry: str, source: Path) -> str:
    """Reject list entries that are absolute or climb out of the data root (``..``)."""
    for flavour in (PurePosixPath, PureWindowsPath):
        p = flavour(entry)
        if p.is_absolute() or p.anchor or ".." in p.parts:
            raise DatasetError(f"{source}: entry {entry!r} must be a relative name inside the data root")
    return entry


def _read_list(path: str | Path) -> list[str]:
    """Non-empty, non-comment lines of a user list file, validated as relative names."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"list file not found: {path}")
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            entries.append(_check_relative(line, path))
    return entries


def _images_in(folder: Path, *, recursive: bool = False) -> list[Path]:
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _check_unique(records: list[ImageRecord], where: str) -> None:
    seen: dict[str, Path] = {}
    for r in records:
        if r.image_id in seen:
            raise DatasetError(
                f"{where}: duplicate image id {r.image_id!r} ({seen[r.image_id]} and {r.image_path}); "
                "image ids must be unique within a split"
            )
        seen[r.image_id] = r.image_path


def _pair_labels(
    images: list[tuple[str, Path]],
    label_of: Callable[[str, Path], Path],
    *,
    where: str,
    on_missing_label: str,
) -> RecordList:
    """Attach label files; a missing one raises, is dropped and recorded (``skip``) or kept as it is (``keep``)."""
    if on_missing_label not in ("error", "skip", "keep"):
        raise ValueError(f"on_missing_label must be 'error', 'skip' or 'keep', got {on_missing_label!r}")
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    missing: list[Path] = []
    for image_id, image_path in images:
        label_path = label_of(image_id, image_path)
        if label_path.is_file() or on_missing_label == "keep":
            records.append(ImageRecord(image_id, image_path, label_path))
        elif on_missing_label == "skip":
            skipped.append((image_id, f"missing label file {label_path}"))
        else:
            missing.append(label_path)
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:10]) + ("\n  ..." if len(missing) > 10 else "")
        raise DatasetError(
            f"{where}: {len(missing)} label file(s) missing (set data.options.on_missing_label=skip to leave "
            f"those images out, or =keep to record and skip them where labels are read):\n  {shown}"
        )
    if skipped:
        log.warning(
            "%s: skipped %d image(s) without a label file, e.g. %s", where, len(skipped), skipped[0][1]
        )
    _check_unique(records, where)
    if not records:
        raise DatasetError(f"{where}: no labelled images found")
    return RecordList(sorted(records, key=lambda r: r.image_id), skipped)


def _stems(paths: list[Path]) -> list[tuple[str, Path]]:
    return [(p.stem, p) for p in paths]


# --------------------------------------------------------------------------------------------- readers


def _coco_split_dir(split: str) -> str:
    return split if split.endswith("2017") else f"{split}2017"


def _curated_filter(
    images: list[tuple[str, Path]], curated_list: str | Path, where: str
) -> list[tuple[str, Path]]:
    wanted: list[str] = []
    for entry in _read_list(curated_list):
        stem = PurePosixPath(entry.replace("\\", "/")).name
        stem = stem.rsplit(".", 1)[0] if Path(stem).suffix.lower() in IMAGE_EXTENSIONS else stem
        wanted.append(stem)
    by_id = dict(images)
    missing = [w for w in wanted if w not in by_id]
    if missing:
        raise DatasetError(
            f"{where}: {len(missing)} id(s) of curated list {curated_list} have no image, e.g. {missing[:5]}"
        )
    keep = set(wanted)
    return [(i, p) for i, p in images if i in keep]


#: Reader options that choose a subset of a split for training/evaluation only (see ``stages.split_records``).
SUBSET_OPTIONS = ("curated_list_train", "curated_list_val")


def coco_instance_image_ids(root: str | Path, split: str) -> set[str]:
    """Ids (file stems, ``%012d``) of the images with at least one object in ``annotations/instances_<split>.json``,
    i.e. the keys of pycocotools' ``imgToAnns``, the reference's COCO image list (docs/fidelity.md row 19)."""
    import json

    sd = _coco_split_dir(split)
    path = Path(root) / "annotations" / f"instances_{sd}.json"
    if not path.is_file():
        raise DatasetError(
            f"with_instances: {path} not found (COCO's instances_{sd}.json from annotations_trainval2017)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ids = {int(a["image_id"]) for a in data.get("annotations", [])}
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"with_instances: {path} is not a COCO instances file ({exc})") from exc
    return {f"{i:012d}" for i in ids}


def _list_coco_stuff(root, split, *, curated_list=None, curated_list_train=None, curated_list_val=None,
                     with_instances=False, on_missing_label="error"):
    root = _require_root(root, "coco_stuff")
    sd = _coco_split_dir(split)
    if curated_list is None:
        curated_list = {"train2017": curated_list_train, "val2017": curated_list_val}.get(sd)
    img_dir = _require_dir(root / "images" / sd, "COCO-Stuff image folder")
    label_dir = None
    for cand in (root / "annotations" / sd, root / "stuffthingmaps_trainval2017" / sd):
        if cand.is_dir():
            label_dir = cand
            break
    if label_dir is None:
        raise DatasetError(
            f"COCO-Stuff stuffthingmaps not found for split {sd}: looked for {root / 'annotations' / sd} "
            f"and {root / 'stuffthingmaps_trainval2017' / sd}"
        )
    images = _stems([p for p in _images_in(img_dir) if p.suffix.lower() in (".jpg", ".jpeg", ".png")])
    where = f"coco_stuff {sd} ({root})"
    if with_instances:
        have = coco_instance_image_ids(root, sd)
        images = [(i, p) for i, p in images if i in have]
    if curated_list is not None:
        images = _curated_filter(images, curated_list, where)
    return _pair_labels(
        images, lambda i, _p: label_dir / f"{i}.png", where=where, on_missing_label=on_missing_label
    )


def _voc_root(root: Path) -> Path:
    if (root / "VOC2012").is_dir() and not (root / "JPEGImages").is_dir():
        return root / "VOC2012"
    return root


def _list_pascal_voc(root, split, *, on_missing_label="error", label_dir="SegmentationClass"):
    root = _voc_root(_require_root(root, "pascal_voc"))
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not split_file.is_file():
        raise DatasetError(f"Pascal VOC split file not found: {split_file}")
    _check_relative(label_dir, split_file)
    ids = _read_list(split_file)
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise DatasetError(f"{split_file}: image ids listed more than once: {dup[:5]}")
    images = []
    missing = []
    for image_id in ids:
        path = root / "JPEGImages" / f"{image_id}.jpg"
        (images.append((image_id, path)) if path.is_file() else missing.append(path))
    if missing:
        raise DatasetError(f"{split_file}: {len(missing)} listed image(s) not found, e.g. {missing[:3]}")
    return _pair_labels(
        images,
        lambda i, _p: root / label_dir / f"{i}.png",
        where=f"pascal_voc {split} ({root})",
        on_missing_label=on_missing_label,
    )


def _list_cityscapes(root, split, *, on_missing_label="error"):
    root = _require_root(root, "cityscapes")
    img_dir = _require_dir(root / "leftImg8bit" / split, "Cityscapes leftImg8bit split folder")
    images = []
    for p in sorted(img_dir.glob("*/*_leftImg8bit.png")):
        images.append((p.name[: -len("_leftImg8bit.png")], p))

    def label_of(image_id: str, image_path: Path) -> Path:
        return root / "gtFine" / split / image_path.parent.name / f"{image_id}_gtFine_labelIds.png"

    return _pair_labels(
        images, label_of, where=f"cityscapes {split} ({root})", on_missing_label=on_missing_label
    )


def _lip_dir(root: Path, top: str, sub: str) -> Path:
    # the official zips unpack either flat or with the top folder repeated
    for cand in (root / top / sub, root / top / top / sub, root / sub):
        if cand.is_dir():
            return cand
    raise DatasetError(f"LIP folder not found: {root / top / sub}")


def _list_lip(root, split, *, on_missing_label="error"):
    root = _require_root(root, "lip")
    img_dir = _lip_dir(root, "TrainVal_images", f"{split}_images")
    label_dir = _lip_dir(root, "TrainVal_parsing_annotations", f"{split}_segmentations")
    images = _stems(_images_in(img_dir))
    return _pair_labels(
        images,
        lambda i, _p: label_dir / f"{i}.png",
        where=f"lip {split} ({root})",
        on_missing_label=on_missing_label,
    )


def _simple_split_dir(root: Path, kind: str, split: str) -> Path:
    path = root / kind / split
    if not path.is_dir() and re.fullmatch(r"(train|val)", split) and (root / kind / f"{split}2017").is_dir():
        path = root / kind / f"{split}2017"
    if not path.is_dir():
        avail = sorted(p.name for p in (root / kind).iterdir()) if (root / kind).is_dir() else []
        raise DatasetError(f"split folder not found: {path} (available splits: {avail or 'none'})")
    return path


def _list_simple(name: str, root, split, *, on_missing_label="error", coarse=False):
    root = _require_root(root, name)
    img_dir = _simple_split_dir(root, "images", split)
    label_kind = "labels_coarse" if coarse else "labels"
    label_dir = _simple_split_dir(root, label_kind, img_dir.name)
    images = _stems(_images_in(img_dir))
    return _pair_labels(
        images,
        lambda i, _p: label_dir / f"{i}.png",
        where=f"{name} {img_dir.name} ({root})",
        on_missing_label=on_missing_label,
    )


def _list_folder(root, split=None, **_unused) -> RecordList:
    root = _require_root(root, "folder")
    paths = _images_in(root, recursive=True)
    if not paths:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
    rel = [p.relative_to(root).as_posix() for p in paths]
    base = [r.rsplit(".", 1)[0] for r in rel]
    counts: dict[str, int] = {}
    for b in base:
        counts[b] = counts.get(b, 0) + 1
    ids = [r if counts[b] > 1 else b for r, b in zip(rel, base)]
    records = [ImageRecord(i, p, None) for i, p in zip(ids, paths)]
    _check_unique(records, f"folder {root}")
    return RecordList(sorted(records, key=lambda r: r.image_id))


# --------------------------------------------------------------------------------------------- public API


def list_records(name: str, root: str | Path | None, split: str | None = None, **opts) -> RecordList:
    """List the images (and ground-truth files) of one split of data set ``name``, sorted by image id.

    ``opts``: ``on_missing_label`` ("error" | "skip" | "keep") for labelled sets, plus the per-set options of the
    module docstring (``granularity``, ``curated_list``, ``coarse``, ``label_dir``). Options that only
    affect the label map (``granularity``) are accepted and ignored here.
    """
    opts = {k: v for k, v in opts.items() if k != "granularity"}
    if name == "folder":
        return _list_folder(root, split)
    if split is None:
        raise DatasetError(f"data set '{name}' needs a split")
    if name == "coco_stuff":
        return _list_coco_stuff(root, split, **opts)
    if name == "pascal_voc":
        return _list_pascal_voc(root, split, **opts)
    if name == "cityscapes":
        return _list_cityscapes(root, split, **opts)
    if name == "lip":
        return _list_lip(root, split, **opts)
    if name in (*STAND_INS, "coco_stuff_samples"):
        if opts.get("coarse") and name != "ccp":
            raise DatasetError(f"option coarse=True only exists for 'ccp', not '{name}'")
        return _list_simple(name, root, split, **opts)
    raise DatasetError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")


def dataset_spec(name: str, root: str | Path | None = None, **opts) -> DatasetSpec:
    """Class names, ignore index and label map of data set ``name`` (``root`` needed for the stand-ins)."""
    if name in ("coco_stuff", "coco_stuff_samples"):
        lm = coco_stuff_label_map(int(opts.get("granularity", 27)))
    elif name == "pascal_voc":
        lm = voc_label_map()
    elif name == "cityscapes":
        lm = cityscapes_label_map()
    elif name == "lip":
        lm = lip_label_map(int(opts.get("granularity", 19)))
    elif name in STAND_INS:
        root = _require_root(root, name)
        coarse = bool(opts.get("coarse", False))
        if coarse and name != "ccp":
            raise DatasetError(f"option coarse=True only exists for 'ccp', not '{name}'")
        classes = root / ("classes_coarse.txt" if coarse else "classes.txt")
        if not classes.is_file():
            raise DatasetError(f"class list not found: {classes}")
        lm = label_map_from_classes_file(classes, name=f"{name}_coarse" if coarse else name)
    elif name == "folder":
        return DatasetSpec(name, (), IGNORE_INDEX, None)
    else:
        raise DatasetError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return DatasetSpec(name, lm.class_names, lm.ignore_index, lm)


def dataset_info(
    name: str, root: str | Path | None = None, **opts
) -> tuple[tuple[str, ...], int, LabelMap | None]:
    """``(class_names, ignore_index, label_map)`` of data set ``name``; see :func:`dataset_spec`."""
    spec = dataset_spec(name, root, **opts)
    return spec.class_names, spec.ignore_index, spec.label_map


def load_sample(
    record: ImageRecord,
    label_map: LabelMap | None,
    *,
    on_unknown: str = "error",
    exif: str = "auto",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one record: ``(uint8 (H, W, 3) image, int64 (H, W) class ids or None)``.

    Labels go through ``label_map`` (raw ids are returned as they are when it is ``None``). ``exif``:
    ``"auto"`` applies the image's EXIF orientation, except when that makes the image disagree in size with
    its label while the stored orientation agrees (label files are drawn on the stored pixel grid, e.g.
    COCO); ``"apply"`` / ``"ignore"`` force one behaviour. Image and label sizes must match.
    """
    if exif not in ("auto", "apply", "ignore"):
        raise ValueError(f"exif must be 'auto', 'apply' or 'ignore', got {exif!r}")
    image = load_rgb(record.image_path, exif_transpose=exif != "ignore")
    if record.label_path is None:
        return image, None
    if not Path(record.label_path).is_file():  # kept by on_missing_label="keep"
        raise DatasetError(f"label file missing: {record.label_path} (for image {record.image_path})")
    raw = load_label(record.label_path)
    if image.shape[:2] != raw.shape and exif == "auto":
        stored = load_rgb(record.image_path, exif_transpose=False)
        if stored.shape[:2] == raw.shape:
            image = stored
    if image.shape[:2] != raw.shape:
        raise DatasetError(
            f"image {record.image_path} is {image.shape[1]}x{image.shape[0]} but its label "
            f"{record.label_path} is {raw.shape[1]}x{raw.shape[0]} (W x H)"
        )
    label = (
        raw if label_map is None else label_map.apply(raw, source=record.label_path, on_unknown=on_unknown)
    )
    return image, label
