"""The visual report of a run directory: PNGs under ``<run>/report/`` and one self-contained ``index.html``.

``transfgu report RUN_DIR`` (and :func:`write_report`, which the pipeline calls when it finishes) draws, from what
the run directory holds:

* a banner saying whether the backbone was pretrained (a random-backbone run's numbers are not the method's);
* the metrics of ``eval/`` (mIoU, pixel accuracy, per-class IoU bars, the row-normalised confusion matrix after
  the Hungarian matching);
* the stage table of ``_manifest.json``;
* per-concept galleries: for each k-means concept, the training crops whose CLS features lie nearest its centroid
  (``features/`` + ``concepts/``; crop boxes are in the crop stage's resized image, ``crops.input_size``);
* CAM panels: a few training images with the K response maps of the pseudo-label bank (``label_bank/``, eq. 5-7);
* prediction vs ground truth for a few validation images (``model/`` checkpoint + the data set's labels);
* the inputs that were skipped (``errors.jsonl``) and the resolved configuration.

A section whose inputs are missing (e.g. no evaluation yet, or the data set is not on this machine) is replaced by
a note; the report never fails because a stage has not run. Images are embedded as base64 PNG so the HTML file
stands alone.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transfgu import viz
from transfgu.cli_args import report_parser
from transfgu.concepts import ConceptBank
from transfgu.config import DEFAULT_METHOD, METHOD_SECTIONS, config_class, drop_foreign_sections
from transfgu.data.datasets import dataset_spec, list_records, load_sample
from transfgu.data.io import load_rgb, resize_image, resize_label
from transfgu.integrity import REPORT_MARKER, report_files, require_run_dir
from transfgu.layout import RunLayout
from transfgu.logs import setup_logging
from transfgu.methods import get_method
from transfgu.metrics import matched_confusion
from transfgu.model_meta import MODEL_JSON
from transfgu.paths import PathEscapeError, is_inside, require_inside
from transfgu.predict import load
from transfgu.quality import funnel_rows
from transfgu.selection import BEST_DIR, VAL_HISTORY
from transfgu.store.atomic import atomic_write_json
from transfgu.store.formats import iter_feature_shards, list_parquet_files, read_label_bank
from transfgu.tracking import resolve_tracking_uri

__all__ = ["ReportOptions", "main", "nearest_crops", "write_report"]

log = logging.getLogger(__name__)


@dataclass
class ReportOptions:
    """How much to draw."""

    n_per_concept: int = 8  # crops per concept row
    concepts_per_png: int = 16  # concept rows per gallery PNG
    max_concepts: int = 200  # galleries stop after this many concepts
    max_feature_rows: int = 500_000  # crops scanned for the galleries (the first shards)
    max_crops_per_image: int | None = 2  # per concept row, so one photo's overlapping windows do not fill it
    n_cam_images: int = 3
    max_cam_maps: int = 17  # maps per CAM panel; with more concepts the strongest are shown
    n_pred_images: int = 4
    n_pred_candidates: int = 16  # images spread over the split, scored; the panel shows best, worst and between
    display_width: int = 320  # width of images in the CAM and prediction panels
    thumb: int = 96  # longer side of a gallery thumbnail
    n_mask_images: int = 4  # Leopart runs: images in the foreground-mask panel
    device: str | None = None  # for the prediction section; None = CUDA when present


@dataclass
class Section:
    title: str
    html: str = ""
    images: list[tuple[Path, str]] = field(default_factory=list)  # (png, caption)
    note: str | None = None


# -- run directory helpers -------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None


def _validate_lenient(data: dict[str, Any]):
    """Validate a config dict, dropping keys this version no longer knows (a report of an older run must work)."""
    from pydantic import ValidationError

    data = json.loads(json.dumps(data, default=str))
    if not isinstance(data, dict):
        raise TypeError(f"a configuration is a mapping, not {type(data).__name__}")
    data, _ = drop_foreign_sections(data)  # a config.yaml of an older version holds every method's sections
    cls = config_class(data.get("method", DEFAULT_METHOD))  # its class: error locations without the union's tag
    for _ in range(50):
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            extra = [e["loc"] for e in exc.errors() if e["type"] == "extra_forbidden"]
            if not extra:
                raise
            for loc in extra:
                node = data
                for key in loc[:-1]:
                    node = node[key]
                node.pop(loc[-1], None)
                log.warning("report: ignoring config key %s unknown to this version", ".".join(map(str, loc)))
    return cls.model_validate(data)


def _load_config(run_dir: Path, meta: dict[str, Any] | None):
    """The run's resolved config (config.yaml, else the copy in model.json), or None."""
    import yaml

    path = RunLayout(run_dir).config
    sources: list[tuple[str, Any]] = []
    if path.is_file():
        sources.append((str(path), lambda: yaml.safe_load(path.read_text(encoding="utf-8"))))
    if meta and meta.get("config"):
        sources.append(("model/model.json", lambda: meta["config"]))
    for name, read in sources:
        try:
            return _validate_lenient(read())
        except Exception as exc:  # an unreadable config must not stop the report
            log.warning("cannot read the config in %s: %s", name, exc)
    return None


