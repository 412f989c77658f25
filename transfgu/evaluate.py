"""Score a folder of predicted cluster-id PNGs against ground truth (``transfgu evaluate``).

Protocol (the authors' evaluation; docs/fidelity.md): ONE ``(classes x clusters)`` confusion matrix is accumulated over
every image of the split, then clusters are matched to classes once (Hungarian by default, see
:func:`transfgu.metrics.segmentation_scores`), giving mIoU, pixel accuracy and per-class IoU. Ground-truth
pixels equal to the ignore index are not counted.

Pairing: predictions are matched to ground truth by file stem (the path relative to the folder without its
extension, or the bare file name when that is unique), or, with ``dataset``/``split``/``root``, by the image
ids of :func:`transfgu.data.list_records`, whose label map turns raw label files into class ids.
Predictions must be single-channel PNGs (palette or grey, 8 or 16 bit) holding cluster ids ``0..K-1``.

Resizing policy (``resize="nearest-pred-to-gt"``): a prediction whose size differs from its ground truth is
resized to the ground-truth size with nearest-neighbour sampling (pixel centres), so scores are always
measured at full ground-truth resolution; the number of resized predictions is reported. ``resize="error"``
refuses size mismatches instead. (The reference scores at a fixed 320-based resize; this tool does not.)
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfgu.cli_args import RESIZE_POLICIES
from transfgu.cli_args import evaluate_parser as build_parser
from transfgu.data.datasets import DatasetError, dataset_info, list_records
from transfgu.data.io import DecodeError, load_label, resize_label
from transfgu.data.labelmaps import IGNORE_INDEX, LabelMap, LabelMapError, parse_classes_file
from transfgu.metrics import confusion_matrix, segmentation_scores

__all__ = ["MissingPredictionsError", "evaluate_folders", "format_table", "main"]

log = logging.getLogger(__name__)

_RESIZE_TEXT = {
    "nearest-pred-to-gt": "predictions whose size differs from the ground truth are resized to the "
    "ground-truth size with nearest-neighbour sampling; metrics are at ground-truth resolution",
    "error": "prediction and ground-truth sizes must match (no resizing)",
}


class MissingPredictionsError(FileNotFoundError):
    """Ground-truth images without a prediction file."""


def _index_folder(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """``{relative path without extension: file}`` for files under ``folder`` (recursive)."""
    out: dict[str, Path] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in suffixes:
            key = p.relative_to(folder).with_suffix("").as_posix()
            if key in out:
                raise DatasetError(f"two files for the same stem {key!r}: {out[key]} and {p}")
            out[key] = p
    return out


def _find_prediction(key: str, preds: dict[str, Path], by_name: dict[str, list[Path]]) -> Path | None:
    if key in preds:
        return preds[key]
    same_name = by_name.get(key.rsplit("/", 1)[-1], [])
    return same_name[0] if len(same_name) == 1 else None


def _accumulate(total: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """``total + conf`` with both zero-padded to their common shape (the shape grows as ids are seen)."""
    rows, cols = max(total.shape[0], conf.shape[0]), max(total.shape[1], conf.shape[1])
    if total.shape != (rows, cols):
        total = np.pad(total, ((0, rows - total.shape[0]), (0, cols - total.shape[1])))
    total[: conf.shape[0], : conf.shape[1]] += conf
    return total


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path | None = None,
    dataset: str | None = None,
    split: str | None = None,
    root: str | Path | None = None,
    n_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    ignore_index: int = IGNORE_INDEX,
    overcluster: str = "hungarian",
    resize: str = "nearest-pred-to-gt",
    *,
    n_clusters: int | None = None,
    allow_missing: bool = False,
    dataset_opts: dict[str, Any] | None = None,
    on_unknown_label: str = "error",
) -> dict[str, Any]:
    """Score predicted cluster-id PNGs in ``pred_dir`` against ground truth; returns the metrics dict.

    Ground truth is either ``gt_dir`` (label PNGs whose values are class ids ``0..n_classes-1`` or
    ``ignore_index``; a ``dataset`` given too supplies its label map and class names) or the labelled split
    ``dataset``/``split``/``root`` (``dataset_opts`` e.g. ``{"granularity": 171}``). ``n_classes`` defaults
    to ``len(class_names)``, the data set's class count, or ``max GT id + 1``; ``n_clusters`` to
    ``max predicted id + 1``. ``K > n_classes`` is over-clustering (``overcluster`` picks the matching).

    Missing predictions raise :class:`MissingPredictionsError` listing them; with ``allow_missing`` those
    images are left out and listed under ``missing_predictions``.
    """
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise FileNotFoundError(f"prediction folder not found: {pred_dir}")
    dataset_opts = dict(dataset_opts or {})

    label_map: LabelMap | None = None
    if dataset is not None:
        names, ignore_index, label_map = dataset_info(dataset, root, **dataset_opts)
        if label_map is None:
            raise DatasetError(f"data set '{dataset}' has no labels to evaluate against")
        class_names = list(class_names) if class_names is not None else list(names)
    if class_names is not None:
        if n_classes is not None and n_classes != len(class_names):
            raise ValueError(f"n_classes={n_classes} but {len(class_names)} class names")
        n_classes = len(class_names)

    # (key, gt file) pairs
    if gt_dir is not None:
        gt_dir = Path(gt_dir)
        if not gt_dir.is_dir():
            raise FileNotFoundError(f"ground-truth folder not found: {gt_dir}")
        gt_items = sorted(_index_folder(gt_dir, (".png",)).items())
        gt_source = str(gt_dir)
    elif dataset is not None:
        records = list_records(dataset, root, split, **dataset_opts)
        gt_items = [(r.image_id, r.label_path) for r in records if r.label_path is not None]
        gt_source = f"{dataset}:{split} ({root})"
    else:
        raise ValueError("give gt_dir, or dataset + split + root")
    if not gt_items:
        raise DatasetError(f"no ground-truth label files found in {gt_source}")

    preds = _index_folder(pred_dir, (".png",))
    by_name: dict[str, list[Path]] = {}
    for key, path in preds.items():
        by_name.setdefault(key.rsplit("/", 1)[-1], []).append(path)

    pairs: list[tuple[str, Path, Path]] = []
    missing: list[str] = []
    for key, gt_path in gt_items:
        pred_path = _find_prediction(key, preds, by_name)
        if pred_path is None:
            missing.append(key)
        else:
            pairs.append((key, gt_path, pred_path))
    if missing and not allow_missing:
        shown = "\n  ".join(missing[:20]) + (
            f"\n  ... ({len(missing) - 20} more)" if len(missing) > 20 else ""
        )
        raise MissingPredictionsError(
            f"{len(missing)} of {len(gt_items)} ground-truth images have no prediction PNG in {pred_dir} "
            f"(pass allow_missing / --allow-missing to skip them):\n  {shown}"
        )
    if not pairs:
        raise MissingPredictionsError(
            f"no prediction in {pred_dir} matches any ground-truth image of {gt_source}"
        )
    if missing:
        log.warning("%d ground-truth images have no prediction; they are left out", len(missing))

    total = np.zeros((n_classes or 0, n_clusters or 0), dtype=np.int64)
    n_resized = 0
    for _key, gt_path, pred_path in pairs:
        raw = load_label(gt_path)
        gt = label_map.apply(raw, source=gt_path, on_unknown=on_unknown_label) if label_map is not None else raw
        valid = gt != ignore_index
        gt_ids = gt[valid]
        if gt_ids.size and (gt_ids.min() < 0 or (n_classes is not None and gt_ids.max() >= n_classes)):
            bad = np.unique(gt_ids[(gt_ids < 0) | (gt_ids >= (n_classes or np.iinfo(np.int64).max))])
            raise LabelMapError(
                f"{gt_path}: ground-truth ids {bad[:10].tolist()} are outside 0..{(n_classes or 0) - 1} "
                f"and not the ignore index {ignore_index}"
            )
        pred = load_label(pred_path)
        if pred.shape != gt.shape:
            if resize == "error":
                raise ValueError(
                    f"prediction {pred_path} is {pred.shape}, ground truth {gt_path} is {gt.shape}"
                )
            pred = resize_label(pred, gt.shape)
            n_resized += 1
        if pred.size and pred.min() < 0:
            raise ValueError(f"{pred_path}: negative cluster ids")
        if n_clusters is not None and pred.size and pred.max() >= n_clusters:
            raise ValueError(f"{pred_path}: cluster id {int(pred.max())} >= n_clusters={n_clusters}")
        rows = n_classes if n_classes is not None else int(gt_ids.max(initial=-1)) + 1
        cols = n_clusters if n_clusters is not None else int(pred.max(initial=-1)) + 1
        conf = confusion_matrix(gt, pred, max(rows, 1), max(cols, 1), ignore_index)
        total = _accumulate(total, conf)

    inferred_classes = n_classes is None
    if inferred_classes:
        n_classes = total.shape[0]
        log.warning("n_classes not given: inferred %d from the largest ground-truth id", n_classes)
    if class_names is None:
        class_names = [str(c) for c in range(n_classes)]
    total = total[:n_classes]
    scores = segmentation_scores(total, class_names=list(class_names), overcluster=overcluster)
    result: dict[str, Any] = {
        **scores,
        "n_images": len(pairs),
        "missing_predictions": missing,
        "n_resized_predictions": n_resized,
        "resize_policy": _RESIZE_TEXT[resize],
        "overcluster": overcluster,
        "ignore_index": ignore_index,
        "n_classes_inferred": inferred_classes,
        "class_names": list(class_names),
        "gt_source": gt_source,
        "pred_dir": str(pred_dir),
        "confusion_matrix": total.tolist(),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: per-class IoU, then mIoU and pixel accuracy (percent)."""
    names = list(result["per_class_iou"])
    width = max([len("pixel accuracy"), *(len(n) for n in names)])
    lines = [f"{'class':<{width}}  IoU (%)", "-" * (width + 9)]
    for name, iou in result["per_class_iou"].items():
        absent = iou is None or (isinstance(iou, float) and math.isnan(iou))
        text = "   n/a" if absent else f"{100 * iou:6.2f}"
        lines.append(f"{name:<{width}}  {text}")
    lines.append("-" * (width + 9))
    lines.append(f"{'mIoU':<{width}}  {100 * result['mIoU']:6.2f}")
    lines.append(f"{'pixel accuracy':<{width}}  {100 * result['pixel_accuracy']:6.2f}")
    lines.append(
        f"{result['n_images']} images, {result['n_clusters']} clusters -> {result['n_classes']} classes "
        f"({result['overcluster']} matching over the whole split)"
    )
    if result["n_resized_predictions"]:
        lines.append(f"{result['n_resized_predictions']} predictions resized: {result['resize_policy']}")
    if result["missing_predictions"]:
        lines.append(f"{len(result['missing_predictions'])} images without prediction left out")
    return "\n".join(lines)


