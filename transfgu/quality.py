"""Segmentation quality at every stage of the method, measured against the ground truth where it exists.

The final mIoU alone cannot say which stage failed. This module scores each stage's own output:

* **concepts** (k-means; docs/quality.md): every training crop is assigned to its nearest concept of its pool (the
  k-means assignment) and compared with the crop's *majority ground-truth class* (the most frequent labelled class
  inside the crop's box). Reported: ``purity`` = sum over concepts of the size of their largest class / crops,
  ``balanced_purity`` (the same with every class weighing the same), and ``nmi`` = I(concept; class) / ((H(concept)
  + H(class)) / 2) (arithmetic normalisation, as scikit-learn's default); each concept is named by its crops'
  majority class (``concept_class``);
* **pseudo labels** (eq. 5-8): the label bank's decisions on the training images -- the argmax over the K concept maps,
  with the background channel of eq. 8 in the "things" variant (``relu(T_bg - max_k P~_k)`` after the per-image
  min-max normalisation, ties to background) -- against the training labels, one confusion matrix over the split and
  one Hungarian matching (the evaluation protocol), giving ``mIoU`` and ``pixel_accuracy``; and ``anchored_mIoU``, with
  every channel named by its own concept's crops instead of a matching (does concept k land where k's crops are?);
* **bootstrapped targets** (eq. 12): per round with a teacher, the targets the student trains on (teacher
  softmax mixed into the pseudo labels) on the training images, scored as the pseudo labels, and the share of
  positions where the round's student agrees with its teacher;
* **bootstrapping** (eq. 10-12): validation mIoU of the teacher and of the student at the end of every round, read from
  the round checkpoints ``train/round_<r>/``.

Everything here is method code: it knows nothing of Ray, and the distributed pipeline reaches it through the same
evaluate stage. :func:`stage_quality` gathers the three into the ``stages`` entry of ``eval/metrics.json``; the
report draws it as a funnel (:func:`funnel_rows`), and the MLflow parent run gets ``quality/*`` metrics
(:func:`mlflow_metrics`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from transfgu.checkpoint import load_train_state
from transfgu.concepts import ConceptBank
from transfgu.config import n_output_channels
from transfgu.data.datasets import load_sample
from transfgu.data.io import load_rgb
from transfgu.data.loaders import dataset_classes, split_records
from transfgu.data.transforms import to_uint8_chw
from transfgu.engine import targets as engine_targets
from transfgu.kmeans import assign
from transfgu.layout import RunLayout
from transfgu.metrics import RunningConfusion, matched_confusion
from transfgu.models.backbone import normalize
from transfgu.store.formats import read_features, read_label_bank

log = logging.getLogger(__name__)


# -- clustering scores ---------------------------------------------------------------------------------------------
def contingency(classes: np.ndarray, clusters: np.ndarray) -> np.ndarray:
    """``(n_classes, n_clusters)`` counts of (class, cluster) pairs; entries with class < 0 are left out."""
    classes = np.asarray(classes, dtype=np.int64).ravel()
    clusters = np.asarray(clusters, dtype=np.int64).ravel()
    if classes.shape != clusters.shape:
        raise ValueError(f"{classes.size} classes for {clusters.size} cluster ids")
    keep = classes >= 0
    classes, clusters = classes[keep], clusters[keep]
    if classes.size == 0:
        return np.zeros((0, 0), dtype=np.int64)
    n_cls, n_clu = int(classes.max()) + 1, int(clusters.max()) + 1
    return np.bincount(classes * n_clu + clusters, minlength=n_cls * n_clu).reshape(n_cls, n_clu)


def purity(classes: np.ndarray, clusters: np.ndarray) -> float:
    """Share of items whose cluster's most frequent class is their own class (NaN without labelled items)."""
    c = contingency(classes, clusters)
    total = c.sum()
    return float(c.max(axis=0).sum() / total) if total else float("nan")