def _pretrained(meta: dict[str, Any] | None, metrics: dict[str, Any] | None, cfg: Any) -> bool | None:
    if meta is not None and "pretrained" in meta.get("backbone", {}):
        return bool(meta["backbone"]["pretrained"])
    if metrics is not None and "pretrained" in metrics:
        return bool(metrics["pretrained"])
    if cfg is not None:
        return cfg.backbone.source.pretrained
    return None


def _records_by_id(cfg: Any, split: str) -> dict[str, Any]:
    return {r.image_id: r for r in list_records(cfg.data.name, cfg.data.root, split, **dict(cfg.data.options))}


def _rgb(path: Path) -> np.ndarray:
    """A writable decoded image (PIL-backed arrays are read-only and torch warns about them)."""
    return np.array(load_rgb(path))


def _resize_to_width(img: np.ndarray, width: int, mode: str = "bilinear") -> np.ndarray:
    h, w = img.shape[:2]
    if w <= width:
        return img
    size = (max(1, round(h * width / w)), width)
    return resize_image(img, size, mode) if img.ndim == 3 else resize_label(img, size)


def _channel_names(meta: dict[str, Any] | None, n_concepts: int, pools: Sequence[str]) -> list[str]:
    """``"k (pool) -> class"`` per concept; concept k is decoder channel k (k + 1 in the "things" variant)."""
    offset = 1 if meta is not None and meta.get("variant") == "things" else 0
    mapping = (meta or {}).get("cluster_to_class")
    names = (meta or {}).get("class_names") or []
    out = []
    for k in range(n_concepts):
        text = f"{k} ({pools[k]})"
        if mapping is not None and k + offset < len(mapping):
            c = int(mapping[k + offset])
            if 0 <= c < len(names):
                text += f" \u2192 {names[c]}"
        out.append(text)
    return out


# -- sections --------------------------------------------------------------------------------------------------------
def _metrics_section(run_dir: Path, out: Path, meta: dict[str, Any] | None, metrics: dict[str, Any] | None) -> Section:
    sec = Section("Metrics")
    if metrics is None:
        sec.note = "No evaluation yet (eval/metrics.json is missing): run the evaluate stage to get metrics."
        return sec
    miou, pa = metrics.get("mIoU"), metrics.get("pixel_accuracy")
    rows = [
        ("mIoU", f"{100 * miou:.2f} %" if miou is not None else "n/a"),
        ("pixel accuracy", f"{100 * pa:.2f} %" if pa is not None else "n/a"),
        ("validation images", str(metrics.get("n_images", "?"))),
        ("clusters", str(metrics.get("n_clusters", "?"))),
        ("classes", str(len(metrics.get("per_class_iou", {})))),
    ]
    if metrics.get("warning"):
        rows.append(("warning", metrics["warning"]))
    if metrics.get("selection"):
        chosen = metrics["selection"]
        if metrics.get("selected_epoch") is not None:
            chosen += f" (epoch {int(metrics['selected_epoch']) + 1})"
        rows.append(("model selection", chosen))
    if metrics.get("selection_warning"):
        rows.append(("selection warning", metrics["selection_warning"]))
    sec.html = _table(["", ""], rows, show_header=False)
    if metrics.get("selection_warning"):
        sec.html = f"<p><b>{html.escape(metrics['selection_warning'])}</b></p>" + sec.html
    per_class = metrics.get("per_class_iou") or {}
    if per_class:
        fig = viz.iou_bar_figure(per_class, miou, title="Per-class IoU (Hungarian matching over the split)")
        sec.images.append((viz.save_figure(fig, out / "per_class_iou.png"), "Per-class IoU; grey = class absent."))
    conf_path = RunLayout(run_dir).eval / "confusion.csv"
    if conf_path.is_file() and metrics.get("mapping") is not None:
        conf = np.loadtxt(conf_path, delimiter=",", dtype=np.int64, ndmin=2)
        names = list(per_class) or [str(i) for i in range(conf.shape[0])]
        matched = matched_confusion(conf, np.asarray(metrics["mapping"]))
        fig = viz.confusion_figure(matched, names, title="Confusion matrix after matching (row %)")
        caption = "Rows: ground truth; columns: prediction after cluster-to-class matching; cells: % of the row."
        n_unmatched = int(conf[:, np.asarray(metrics["mapping"]) < 0].sum())
        if n_unmatched:
            caption += f" {n_unmatched} pixels fell in unmatched clusters and appear in no column."
        sec.images.append((viz.save_figure(fig, out / "confusion.png"), caption))
    return sec


