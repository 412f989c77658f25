"""What every prediction checkpoint's ``model.json`` says, read the same way by each method's predictor.

Also where a checkpoint is (:func:`find_checkpoint`) and its validated ``model.json`` (:func:`read_model_meta`).
Kept free of torch so that a CBFE + CD predictor (:mod:`transfgu.leopart.model`) can use it inside shard actors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from transfgu.layout import RunLayout
from transfgu.schemas import read_json, validate_model_meta

MODEL_JSON = "model.json"


class CheckpointMeta:
    """Read-only views of ``self.meta`` (the checkpoint's ``model.json``) shared by the predictors."""

    meta: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def cluster_to_class(self) -> np.ndarray | None:
        """Matched class id of each cluster (found at evaluation), or None before any evaluation."""
        m = self.meta.get("cluster_to_class")
        return None if m is None else np.asarray(m, dtype=np.int64)

    @property
    def pretrained(self) -> bool:
        return bool(self.meta["backbone"].get("pretrained", False))


def read_model_meta(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MODEL_JSON
    if not path.is_file():
        raise FileNotFoundError(f"no model checkpoint in {directory} (missing {MODEL_JSON})")
    return validate_model_meta(path, read_json(path))


class CheckpointError(FileNotFoundError):
    """A checkpoint directory or one of the files it needs is missing or does not match."""


def find_checkpoint(path: str | Path) -> Path:
    """The model directory for ``path``: a ``model/`` checkpoint itself, or a run directory containing one."""
    p = Path(path)
    if (p / MODEL_JSON).is_file():
        return p
    if (RunLayout(p).model / MODEL_JSON).is_file():
        return RunLayout(p).model
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p} does not exist")
    raise CheckpointError(
        f"no model checkpoint in {p}: expected {p / MODEL_JSON} or {p / 'model' / MODEL_JSON} "
        "(has the run's train stage finished?)"
    )
