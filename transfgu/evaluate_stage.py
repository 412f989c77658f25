"""Stage 5's method: score a trained decoder on the labelled validation split (as the reference) and write ``eval/``.

The cluster -> class matching (Hungarian, or majority vote when over-clustering) and the scores are computed by
:func:`transfgu.engine.loop.evaluate` and :mod:`transfgu.metrics`; this module builds the validation loader, applies
the error budget and writes the files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfgu.config import Config, n_output_channels
from transfgu.data.loaders import EvalDataset, dataset_classes, split_records
from transfgu.engine.loop import evaluate
from transfgu.errors import ErrorLog, check_error_budget
from transfgu.integrity import write_json_strict
from transfgu.logs import Progress
from transfgu.models.backbone import DinoViT
from transfgu.store.atomic import to_jsonable


def has_labelled_val(cfg: Config) -> bool:
    return cfg.data.val_split is not None and cfg.data.name != "folder"


def counted(batches: Iterable[Any], prog: Progress) -> Iterator[Any]:
    """``batches`` as they are, counting each one's images into ``prog`` once it has been used."""
    for batch in batches:
        yield batch
        first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
        prog.update(len(first))


def evaluate_decoder(
    cfg: Config, backbone: DinoViT, dec: torch.nn.Module, device: torch.device, amp: torch.dtype | None = None,
    errors: ErrorLog | None = None,
) -> tuple[dict[str, Any], tuple[str, ...], int]:
    """Scores of a decoder on the labelled validation split: ``(scores, class names, number of images)``.

    Unusable validation samples are recorded in ``errors`` and left out (``scores["skipped"]`` counts them); more
    than ``run.error_budget`` of them fail the evaluation.
    """
    names, ignore, label_map = dataset_classes(cfg)
    records = split_records(cfg, cfg.data.val_split)
    ds = EvalDataset(records, label_map, tuple(cfg.eval.eval_size), ignore, errors=errors)
    check_error_budget(len(ds.skipped), len(records), cfg.run.error_budget, "evaluate")
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.eval.batch_size, shuffle=False)
    with Progress("evaluate", len(ds)) as prog:
        scores = evaluate(
            dec, backbone, counted(loader, prog), n_clusters=n_output_channels(cfg), n_classes=len(names),
            device=device, eval_hw=tuple(cfg.eval.eval_size), ignore_index=-1, class_names=names,
            overcluster=cfg.eval.overcluster, amp_dtype=amp,
        )
    scores["skipped"] = len(ds.skipped)
    return scores, names, len(ds)


def write_eval(
    eval_dir: Path, scores: dict[str, Any], names: Sequence[str], pretrained: bool, n_images: int,
    input_hash: str | None = None,
    selection: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """metrics.json, per_class_iou.csv and confusion.csv; every file says whether the backbone was pretrained
    and how the model was selected (``best_val`` says loudly that validation labels were used).

    metrics.json is strict JSON: an undefined score (no labelled pixel) is ``null`` with a ``null_reasons`` entry.
    """
    eval_dir.mkdir(parents=True, exist_ok=True)
    conf = np.asarray(scores.get("confusion", scores.get("conf", [])))
    metrics = {
        "mIoU": float(scores["mIoU"]),
        "pixel_accuracy": float(scores["pixel_accuracy"]),
        "per_class_iou": to_jsonable(scores["per_class_iou"]),
        "mapping": [int(x) for x in np.asarray(scores["mapping"]).tolist()],
        "n_images": n_images,
        "n_clusters": int(scores.get("n_clusters", 0)),
        "pretrained": pretrained,
    }
    if not pretrained:
        metrics["warning"] = "random backbone (no pretrained weights): these numbers are not the method's"
    metrics.update(selection or {})
    if input_hash is not None:
        metrics["input_hash"] = input_hash
    write_json_strict(eval_dir / "metrics.json", metrics)
    lines = ["class,iou"] + [f"{k},{v}" for k, v in metrics["per_class_iou"].items()]
    (eval_dir / "per_class_iou.csv").write_text("\n".join(lines) + "\n")
    if conf.size:
        np.savetxt(eval_dir / "confusion.csv", conf, fmt="%d", delimiter=",")
    return metrics