def _funnel_section(metrics: dict[str, Any] | None) -> Section:
    """concepts -> pseudo labels -> round 1 ... -> final, from ``metrics["stages"]`` (transfgu.quality)."""
    sec = Section("Quality at every stage")
    rows = funnel_rows(metrics or {})
    if not metrics or not metrics.get("stages"):
        sec.note = "No stage-quality measurements in eval/metrics.json (no ground truth, or an older run)."
        return sec
    text = ("Each stage scored against the ground truth: concepts on the training crops, pseudo labels on the "
            "training images, teacher/student of every round on the validation split.")
    if metrics.get("prior") and metrics["prior"] != "pretrained":
        text += f" Backbone prior: {metrics['prior']} (not the method's numbers)."
    sec.html = f"<p>{html.escape(text)}</p>" + _table(["stage", "measure", "value"], rows)
    return sec


def _val_history_section(run_dir: Path) -> Section:
    """Per-epoch validation scores (train.select=best_val or train.validate_every), issue 12 item 3."""
    sec = Section("Validation history")
    path = RunLayout(run_dir).train / VAL_HISTORY
    if not path.is_file():
        # Not a missing input (notes mark those): this run simply did not ask for a validation history.
        sec.html = "<p>No per-epoch validation in this run (train.validate_every=N or train.select=best_val).</p>"
        return sec
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    best = _read_json(RunLayout(run_dir).train / BEST_DIR / "best.json")
    rows = [(e["round"], e["epoch"] + 1, f"{100 * e['mIoU']:.2f}", f"{100 * e['pixel_accuracy']:.2f}",
             "selected (best on val)" if best and best["epoch"] == e["epoch"] else "") for e in entries]
    sec.html = _table(["round", "epoch", "val mIoU %", "val pixel acc %", ""], rows)
    if best:
        sec.html = f"<p><b>{html.escape(best.get('warning', ''))}</b></p>" + sec.html
    return sec


def _finetune_section(run_dir: Path) -> Section:
    """Leopart dense fine-tuning: the per-epoch history and the attention / cluster maps before and after."""
    info = _read_json(RunLayout(run_dir).finetune_json) or {}
    sec = Section("Dense fine-tuning")
    src = info.get("source") or {}
    rows = [(str(h["epoch"] + 1), f"{h['loss']:.4f}", f"{h['usage_entropy']:.3f}", f"{h['momentum']:.6f}")
            for h in info.get("history", [])]
    sec.html = (f"<p class='meta'>source weights: {html.escape(str(src.get('weights')))} "
                f"({html.escape(str(src.get('prior')))}); "
                f"output: finetune/{html.escape(str(info.get('backbone_file')))}"
                f" ({html.escape(str(info.get('exported')))})</p>"
                + _table(["epoch", "loss", "cluster-usage entropy", "EMA momentum"], rows))
    pic = RunLayout(run_dir).finetune_pictures
    if pic.is_file():
        sec.images.append((pic, "last-block CLS attention and 8-cluster maps of the patch tokens, source backbone "
                                "(before) vs fine-tuned backbone (after)"))
    return sec


def _stages_section(run_dir: Path) -> Section:
    sec = Section("Stages")
    man = _read_json(RunLayout(run_dir).manifest)
    if not man or not man.get("stages"):
        sec.note = "No stage has run yet (_manifest.json is missing or empty)."
        return sec
    rows = []
    for name, rec in man["stages"].items():
        extra = rec.get("extra", {})
        rows.append((name, rec.get("status", "?"), str(rec.get("rows", "")), str(extra.get("seconds", "")),
                     rec.get("finished_at") or "", rec.get("error") or ""))
    sec.html = _table(["stage", "status", "rows", "seconds", "finished", "error"], rows)
    return sec


Crop = tuple[float, str, tuple[int, int, int, int]]  # (squared distance, image_id, box)