def _parse_class_names(text: str) -> list[str]:
    """``--class-names``: a classes.txt file ("index name" lines) or a comma-separated list."""
    path = Path(text)
    if path.is_file():
        entries, ignore = parse_classes_file(path)
        classes = {i: n for i, n in entries.items() if i != ignore}
        if sorted(classes) != list(range(len(classes))):
            raise ValueError(f"{path}: class indices must be 0..{len(classes) - 1}")
        return [classes[i] for i in range(len(classes))]
    return [n.strip() for n in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts: dict[str, Any] = {}
    if args.granularity is not None:
        opts["granularity"] = args.granularity
    if args.coarse:
        opts["coarse"] = True
    if args.curated_list is not None:
        opts["curated_list"] = args.curated_list
    try:
        class_names = _parse_class_names(args.class_names) if args.class_names else None
        result = evaluate_folders(
            args.pred_dir,
            args.gt_dir,
            dataset=args.dataset,
            split=args.split,
            root=args.root,
            n_classes=args.n_classes,
            class_names=class_names,
            ignore_index=args.ignore_index,
            overcluster=args.overcluster,
            resize=args.resize,
            n_clusters=args.n_clusters,
            allow_missing=args.allow_missing,
            dataset_opts=opts,
        )
    except (DatasetError, DecodeError, LabelMapError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(_json_safe(result), indent=2) + "\n", encoding="utf-8")
        print(f"metrics written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
