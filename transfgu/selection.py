"""Per-epoch validation history and the choice of the final model (``train.select``), issue 12 item 3.

The paper's Table 1 reports, for every data set, the epoch with the highest **mIoU + pixel accuracy on the
validation set** (the authors' code; docs/fidelity.md row 13): validation labels are used to pick the model. The
default here is ``train.select=last`` (the final epoch, no label peeking). ``train.select=best_val`` reproduces the
paper's protocol: the decoder is scored on the labelled validation split after every epoch, the best one is kept in
``train/best/`` and becomes the run's model, and every output it produces (``model/model.json``,
``eval/metrics.json``, the manifest, MLflow, the report) carries :data:`SELECTION_WARNING`.

``train.validate_every=N`` records the validation history every N epochs without changing which model is kept.
The history is ``train/val_history.jsonl``: one JSON line per validated epoch with ``epoch``, ``round``, ``mIoU``,
``pixel_accuracy`` and ``score`` (their sum, the reference's criterion).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from transfgu.config import Config, n_output_channels
from transfgu.data.loaders import EvalDataset, dataset_classes, split_records
from transfgu.engine.loop import evaluate
from transfgu.evaluate_stage import has_labelled_val
from transfgu.layout import VAL_HISTORY
from transfgu.store.atomic import atomic_write_json, atomic_write_text, fix_mode

log = logging.getLogger(__name__)

BEST_DIR = "best"
SELECTION_WARNING = (
    "MODEL SELECTED ON VALIDATION LABELS: train.select=best_val kept the epoch with the highest validation "
    "mIoU + pixel accuracy (the paper's protocol); validation scores of this model are optimistic"
)


def validation_wanted(cfg: Config) -> bool:
    """Whether training scores the decoder on the validation split at all."""

    wanted = cfg.train.select == "best_val" or cfg.train.validate_every > 0
    if cfg.train.select == "best_val" and not has_labelled_val(cfg):
        raise ValueError("train.select=best_val needs a labelled validation split (data.val_split)")
    return wanted and has_labelled_val(cfg)


def validation_due(cfg: Config, epoch: int) -> bool:
    """``best_val`` validates every epoch (as the reference); ``validate_every=N`` every N-th and the last one."""
    if cfg.train.select == "best_val":
        return True
    n = cfg.train.validate_every
    return n > 0 and ((epoch + 1) % n == 0 or epoch + 1 == cfg.train.epochs)


class Validator:
    """Scores a decoder on the validation split; the images are decoded once, when the validator is built."""

    def __init__(self, cfg: Config, backbone: torch.nn.Module, device: torch.device, amp: torch.dtype | None) -> None:
        self.cfg, self.backbone, self.device, self.amp = cfg, backbone, device, amp
        names, ignore, label_map = dataset_classes(cfg)
        self.names = names
        records = split_records(cfg, cfg.data.val_split)
        self.ds = EvalDataset(records, label_map, tuple(cfg.eval.eval_size), ignore, stage="validate")

    def __call__(self, decoder: torch.nn.Module) -> dict[str, float]:
        loader = torch.utils.data.DataLoader(self.ds, batch_size=self.cfg.eval.batch_size, shuffle=False)
        # A DataLoader iterator draws its base seed from the global generator: restore it, so that validating
        # does not change the training run's later random draws.
        rng = torch.get_rng_state()
        try:
            scores = self._evaluate(decoder, loader)
        finally:
            torch.set_rng_state(rng)
        return {"mIoU": float(scores["mIoU"]), "pixel_accuracy": float(scores["pixel_accuracy"])}

    def _evaluate(self, decoder: torch.nn.Module, loader: torch.utils.data.DataLoader) -> dict[str, Any]:
        return evaluate(
            decoder, self.backbone, loader, n_clusters=n_output_channels(self.cfg), n_classes=len(self.names),
            device=self.device, eval_hw=tuple(self.cfg.eval.eval_size), ignore_index=-1, class_names=self.names,
            overcluster=self.cfg.eval.overcluster, amp_dtype=self.amp,
        )


class ValHistory:
    """``train/val_history.jsonl`` and, for ``best_val``, the best decoder in ``train/best/``."""

    def __init__(self, train_dir: Path, keep_best: bool) -> None:
        self.train_dir = Path(train_dir)
        self.keep_best = keep_best
        self.path = self.train_dir / VAL_HISTORY

    def entries(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def _write(self, entries: list[dict[str, Any]]) -> None:
        atomic_write_text(self.path, "".join(json.dumps(e) + "\n" for e in entries))

    def truncate_after(self, epoch: int) -> None:
        """Drop entries of epochs > ``epoch`` (a resumed run trains them again)."""
        entries = self.entries()
        kept = [e for e in entries if e["epoch"] <= epoch]
        if len(kept) != len(entries):
            self._write(kept)

    def best(self) -> dict[str, Any] | None:
        path = self.train_dir / BEST_DIR / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def record(self, epoch: int, round_idx: int, scores: dict[str, float], student: torch.nn.Module) -> dict[str, Any]:
        """Append one epoch's scores; with ``keep_best``, save the student when its score beats the best so far
        (ties keep the earlier epoch, as the reference's strict ``>``)."""
        entry = {"epoch": int(epoch), "round": int(round_idx), "mIoU": float(scores["mIoU"]),
                 "pixel_accuracy": float(scores["pixel_accuracy"])}
        entry["score"] = entry["mIoU"] + entry["pixel_accuracy"]
        self._write([e for e in self.entries() if e["epoch"] != epoch] + [entry])
        if self.keep_best:
            best = self.best()
            # best["epoch"] >= epoch: that epoch is being trained again after a resume; its old record is stale.
            if best is None or entry["score"] > best["score"] or best["epoch"] >= epoch:
                from safetensors.torch import save_file

                d = self.train_dir / BEST_DIR
                d.mkdir(parents=True, exist_ok=True)
                sd = {k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()}
                tmp = d / ".decoder.safetensors.tmp"
                save_file(sd, str(tmp))
                fix_mode(tmp)  # safetensors writes 0600; the umask decides
                tmp.replace(d / "decoder.safetensors")
                atomic_write_json(d / "best.json", {**entry, "selection": "best_val", "warning": SELECTION_WARNING})
                log.warning("[train] epoch %d is the best on validation so far (mIoU %.4f + acc %.4f)",
                            epoch, entry["mIoU"], entry["pixel_accuracy"])
        return entry


def validate_epoch(
    cfg: Config, history: ValHistory, validate: Callable[[torch.nn.Module], dict[str, float]],
    student: torch.nn.Module, epoch: int, round_idx: int,
) -> dict[str, float]:
    """Score the student after ``epoch`` when due; returns ``{"val_mIoU", "val_pixel_accuracy"}`` (or ``{}``)."""
    if not validation_due(cfg, epoch):
        return {}
    was = student.training
    entry = history.record(epoch, round_idx, validate(student), student)
    student.train(was)
    log.info("[train] round %d epoch %d val mIoU %.4f acc %.4f", round_idx, epoch + 1, entry["mIoU"],
             entry["pixel_accuracy"])
    return {"val_mIoU": entry["mIoU"], "val_pixel_accuracy": entry["pixel_accuracy"]}


def select_student(cfg: Config, train_dir: Path, student: torch.nn.Module) -> dict[str, Any]:
    """Apply ``train.select`` to the trained ``student`` in place; returns the selection record for the outputs."""
    if cfg.train.select != "best_val":
        return {"selection": "last"}
    best = ValHistory(train_dir, keep_best=True).best()
    if best is None:
        raise RuntimeError(f"train.select=best_val but no validated epoch under {train_dir / BEST_DIR}")
    from safetensors.torch import load_file

    student.load_state_dict(load_file(str(Path(train_dir) / BEST_DIR / "decoder.safetensors")))
    log.warning("[train] %s: epoch %d (mIoU %.4f, acc %.4f)", SELECTION_WARNING, best["epoch"] + 1, best["mIoU"],
                best["pixel_accuracy"])
    return {"selection": "best_val", "selected_epoch": int(best["epoch"]), "selected_round": int(best["round"]),
            "selection_warning": SELECTION_WARNING}