def nearest_crops(
    shards: Any,
    centroids: np.ndarray,
    pools: Sequence[str],
    n: int,
    max_rows: int | None = None,
    max_per_image: int | None = None,
    pool_factor: int = 16,
) -> tuple[list[list[Crop]], int]:
    """The ``n`` crops nearest each centroid (squared L2 on the raw CLS features, as k-means uses), streamed.

    Args:
        shards: iterable of ``(path, meta table with image_id/box/pool, cls (m, D))`` (see
            :func:`transfgu.store.formats.iter_feature_shards`).
        centroids: ``(K, D)``; ``pools[k]`` is the pool of concept k: it is compared with that pool's crops only.
        max_rows: stop after the shard that reaches this many crops.
        max_per_image: at most this many crops of one image per concept (overlapping windows of one photo
            otherwise fill a row); the nearest ``n * pool_factor`` crops are kept as candidates for it.

    Returns:
        per concept a list of ``(distance, image_id, box)`` nearest first, and the number of crops scanned.
    """
    c = np.asarray(centroids, dtype=np.float32)
    c2 = (c.astype(np.float64) ** 2).sum(1)
    keep = n if max_per_image is None else n * pool_factor
    cands: list[list[Crop]] = [[] for _ in range(len(c))]
    pool_of = np.asarray(list(pools))
    scanned = 0
    for _, table, cls in shards:
        ids = table["image_id"].to_pylist()
        boxes = np.asarray(table["box"].to_pylist(), dtype=np.int64).reshape(-1, 4)
        crop_pool = np.asarray(table["pool"].to_pylist())
        x = np.asarray(cls, dtype=np.float32)
        x2 = (x.astype(np.float64) ** 2).sum(1)
        for pool in np.unique(pool_of):
            ks = np.flatnonzero(pool_of == pool)
            rows = np.flatnonzero(crop_pool == pool)
            if not len(rows):
                continue
            d = x2[rows, None] - 2.0 * (x[rows] @ c[ks].T).astype(np.float64) + c2[None, ks]  # (rows, len(ks))
            take = min(keep, len(rows))
            top = np.argpartition(d, take - 1, axis=0)[:take] if take < len(rows) else np.arange(len(rows))[:, None]
            for j, k in enumerate(ks):
                col = top[:, j] if top.shape[1] == len(ks) else top[:, 0]
                new = [(float(d[i, j]), ids[rows[i]], tuple(int(v) for v in boxes[rows[i]])) for i in col]
                cands[k] = sorted(cands[k] + new, key=lambda t: t[0])[:keep]
        scanned += len(ids)
        if max_rows is not None and scanned >= max_rows:
            break
    best: list[list[Crop]] = []
    for cand in cands:
        picked: list[Crop] = []
        per_image: dict[str, int] = {}
        for item in cand:
            if max_per_image is not None and per_image.get(item[1], 0) >= max_per_image:
                continue
            per_image[item[1]] = per_image.get(item[1], 0) + 1
            picked.append(item)
            if len(picked) == n:
                break
        best.append(picked)
    return best, scanned


def _gallery_section(run_dir: Path, out: Path, cfg: Any, meta: dict[str, Any] | None, opt: ReportOptions) -> Section:
    sec = Section("Concept galleries")
    if not (RunLayout(run_dir).concepts / ConceptBank.META_FILE).is_file():
        sec.note = "No concepts yet (concepts/ is missing): run the concepts stage."
        return sec
    if not RunLayout(run_dir).features.is_dir() or not list_parquet_files(RunLayout(run_dir).features):
        sec.note = "No crop features (features/ is missing or empty)."
        return sec
    if cfg is None:
        sec.note = "The run's config is missing, so the crops cannot be located in their images."
        return sec
    bank = ConceptBank.load(RunLayout(run_dir).concepts)
    k_show = min(bank.num_concepts, opt.max_concepts)
    shards = iter_feature_shards(RunLayout(run_dir).features, columns=["image_id", "split", "box", "pool"])
    best, scanned = nearest_crops(shards, bank.centroids[:k_show], bank.pools[:k_show], opt.n_per_concept,
                                  opt.max_feature_rows, max_per_image=opt.max_crops_per_image)
    splits = {cfg.data.train_split}
    records: dict[str, Any] = {}
    for split in splits:
        try:
            records.update(_records_by_id(cfg, split))
        except Exception as exc:
            sec.note = f"The training images are not readable here ({exc}); galleries skipped."
            return sec
    size = tuple(cfg.crops.input_size)
    cache: dict[str, np.ndarray | None] = {}

    def stage_image(image_id: str) -> np.ndarray | None:
        if image_id not in cache:
            try:
                cache[image_id] = resize_image(_rgb(records[image_id].image_path), size, cfg.crops.resize_mode)
            except (KeyError, OSError, ValueError):
                cache[image_id] = None
            if len(cache) > 512:
                cache.pop(next(iter(cache)))
        return cache[image_id]

    thumbs: list[list[np.ndarray]] = []
    for picks in best:
        row = []
        for _, image_id, (x0, y0, x1, y1) in picks:
            img = stage_image(image_id)
            if img is None:
                continue
            crop = img[y0:y1, x0:x1]
            if crop.size == 0:
                continue
            h, w = crop.shape[:2]
            s = opt.thumb / max(h, w)
            row.append(resize_image(crop, (max(1, round(h * s)), max(1, round(w * s)))))
        thumbs.append(row)
    titles = _channel_names(meta, k_show, bank.pools)
    for start in range(0, k_show, opt.concepts_per_png):
        stop = min(k_show, start + opt.concepts_per_png)
        fig = viz.concept_gallery(thumbs[start:stop], titles[start:stop],
                                  title=f"Concepts {start}-{stop - 1}: crops nearest each centroid")
        path = viz.save_figure(fig, out / f"concepts_{start // opt.concepts_per_png:02d}.png", dpi=80)
        sec.images.append((path, f"Concepts {start}-{stop - 1}, nearest crop first."))
    sec.html = (
        f"<p>{bank.num_concepts} concepts (k-means on crop CLS features, pools {html.escape(str(bank.k_per_pool))}); "
        f"each row shows the {opt.n_per_concept} crops nearest the concept's centroid among {scanned:,} crops "
        f"scanned (at most {opt.max_crops_per_image} per image). The arrow names the class its decoder channel "
        "was matched to at evaluation.</p>"
    )
    if k_show < bank.num_concepts:
        sec.html += f"<p>Only the first {k_show} of {bank.num_concepts} concepts are shown.</p>"
    return sec


