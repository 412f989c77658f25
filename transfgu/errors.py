"""Inputs that cannot be used: recorded, counted against ``run.error_budget``, never a crash that loses work.

Every stage that reads images decodes them through :func:`decode_images`, which records an unreadable file in the
run's ``errors.jsonl`` (:class:`ErrorLog`) and goes on; at the end of the stage :func:`check_error_budget` fails the
stage when more than ``run.error_budget`` of its inputs were lost (docs/reliability.md).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from transfgu.data.datasets import DatasetError, ImageRecord
from transfgu.data.io import DecodeError, load_rgb
from transfgu.data.labelmaps import LabelMapError

log = logging.getLogger(__name__)


class ErrorBudgetExceeded(RuntimeError):
    """More inputs failed than ``run.error_budget`` allows."""


class ErrorLog:
    """Append-only ``<run>/errors.jsonl``: one JSON line (file, stage, reason) per input that could not be used.

    ``path=None`` keeps nothing on disk (a worker that reports its failures back to the driver).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, file: str, stage: str, reason: str) -> None:
        log.warning("skipping %s in stage %s: %s", file, stage, reason)
        if self.path is None:
            return
        line = json.dumps({"file": str(file), "stage": stage, "reason": reason, "time": time.time()})
        with self._lock, open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def entries(self, stage: str | None = None) -> list[dict]:
        if self.path is None or not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [r for r in rows if stage is None or r["stage"] == stage]

    def count(self, stage: str | None = None) -> int:
        return len({(r["file"], r["stage"]) for r in self.entries(stage)})


class CollectedErrors(ErrorLog):
    """An :class:`ErrorLog` that keeps failures in memory (``failed``: file -> reason) for the driver to record."""

    def __init__(self) -> None:
        super().__init__(None)
        self.failed: dict[str, str] = {}

    def record(self, file: str, stage: str, reason: str) -> None:
        super().record(file, stage, reason)
        self.failed[str(file)] = reason


def check_error_budget(n_failed: int, n_total: int, budget: float, stage: str) -> None:
    """Fail ``stage`` when more than ``budget`` (a fraction) of its ``n_total`` inputs failed."""
    if n_total and n_failed / n_total > budget:
        raise ErrorBudgetExceeded(
            f"stage {stage}: {n_failed} of {n_total} inputs failed ({n_failed / n_total:.1%}), more than "
            f"run.error_budget={budget:.1%}; see errors.jsonl, fix or remove those files, or raise the budget"
        )


def decode_images(
    records: Sequence[ImageRecord], errors: ErrorLog, stage: str
) -> Iterator[tuple[ImageRecord, np.ndarray]]:
    """Decode images one by one, recording (not raising) the ones that cannot be read."""
    for rec in records:
        try:
            yield rec, load_rgb(rec.image_path)
        except (OSError, ValueError) as exc:
            errors.record(str(rec.image_path), stage, str(exc))


def failed_file(rec: ImageRecord, exc: BaseException) -> Path:
    """The file to blame in errors.jsonl: the undecodable one, else the label (size, ids, missing), else the image."""
    if isinstance(exc, DecodeError):
        return exc.path
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return Path(exc.filename)
    if rec.label_path is not None and isinstance(exc, (LabelMapError, DatasetError)):
        return rec.label_path
    return rec.image_path
