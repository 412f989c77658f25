"""What every prediction checkpoint's ``model.json`` says, read the same way by each method's predictor.

Kept free of torch so that a CBFE + CD predictor (:mod:`transfgu.leopart.model`) can use it inside shard actors.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