def _cam_section(run_dir: Path, out: Path, cfg: Any, meta: dict[str, Any] | None, opt: ReportOptions) -> Section:
    import pyarrow.parquet as pq

    sec = Section("CAM panels (pseudo-label bank)")
    files = list_parquet_files(RunLayout(run_dir).label_bank) if RunLayout(run_dir).label_bank.is_dir() else []
    if not files:
        sec.note = "No pseudo-label bank yet (label_bank/ is missing or empty): run the label_bank stage."
        return sec
    if cfg is None:
        sec.note = "The run's config is missing, so the images of the label bank cannot be found."
        return sec
    ids = pq.read_table(files[0], columns=["image_id"])["image_id"].to_pylist()[: opt.n_cam_images]
    maps = read_label_bank(files[0], ids)
    try:
        records = _records_by_id(cfg, cfg.data.train_split)
    except Exception as exc:
        sec.note = f"The training images are not readable here ({exc}); CAM panels skipped."
        return sec
    pools = None
    if (RunLayout(run_dir).concepts / ConceptBank.META_FILE).is_file():
        pools = ConceptBank.load(RunLayout(run_dir).concepts).pools
    for i, image_id in enumerate(ids):
        m = maps[image_id].astype(np.float32)
        k = m.shape[0]
        names = _channel_names(meta, k, pools if pools is not None and len(pools) == k else ["?"] * k)
        order = np.arange(k)
        note = ""
        if k > opt.max_cam_maps:
            order = np.sort(np.argsort(-m.reshape(k, -1).max(1))[: opt.max_cam_maps])
            note = f" (the {opt.max_cam_maps} of {k} maps with the highest peak)"
        try:
            img = _resize_to_width(_rgb(records[image_id].image_path), opt.display_width)
        except (KeyError, OSError, ValueError) as exc:
            sec.html += f"<p>{html.escape(image_id)}: image not readable ({html.escape(str(exc))})</p>"
            continue
        fig = viz.cam_panel(img, m[order], [names[j].replace(" \u2192 ", "\n\u2192 ") for j in order],
                            title=f"{image_id}: concept response maps{note}")
        sec.images.append((viz.save_figure(fig, out / f"cam_{i:02d}.png", dpi=80), f"{image_id}{note}"))
    sec.html = (
        "<p>Attention Grad-CAM of each concept (eq. 5-7) as stored in the label bank; they become the "
        "training pseudo labels. One colour scale per image.</p>" + sec.html
    )
    return sec