def balanced_purity(classes: np.ndarray, clusters: np.ndarray) -> float:
    """Purity with every class given the same total weight (each item weighs ``1 / size of its class``).

    Plain purity is dominated by the frequent classes (CamVid crops: building, road, car, sky, tree are 93 % of the
    majority labels), so concepts that only split the big classes score as well as concepts that also find the
    rare ones. Here ``sum_k max_c (n_ck / n_c) / n_present_classes``: 1 for a perfect clustering, and
    ``1 / n_present_classes`` for a single cluster.
    """
    c = contingency(classes, clusters).astype(np.float64)
    sizes = c.sum(axis=1)
    present = sizes > 0
    if not present.any():
        return float("nan")
    share = c[present] / sizes[present, None]
    return float(share.max(axis=0).sum() / present.sum())


def nmi(classes: np.ndarray, clusters: np.ndarray) -> float:
    """Normalised mutual information ``I / mean(H_class, H_cluster)`` in [0, 1]; 1.0 when both are constant."""
    c = contingency(classes, clusters).astype(np.float64)
    total = c.sum()
    if not total:
        return float("nan")
    p = c / total
    pc, pk = p.sum(axis=1), p.sum(axis=0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / np.outer(pc, pk)[nz])).sum())
    h_c = float(-(pc[pc > 0] * np.log(pc[pc > 0])).sum())
    h_k = float(-(pk[pk > 0] * np.log(pk[pk > 0])).sum())
    denom = (h_c + h_k) / 2
    if denom <= 0:
        return 1.0
    return max(0.0, min(1.0, mi / denom))


def box_majority(label: np.ndarray, boxes: np.ndarray, n_classes: int) -> np.ndarray:
    """Majority class inside every pixel box ``(x0, y0, x1, y1)`` (exclusive ends) of one label map; -1 if none.

    ``label`` holds class ids in ``[0, n_classes)`` and -1 for ignored pixels. One 2-D cumulative count per class
    makes every box an O(C) lookup.
    """
    lab = np.asarray(label, dtype=np.int64)
    hh, ww = lab.shape
    onehot = np.zeros((n_classes, hh + 1, ww + 1), dtype=np.int64)
    valid = lab >= 0
    ys, xs = np.nonzero(valid)
    np.add.at(onehot, (lab[valid], ys + 1, xs + 1), 1)
    integral = onehot.cumsum(axis=1).cumsum(axis=2)
    b = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    x0, y0 = np.clip(b[:, 0], 0, ww), np.clip(b[:, 1], 0, hh)
    x1, y1 = np.clip(b[:, 2], 0, ww), np.clip(b[:, 3], 0, hh)
    counts = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]  # (C, n)
    out = counts.argmax(axis=0)
    out[counts.sum(axis=0) == 0] = -1
    return out


# -- ground truth of the training split ----------------------------------------------------------------------------
def _labels(cfg: Any, split: str) -> tuple[dict[str, np.ndarray], int, tuple[str, ...]]:
    """``{image_id: int64 (H, W) with -1 = ignore}`` of the labelled images of a split, the class count, names."""
    names, ignore, label_map = dataset_classes(cfg)
    out: dict[str, np.ndarray] = {}
    for rec in split_records(cfg, split):
        if rec.label_path is None:
            continue
        try:
            _, lab = load_sample(rec, label_map)
        except (OSError, ValueError) as exc:  # the stage that uses the image records it; here it just has no GT
            log.info("[quality] no ground truth for %s: %s", rec.image_path, exc)
            continue
        if lab is None:
            continue
        lab = np.array(lab, dtype=np.int64)
        lab[(lab == ignore) | (lab < 0) | (lab >= len(names))] = -1
        out[rec.image_id] = lab
    return out, len(names), tuple(names)