def _prediction_section(run_dir: Path, out: Path, cfg: Any, meta: dict[str, Any] | None,
                        opt: ReportOptions) -> Section:
    sec = Section("Predictions vs ground truth")
    if meta is None:
        sec.note = "No trained model yet (model/model.json is missing): run the train stage."
        return sec
    if cfg is None:
        sec.note = "The run's config is missing, so no validation images can be found."
        return sec
    labelled = cfg.data.val_split is not None and cfg.data.name != "folder"
    split = cfg.data.val_split if labelled else cfg.data.train_split
    try:
        records = list(list_records(cfg.data.name, cfg.data.root, split, **dict(cfg.data.options)))
        n_split = len(records)
        records = [records[i] for i in spread(n_split, max(opt.n_pred_candidates, opt.n_pred_images))]
        spec = dataset_spec(cfg.data.name, cfg.data.root, **dict(cfg.data.options)) if labelled else None
    except Exception as exc:
        sec.note = f"The {split} images are not readable here ({exc}); section skipped."
        return sec
    predictor = load(run_dir, device=opt.device)
    as_classes = predictor.cluster_to_class is not None and spec is not None
    names = list(spec.class_names) if as_classes else [f"cluster {i}" for i in range(predictor.n_clusters)]
    colours = viz.palette(max(len(names), 1))
    scored = []  # (image id, image, gt, pred, per-image mIoU or None)
    for rec in records:
        try:
            if spec is not None:
                img, gt = load_sample(rec, spec.label_map)
                img = np.array(img)
                gt = np.where((gt == spec.ignore_index) | (gt < 0) | (gt >= len(spec.class_names)), -1, gt)
            else:
                img, gt = _rgb(rec.image_path), None
        except Exception as exc:
            sec.html += f"<p>{html.escape(rec.image_id)}: not readable ({html.escape(str(exc))})</p>"
            continue
        pred = predictor.predict(img, as_classes=as_classes)
        score = image_miou(gt, pred, len(names)) if as_classes and gt is not None else None
        scored.append((rec.image_id, img, gt, pred, score))
    ranked = all(s[4] is not None for s in scored) and bool(scored)
    if ranked:  # best, worst and evenly spaced ranks between: the model's range, not four neighbouring frames
        order = sorted(range(len(scored)), key=lambda i: -scored[i][4])
        chosen = [order[i] for i in spread(len(order), opt.n_pred_images)]
    else:
        chosen = spread(len(scored), opt.n_pred_images)
    rows, table = [], []
    for rank, i in enumerate(chosen):
        image_id, img, gt, pred, score = scored[i]
        small = _resize_to_width(img, opt.display_width)
        hw = small.shape[:2]
        caption = image_id
        if ranked:
            where = "best" if rank == 0 else "worst" if rank == len(chosen) - 1 else f"rank {order.index(i) + 1}"
            caption = f"{image_id}: {where}, mIoU {100 * score:.1f} %"
            table.append((image_id, where, f"{100 * score:.1f} %"))
        rows.append((caption, small, None if gt is None or not as_classes else resize_label(gt, hw),
                     resize_label(pred, hw)))
    if rows:
        fig = viz.prediction_panel(rows, names, colours,
                                   pred_title="prediction (matched classes)" if as_classes else "prediction (clusters)")
        sec.images.append((viz.save_figure(fig, out / "predictions.png", dpi=80), ""))
    what = (
        "Cluster ids are mapped to classes with the Hungarian matching of the evaluation; black = ignored "
        "ground truth or an unmatched cluster." if as_classes else
        "No cluster-to-class matching is available, so clusters are shown with their own colours (ground truth "
        "is not comparable colour for colour and is not drawn)."
    )
    split_name = f"split <code>{html.escape(str(split))}</code>"
    how = (f"{len(scored)} images spread evenly over the {n_split} of {split_name} were scored by per-image mIoU "
           f"(classes present in the image's ground truth or prediction); shown: the best, the worst and "
           f"{max(len(rows) - 2, 0)} evenly spaced ranks between." if ranked else
           f"{len(rows)} images spread evenly over the {n_split} of {split_name}.")
    sec.html = f"<p>{how} {what}</p>" + sec.html
    if table:
        sec.html += _table(["image", "", "per-image mIoU"], table)
    return sec


def spread(n: int, k: int) -> list[int]:
    """``min(k, n)`` indices spread evenly over ``range(n)``, first and last included (``[0]`` for one)."""
    if n <= 0 or k <= 0:
        return []
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def image_miou(gt: np.ndarray, pred: np.ndarray, n: int) -> float:
    """Mean IoU of one image over the classes present in its ground truth or its prediction (ids outside
    ``[0, n)`` -- ignored ground truth, unmatched clusters -- are not scored where the ground truth is ignored, and
    count as wrong where it is not)."""
    valid = (gt >= 0) & (gt < n)
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    ok = (p >= 0) & (p < n)
    conf = np.bincount(g[ok] * n + p[ok], minlength=n * n).reshape(n, n)
    gt_count = np.bincount(g, minlength=n)
    pred_count = conf.sum(0)
    inter = np.diag(conf)
    union = gt_count + pred_count - inter
    present = union > 0
    return float((inter[present] / union[present]).mean()) if present.any() else 0.0


def _errors_section(run_dir: Path) -> Section:
    sec = Section("Skipped inputs")
    path = RunLayout(run_dir).errors
    if not path.is_file():
        sec.html = "<p>No input was skipped.</p>"
        return sec
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rows = [(e.get("stage", ""), e.get("file", ""), e.get("reason", "")) for e in entries[:50]]
    sec.html = f"<p>{len(entries)} inputs were skipped (errors.jsonl).</p>" + _table(["stage", "file", "reason"], rows)
    return sec


def _config_section(cfg: Any, run_dir: Path) -> Section:
    import yaml

    sec = Section("Configuration")
    path = RunLayout(run_dir).config
    data: Any = None
    if path.is_file():
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            log.warning("report: cannot parse %s: %s", path, exc)
    if not isinstance(data, dict) and cfg is not None:
        data = cfg.model_dump(mode="json")
    if not isinstance(data, dict):
        sec.note = "No config.yaml in the run directory."
        return sec
    method = str(data.get("method") or "transfgu")
    # a config.yaml of an older version may still hold every method's sections
    other = {sec for m, secs in METHOD_SECTIONS.items() if m != method for sec in secs}
    dropped = [k for k in data if k in other]
    text = yaml.safe_dump({k: v for k, v in data.items() if k not in dropped}, sort_keys=False)
    left_out = (f" (sections of other methods left out: {', '.join(dropped)}; the full file is "
                f"<code>config.yaml</code> in the run directory)" if dropped else "")
    sec.html = (f"<details><summary>The resolved configuration of this <code>{html.escape(method)}</code> run, "
                f"{len(text.splitlines())} lines{left_out}</summary><pre>{html.escape(text)}</pre></details>")
    return sec


def mlflow_run_link(cfg: Any) -> tuple[str, str] | None:
    """``(url, how to open it)`` of the run's MLflow parent run (the newest with its name), or None.

    Read-only: a SQLite store that does not exist is not created. The URL of a local store is the one ``mlflow ui``
    serves on its default address.
    """
    if cfg is None or not cfg.mlflow.enabled:
        return None

    uri = resolve_tracking_uri(cfg)
    local = uri.startswith("sqlite:///")
    if local and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    if not (local or uri.startswith(("http://", "https://"))):
        return None
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is None:
        return None
    name = str(cfg.run.name).replace("'", "")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=50)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags] or runs
    if not parents:
        return None
    run = parents[0]
    base = "http://127.0.0.1:5000" if local else uri.rstrip("/")
    url = f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
    how = f"mlflow ui --backend-store-uri {uri}" if local else ""
    return url, how


def _mlflow_html(cfg: Any) -> str:
    try:
        link = mlflow_run_link(cfg)
    except Exception as exc:  # the link is a convenience: never fail the report on it
        log.warning("report: cannot find the run in MLflow: %s: %s", type(exc).__name__, exc)
        return ""
    if link is None:
        return ""
    url, how = link
    start = f" (start the UI first: <code>{html.escape(how)}</code>)" if how else ""
    return (f"<p class='meta'>MLflow run: <a id='mlflow-run' href='{html.escape(url)}'>{html.escape(url)}</a>"
            f"{start}</p>")


# -- HTML ------------------------------------------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], show_header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>" if show_header else ""
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{head}{body}</table>"