def _resize_nearest(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    x = torch.from_numpy(label)[None, None].float()
    return F.interpolate(x, size=tuple(int(s) for s in size), mode="nearest")[0, 0].long().numpy()


# -- stage 2: concepts ---------------------------------------------------------------------------------------------
def concept_quality(run_dir: Path, cfg: Any, gt: dict[str, np.ndarray] | None = None,
                    n_classes: int | None = None) -> dict[str, Any]:
    """Purity and NMI of the training crops' concept assignments against their majority GT class."""
    if gt is None or n_classes is None:
        gt, n_classes, _ = _labels(cfg, cfg.data.train_split)
    bank = ConceptBank.load(RunLayout(run_dir).concepts)
    size = tuple(cfg.crops.input_size)
    classes, clusters = [], []
    for pool in bank.k_per_pool:
        meta, cls = read_features(RunLayout(run_dir).features, columns=["image_id", "box"], pools=[pool])
        if len(cls) == 0:
            continue
        sl = bank.pool_slice(pool)
        labels, _ = assign(cls, bank.centroids[sl], use_gpu=False)
        ids = np.asarray(meta["image_id"].to_pylist(), dtype=object)
        boxes = np.asarray(meta["box"].to_pylist(), dtype=np.int64)
        maj = np.full(len(ids), -1, dtype=np.int64)
        for image_id in np.unique(ids):
            if image_id not in gt:
                continue
            rows = np.nonzero(ids == image_id)[0]
            maj[rows] = box_majority(_resize_nearest(gt[image_id], size), boxes[rows], n_classes)
        classes.append(maj)
        clusters.append(labels + sl.start)
    if not classes:
        return {"skipped": "no crops"}
    y, k = np.concatenate(classes), np.concatenate(clusters)
    n = int((y >= 0).sum())
    if n == 0:
        return {"skipped": "no crop of a labelled image"}
    lab = y >= 0  # each concept is named by the majority class of its crops (the anchored pseudo-label score)
    counts = np.bincount(y[lab] * bank.num_concepts + k[lab], minlength=n_classes * bank.num_concepts)
    counts = counts.reshape(n_classes, bank.num_concepts)
    named = counts.sum(axis=0) > 0
    concept_class = np.where(named, counts.argmax(axis=0), -1)
    return {"purity": purity(y, k), "balanced_purity": balanced_purity(y, k), "nmi": nmi(y, k), "n_crops": n,
            "k": bank.num_concepts,
            "concept_class": [int(c) for c in concept_class]}


# -- stage 3: pseudo labels ----------------------------------------------------------------------------------------
def label_decisions(maps: Any, variant: str, t_bg: float = 0.1, size: Sequence[int] | None = None) -> torch.Tensor:
    """The label bank's per-position decision for one image's ``(K, h, w)`` maps: ``(h, w)`` int64 channel ids.

    The decision is taken on the stored token grid (the argmax the label bank keeps) and then, with ``size``,
    repeated to that resolution with nearest-neighbour upsampling. In the "things" variant channel 0 is the
    background of eq. 8 and concept k becomes channel k + 1, as the decoder is trained. ``maps`` may be an array or
    a label-bank record with a ``dense()`` method.
    """
    if hasattr(maps, "dense"):
        maps = maps.dense()
    m = torch.as_tensor(np.asarray(maps, dtype=np.float32))[None]
    if variant == "things":
        p = engine_targets.minmax_normalise(m)
        m = torch.cat([F.relu(t_bg - p.max(dim=1).values).unsqueeze(1), p], dim=1)
    dec = m[0].argmax(dim=0)
    if size is not None and tuple(dec.shape) != tuple(size):
        dec = F.interpolate(dec[None, None].float(), size=tuple(int(s) for s in size), mode="nearest")[0, 0].long()
    return dec


def anchored_scores(conf: np.ndarray, mapping: Sequence[int]) -> dict[str, float]:
    """mIoU / pixel accuracy of a ``(C, channels)`` confusion with a *given* channel -> class mapping (-1 = none).

    Many-to-one: every channel counts for its class; IoU as :func:`transfgu.metrics.segmentation_scores` (nanmean
    over the classes present in GT or prediction), pixels of unmapped channels are errors.
    """
    conf = np.asarray(conf, dtype=np.int64)
    m = matched_confusion(conf, np.asarray(mapping, dtype=np.int64))
    tp = np.diag(m).astype(np.float64)
    denom = conf.sum(axis=1) + m.sum(axis=0) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)
    total = conf.sum()
    return {"mIoU": float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else float("nan"),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan")}


def pseudo_label_quality(run_dir: Path, cfg: Any, gt: dict[str, np.ndarray] | None = None,
                         n_classes: int | None = None, names: Sequence[str] | None = None,
                         concept_class: Sequence[int] | None = None) -> dict[str, Any]:
    """mIoU and pixel accuracy of the label bank's decisions on the training images (one Hungarian over the split).

    Decisions are compared at ``pseudo.input_size`` (decisions and labels resized with nearest).

    With ``concept_class`` (each concept's majority crop class, :func:`concept_quality`) it also reports
    ``anchored_mIoU`` / ``anchored_pixel_accuracy``: every channel is named by *its own concept's* crops instead of
    by a matching to the labels (the "things" background channel, which has no crops, by its pixel majority). The
    Hungarian score cannot tell a label bank that puts concept k where k's crops are from one that consistently
    puts it elsewhere (it relabels both); the anchored score can, so it checks that eq. 5-7 localise each concept
    where the concept is.
    """
    if gt is None or n_classes is None:
        gt, n_classes, names = _labels(cfg, cfg.data.train_split)
    ids = sorted(gt)
    if not ids:
        return {"skipped": "no labelled training image"}
    bank = read_label_bank(RunLayout(run_dir).label_bank)
    ids = [i for i in ids if i in bank]
    if not ids:
        return {"skipped": "no labelled image in the label bank"}
    size = tuple(cfg.pseudo.input_size)
    running = RunningConfusion(n_classes, n_output_channels(cfg), ignore_index=-1)
    for image_id in ids:
        dec = label_decisions(bank[image_id], cfg.train.variant, cfg.train.t_bg, size)
        running.update(torch.from_numpy(_resize_nearest(gt[image_id], size)), dec)
    s = running.scores(class_names=names, overcluster=cfg.eval.overcluster)
    out = {"mIoU": s["mIoU"], "pixel_accuracy": s["pixel_accuracy"], "n_images": len(ids),
           "per_class_iou": s["per_class_iou"]}
    mapping = _anchored_mapping(running.conf, concept_class, cfg.train.variant)
    if mapping is not None:
        a = anchored_scores(running.conf, mapping)
        out["anchored_mIoU"], out["anchored_pixel_accuracy"] = a["mIoU"], a["pixel_accuracy"]
    return out


def _anchored_mapping(conf: np.ndarray, concept_class: Sequence[int] | None, variant: str) -> list[int] | None:
    """Channel -> class from the concepts' own crops; the "things" background channel (no crops) by pixel majority."""
    if concept_class is None:
        return None
    mapping = [int(c) for c in concept_class]
    if variant == "things":  # channel 0 is the background of eq. 8
        col = conf[:, 0]
        mapping = [int(col.argmax()) if col.sum() else -1] + mapping
    return mapping if len(mapping) == conf.shape[1] else None


# -- stage 4: bootstrapping rounds ---------------------------------------------------------------------------------
def round_quality(
    train_dir: Path,
    make_decoder: Callable[[], torch.nn.Module],
    score: Callable[[torch.nn.Module], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Validation mIoU of the student (and the teacher, once there is one) at the end of every round.

    ``make_decoder()`` builds an empty decoder of the run's shape; ``score(decoder)`` evaluates it on the labelled
    validation split (the evaluate stage's protocol). A round's directory holds its last epoch's state.
    """
    rounds = sorted(p for p in Path(train_dir).glob("round_*") if (p / "state.json").is_file())
    out = []
    for d in rounds:
        groups, info = load_train_state(d)
        row: dict[str, Any] = {"round": int(info.get("round", int(d.name.split("_")[-1]))),
                               "epoch": int(info["epoch"])}
        for who in ("student", "teacher"):
            if who == "teacher" and not info.get("has_teacher"):
                row["teacher_mIoU"] = None
                continue
            dec = make_decoder()
            dec.load_state_dict(groups[who])
            dec.eval()
            s = score(dec)
            row[f"{who}_mIoU"] = float(s["mIoU"])
            row[f"{who}_pixel_accuracy"] = float(s["pixel_accuracy"])
        out.append(row)
    return out


# -- stage 4a: the bootstrapped targets (eq. 12) ------------------------------------------------------------------
@torch.no_grad()
def target_quality(
    run_dir: Path,
    cfg: Any,
    backbone: torch.nn.Module,
    make_decoder: Callable[[], torch.nn.Module],
    device: torch.device | str = "cpu",
    gt: dict[str, np.ndarray] | None = None,
    n_classes: int | None = None,
    names: Sequence[str] | None = None,
    concept_class: Sequence[int] | None = None,
    max_images: int = 256,
) -> list[dict[str, Any]]:
    """Quality of the targets each bootstrapped round trains on: eq. 12 with the round's teacher, training images.

    For every round with a teacher, each labelled training image (whole view at ``train.train_size``, no augmentation)
    goes through the frozen backbone and the teacher; :func:`~transfgu.engine.targets.make_targets` mixes the teacher's
    softmax into the image's pseudo labels exactly as a training step does, and the hard targets are scored like the
    pseudo labels (:func:`pseudo_label_quality`: Hungarian, and anchored when ``concept_class`` is given) at
    ``pseudo.input_size``. Set beside the pseudo-label scores, it says what the teacher adds to what the student learns
    from; a round whose targets are no better than the raw pseudo labels has gained nothing from bootstrapping.

    ``student_teacher_agreement`` is the share of token positions (same images) where the round's student and its
    teacher take the same channel. The student restarts from its initial weights every round (eq. 10-11), so what
    it shares with its teacher beyond what the pseudo labels teach both comes through the teacher's half of eq. 12;
    ``pseudo_teacher_agreement`` (the raw pseudo-label decision vs the teacher) is the reference.

    It costs a backbone pass per image and round, so at most ``max_images`` labelled training images (the first in
    split order) are used; the count is reported as ``n_images``.
    """
    if gt is None or n_classes is None:
        gt, n_classes, names = _labels(cfg, cfg.data.train_split)
    rounds = sorted(p for p in RunLayout(run_dir).train.glob("round_*") if (p / "state.json").is_file())
    bank = read_label_bank(RunLayout(run_dir).label_bank)
    records = [r for r in split_records(cfg, cfg.data.train_split) if r.image_id in gt and r.image_id in bank]
    records = records[:max_images]
    size, variant = tuple(cfg.pseudo.input_size), cfg.train.variant
    out = []
    for d in rounds:
        groups, info = load_train_state(d)
        if not info.get("has_teacher"):
            continue
        teacher, student = make_decoder(), make_decoder()
        teacher.load_state_dict(groups["teacher"])
        student.load_state_dict(groups["student"])
        teacher.eval()
        student.eval()
        running = RunningConfusion(n_classes, n_output_channels(cfg), ignore_index=-1)
        agree = agree_pseudo = positions = 0
        for rec in records:
            x = to_uint8_chw(load_rgb(rec.image_path), tuple(cfg.train.train_size))[None].to(device)
            feats = backbone(normalize(x))
            logits = teacher(feats.patch, feats.grid)[0].float()
            t_dec = logits.argmax(dim=1)
            agree += int((student(feats.patch, feats.grid)[0].argmax(dim=1) == t_dec).sum())
            positions += t_dec.numel()
            m = bank[rec.image_id]
            pseudo = torch.as_tensor(np.asarray(m.dense() if hasattr(m, "dense") else m, np.float32))[None]
            pseudo = pseudo.to(device)
            if pseudo.shape[-2:] != logits.shape[-2:]:
                pseudo = F.interpolate(pseudo, size=logits.shape[-2:], mode="bilinear", align_corners=False)
            perm = torch.arange(logits.shape[1])  # the permutation only names the negative labels
            t = engine_targets.make_targets(pseudo, logits, variant, t_bg=cfg.train.t_bg, mix=cfg.train.teacher_mix,
                                    perm=perm)
            raw = engine_targets.make_targets(pseudo, None, variant, t_bg=cfg.train.t_bg, perm=perm).hard
            agree_pseudo += int((raw == t_dec).sum())
            dec = F.interpolate(t.hard[:, None].float().cpu(), size=size, mode="nearest")[0, 0].long()
            running.update(torch.from_numpy(_resize_nearest(gt[rec.image_id], size)), dec)
        s = running.scores(class_names=names, overcluster=cfg.eval.overcluster)
        row: dict[str, Any] = {"round": int(info.get("round", int(d.name.split("_")[-1]))), "mIoU": s["mIoU"],
                               "pixel_accuracy": s["pixel_accuracy"], "n_images": len(records),
                               "student_teacher_agreement": agree / max(positions, 1),
                               "pseudo_teacher_agreement": agree_pseudo / max(positions, 1)}
        mapping = _anchored_mapping(running.conf, concept_class, variant)
        if mapping is not None:
            a = anchored_scores(running.conf, mapping)
            row["anchored_mIoU"], row["anchored_pixel_accuracy"] = a["mIoU"], a["pixel_accuracy"]
        out.append(row)
    return out


# -- all stages ----------------------------------------------------------------------------------------------------
def stage_quality(
    run_dir: Path,
    cfg: Any,
    make_decoder: Callable[[], torch.nn.Module] | None = None,
    score: Callable[[torch.nn.Module], dict[str, Any]] | None = None,
    backbone: torch.nn.Module | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The ``stages`` entry of ``eval/metrics.json``: concepts, pseudo labels and rounds, each where it can be
    measured (a stage without ground truth or output gets ``{"skipped": reason}``; a failure never loses the run's
    final metrics, it is recorded as ``{"error": ...}``)."""
    run_dir = Path(run_dir)
    out: dict[str, Any] = {}
    try:
        gt, n_classes, names = _labels(cfg, cfg.data.train_split)
    except Exception as exc:  # e.g. a data set without training labels
        gt, n_classes, names = {}, 0, ()
        log.warning("[quality] no training ground truth: %s", exc)
    jobs: list[tuple[str, Callable[[], Any]]] = [
        ("concepts", lambda: concept_quality(run_dir, cfg, gt, n_classes) if gt else {"skipped": "no labels"}),
        ("pseudo_labels",
         lambda: pseudo_label_quality(run_dir, cfg, gt, n_classes, names,
                                      (out.get("concepts") or {}).get("concept_class")) if gt
         else {"skipped": "no labels"}),
    ]
    if make_decoder is not None and score is not None:
        jobs.append(("rounds", lambda: round_quality(RunLayout(run_dir).train, make_decoder, score)))
    if make_decoder is not None and backbone is not None and gt:
        jobs.append(("targets", lambda: target_quality(
            run_dir, cfg, backbone, make_decoder, device, gt, n_classes, names,
            (out.get("concepts") or {}).get("concept_class"))))
    for name, job in jobs:
        try:
            out[name] = job()
        except Exception as exc:  # a quality measurement must never cost the finished evaluation
            log.exception("[quality] %s could not be measured", name)
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return out


def funnel_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(stage, measure, value)`` rows of the funnel concepts -> pseudo labels -> round 1 ... -> final."""
    st = metrics.get("stages") or {}
    rows: list[tuple[str, str, str]] = []

    def pct(v: Any) -> str:
        return f"{100 * float(v):.2f} %" if isinstance(v, (int, float)) else "n/a"

    def note(d: Any) -> str | None:
        if isinstance(d, dict) and ("skipped" in d or "error" in d):
            return str(d.get("skipped") or d.get("error"))
        return None

    c = st.get("concepts")
    if c is not None:
        if note(c):
            rows.append(("concepts", "skipped", note(c) or ""))
        else:
            nmi_v = float(c.get("nmi", float("nan")))
            rows.append(("concepts", "crop purity / class-balanced purity / NMI vs majority GT class",
                         f"{pct(c.get('purity'))} / {pct(c.get('balanced_purity'))} / {nmi_v:.3f} "
                         f"({c.get('n_crops')} crops)"))
    p = st.get("pseudo_labels")
    if p is not None:
        if note(p):
            rows.append(("pseudo labels", "skipped", note(p) or ""))
        else:
            rows.append(("pseudo labels", "train mIoU / pixel acc.",
                         f"{pct(p.get('mIoU'))} / {pct(p.get('pixel_accuracy'))} ({p.get('n_images')} images)"))
            if p.get("anchored_mIoU") is not None:
                rows.append(("pseudo labels", "train mIoU, channels named by their concepts' crops",
                             f"{pct(p.get('anchored_mIoU'))} / {pct(p.get('anchored_pixel_accuracy'))}"))
    r = st.get("rounds")
    tg = {int(t["round"]): t for t in st.get("targets") or [] if isinstance(t, dict) and "round" in t}
    if isinstance(r, list):
        for row in r:
            t = tg.get(int(row["round"]))
            if t is not None:
                rows.append((f"round {row['round']} targets (eq. 12)",
                             "train mIoU / anchored mIoU / student-teacher agreement",
                             f"{pct(t.get('mIoU'))} / {pct(t.get('anchored_mIoU'))} / "
                             f"{pct(t.get('student_teacher_agreement'))} (pseudo labels vs teacher: "
                             f"{pct(t.get('pseudo_teacher_agreement'))})"))
            t = row.get("teacher_mIoU")
            teacher = f"teacher {pct(t)}, " if t is not None else ""
            rows.append((f"round {row['round']}", "val mIoU",
                         f"{teacher}student {pct(row.get('student_mIoU'))} (epoch {row['epoch'] + 1})"))
    elif note(r):
        rows.append(("rounds", "skipped", note(r) or ""))
    if metrics.get("mIoU") is not None:
        rows.append(("final", "val mIoU / pixel acc.",
                     f"{pct(metrics['mIoU'])} / {pct(metrics.get('pixel_accuracy'))}"))
    return rows


def mlflow_metrics(metrics: dict[str, Any]) -> tuple[dict[str, float], list[tuple[int, dict[str, float]]]]:
    """MLflow metrics of the funnel: ``({name: value}, [(round, {name: value}), ...])`` for step-wise logging."""
    st = metrics.get("stages") or {}
    flat: dict[str, float] = {}
    stages = (("concepts", ("purity", "balanced_purity", "nmi")),
              ("pseudo_labels", ("mIoU", "pixel_accuracy", "anchored_mIoU")))
    for stage, keys in stages:
        d = st.get(stage)
        if isinstance(d, dict):
            for k in keys:
                if isinstance(d.get(k), (int, float)):
                    flat[f"quality/{stage}_{k}"] = float(d[k])
    steps = []
    for row in st.get("rounds") or [] if isinstance(st.get("rounds"), list) else []:
        vals = {f"quality/{w}_mIoU": float(row[f"{w}_mIoU"]) for w in ("student", "teacher")
                if isinstance(row.get(f"{w}_mIoU"), (int, float))}
        steps.append((int(row["round"]), vals))
    for row in st.get("targets") or [] if isinstance(st.get("targets"), list) else []:
        vals = {f"quality/targets_{k}": float(row[k]) for k in ("mIoU", "anchored_mIoU", "student_teacher_agreement")
                if isinstance(row.get(k), (int, float))}
        steps.append((int(row["round"]), vals))
    return flat, steps