def _img_tag(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(path.name)}">{cap}</figure>'


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;padding:0 16px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
.banner{padding:14px 18px;border-radius:6px;font-size:17px;margin:16px 0}
.random{background:#fde2e1;border:2px solid #d62728;color:#8b0000}
.pretrained{background:#e3f4e1;border:2px solid #2ca02c;color:#145214}
.unknown{background:#fff3cd;border:2px solid #e0a800;color:#6b5000}
.note{background:#f4f4f4;border-left:4px solid #999;padding:8px 12px;color:#555}
table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;
font-size:14px;vertical-align:top}
th{background:#f6f6f6} figure{margin:12px 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#555} pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px}
.meta{color:#666;font-size:14px}
.toc{background:#fafafa;border:1px solid #eee;padding:6px 16px;display:inline-block;font-size:14px}
.toc ol{margin:4px 0;padding-left:20px} details summary{cursor:pointer;color:#444}
"""


def _banner(pretrained: bool | None, meta: dict[str, Any] | None, cfg: Any) -> str:
    bb = (meta or {}).get("backbone") or {}
    arch = bb.get("arch") or (cfg.backbone.arch if cfg is not None else "?")
    weights = bb.get("weights") or (cfg.backbone.weights if cfg is not None else "?")
    if pretrained is False and bb.get("prior") == "supervised stand-in":
        return (
            '<div class="banner random"><b>SUPERVISED STAND-IN PRIOR (not pretrained).</b> '
            f"The {html.escape(str(arch))} backbone was trained with labels on a stand-in set "
            "(transfgu.tools.standin_prior): a test fixture, so these numbers are <b>not the method's</b>.</div>"
        )
    if pretrained is False:
        return (
            '<div class="banner random"><b>RANDOM BACKBONE (no pretrained weights).</b> '
            f"The {html.escape(str(arch))} backbone of this run was randomly initialised, so its features, "
            "concepts, pseudo labels and metrics are <b>not the method's</b>: this run is a smoke test. Give "
            "<code>backbone.weights</code> a DINO checkpoint for real results.</div>"
        )
    if pretrained is True:
        return (
            f'<div class="banner pretrained"><b>Pretrained backbone:</b> {html.escape(str(arch))} with weights '
            f"<code>{html.escape(str(weights))}</code>.</div>"
        )
    return '<div class="banner unknown"><b>Backbone weights unknown</b>: no model, metrics or config found.</div>'


def _anchor(title: str) -> str:
    return "sec-" + "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")


def _render(run_dir: Path, sections: Sequence[Section], banner: str, summary: str, links: str = "",
            method: str = "transfgu") -> str:
    """The page; ``method``: the run's method as people write it (:attr:`transfgu.method.Method.display_name`)."""
    toc = "".join(f"<li><a href='#{_anchor(sec.title)}'>{html.escape(sec.title)}</a></li>" for sec in sections)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(method)} report: {html.escape(run_dir.name)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(method)} run <code>{html.escape(run_dir.name)}</code></h1>",
        f"<div class='meta'>{html.escape(str(run_dir.resolve()))} &middot; report written "
        f"{html.escape(time.strftime('%Y-%m-%d %H:%M:%S'))}</div>",
        banner,
        summary,
        links,
        f"<nav class='toc'><b>Contents</b><ol>{toc}</ol></nav>",
    ]
    for sec in sections:
        parts.append(f"<h2 id='{_anchor(sec.title)}'>{html.escape(sec.title)}</h2>")
        if sec.note:
            parts.append(f"<p class='note'>{html.escape(sec.note)}</p>")
        parts.append(sec.html)
        parts.extend(_img_tag(p, c) for p, c in sec.images)
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary(metrics: dict[str, Any] | None, meta: dict[str, Any] | None, cfg: Any) -> str:
    items = []
    if cfg is not None:
        items.append(f"data set <b>{html.escape(cfg.data.name)}</b> ({html.escape(str(cfg.data.root))})")
        line = get_method(cfg.method).summary(cfg)
        if line:
            items.append(line)
    if metrics is not None and metrics.get("mIoU") is not None:
        items.append(f"<b>mIoU {100 * metrics['mIoU']:.2f} %</b>, pixel accuracy "
                     f"{100 * metrics['pixel_accuracy']:.2f} % on {metrics.get('n_images', '?')} images")
    return "<p>" + " &middot; ".join(items) + "</p>" if items else ""


def write_report(run_dir: str | Path, options: ReportOptions | None = None) -> Path:
    """Write ``<run>/report/*.png`` and the self-contained ``<run>/report/index.html``; returns the HTML path.

    Sections whose inputs are missing, or that fail, are replaced by a note naming the reason.
    """
    opt = options or ReportOptions()

    run_dir = require_run_dir(Path(run_dir), "transfgu report")
    out = require_inside(RunLayout(run_dir).report, run_dir, "the report folder")
    out.mkdir(parents=True, exist_ok=True)
    for p in out.iterdir():  # a planted link would make a report file land outside the run
        if p.is_symlink() and not is_inside(p, out):
            raise PathEscapeError(f"refusing to write the report: {p} is a symbolic link out of {out}")
    for name in report_files(out):  # only the files an earlier report wrote, never a user's
        (out / name).unlink(missing_ok=True)
    foreign = {p.name for p in out.glob("*.png")}

    meta = _read_json(RunLayout(run_dir).model / MODEL_JSON)
    metrics = _read_json(RunLayout(run_dir).metrics)
    cfg = _load_config(run_dir, meta)
    pretrained = _pretrained(meta, metrics, cfg)
    builders: list[tuple[str, Callable[[], Section]]] = [
        ("Metrics", lambda: _metrics_section(run_dir, out, meta, metrics)),
        ("Quality at every stage", lambda: _funnel_section(metrics)),
        ("Predictions vs ground truth", lambda: _prediction_section(run_dir, out, cfg, meta, opt)),
        ("Concept galleries", lambda: _gallery_section(run_dir, out, cfg, meta, opt)),
        ("CAM panels (pseudo-label bank)", lambda: _cam_section(run_dir, out, cfg, meta, opt)),
        ("Validation history", lambda: _val_history_section(run_dir)),
        ("Stages", lambda: _stages_section(run_dir)),
        ("Skipped inputs", lambda: _errors_section(run_dir)),
        ("Configuration", lambda: _config_section(cfg, run_dir)),
    ]
    if cfg is not None:  # the method's own pictures (Leopart's instead of TransFGU's concepts and CAMs)
        builders = get_method(cfg.method).report_sections(builders, run_dir, out, cfg, metrics, opt)
    if RunLayout(run_dir).finetune_json.is_file():  # method: leopart_finetune: no segmentation to show
        builders = [("Dense fine-tuning", lambda: _finetune_section(run_dir)), *builders[-3:]]
    sections = []
    for title, build in builders:
        try:
            sections.append(build())
        except Exception as exc:  # one broken section must not cost the user the rest of the report
            log.exception("report section %r failed", title)
            sections.append(Section(title, note=f"This section could not be drawn: {type(exc).__name__}: {exc}"))
    page = _render(run_dir, sections, _banner(pretrained, meta, cfg), _summary(metrics, meta, cfg), _mlflow_html(cfg),
                   get_method(cfg.method).display_name if cfg is not None else "transfgu")
    path = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    mine = sorted({p.name for p in out.glob("*.png")} - foreign)
    atomic_write_json(out / REPORT_MARKER, {"files": mine})
    log.info("report written to %s", path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = report_parser()
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        setup_logging()  # the console format of every transfgu command
    opt = ReportOptions(n_per_concept=args.per_concept, n_cam_images=args.cam_images,
                        n_pred_images=args.pred_images, n_pred_candidates=args.pred_candidates, device=args.device)
    try:
        path = write_report(args.run_dir, opt)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"report: {path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

