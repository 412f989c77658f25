"""The per-image stage: work over a list of image records, written as stamped Parquet shards.

A :class:`ShardedStage` is what both executors know how to run (:meth:`transfgu.method.Executor.run_sharded`):
the one-process loop (:func:`transfgu.local.run_sharded`) and the Ray Data actor pool
(:func:`transfgu.distributed.shards.run_sharded_stage`). Both plan the work by image id and stamp every shard
(:mod:`transfgu.integrity`), so a stage resumes file for file whichever executor started it. TransFGU's extract and
label bank and Leopart's dense stage are sharded stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from transfgu import integrity
from transfgu.config import Config
from transfgu.data.datasets import ImageRecord
from transfgu.data.loaders import split_records
from transfgu.errors import ErrorLog, check_error_budget, decode_images
from transfgu.layout import RunLayout
from transfgu.models.backbone import DinoViT

if TYPE_CHECKING:
    from transfgu.context import RunContext

#: Images per Parquet shard of the per-image stages (both executors: same grouping, same file names).
SHARD_IMAGES = 32


class ShardedStage:
    """A per-image stage over the training split, written as one Parquet shard per ``SHARD_IMAGES`` images.

    An instance is the per-worker state (config, backbone, device; built once per process or per Ray actor);
    :meth:`compute` is the per-shard work; :meth:`worker_inputs` is what the driver hands every worker (plain
    data: it travels to Ray actors); :meth:`finish` checks the stage's outputs and returns its manifest info.
    """

    name: ClassVar[str]

    def __init__(self, cfg: Config, backbone: DinoViT, device: torch.device, amp: torch.dtype | None) -> None:
        self.cfg, self.backbone, self.device, self.amp = cfg, backbone, device, amp

    @classmethod
    def output(cls, layout: RunLayout) -> Path:
        return layout.output(cls.name)

    @classmethod
    def records(cls, cfg: Config) -> list:
        """The image records the stage runs over: the training split (Leopart's dense stage: each split)."""
        return training_images(cfg)

    @classmethod
    def worker_inputs(cls, layout: RunLayout) -> dict[str, Any]:
        return {}

    def prepare(self, images: list[np.ndarray]) -> list[np.ndarray] | torch.Tensor:
        """Decoded images -> the model's input batch; runs ahead of :meth:`compute` on a prefetch thread."""
        return images

    def load(self, records: Sequence[ImageRecord], errors: ErrorLog) -> tuple[Any, list[str]]:
        """The data path of one shard: decode (undecodable images recorded in ``errors``, the run's log or a Ray
        actor's :class:`~transfgu.errors.CollectedErrors`; not raised) and
        :meth:`prepare`; returns ``(model input, ids of the decoded images)``, the arguments of :meth:`compute`.

        Both executors run it off the model's thread: the one-process executor on its prefetch thread
        (:func:`~transfgu.throughput.prefetch.overlapped`), a Ray stage actor in a concurrent call (two calls per actor,
        the model calls one at a time, :class:`transfgu.distributed.shards.StageActor`).
        """
        decoded = list(decode_images(records, errors, self.name))
        return self.prepare([im for _, im in decoded]), [r.image_id for r, _ in decoded]

    def compute(self, images: list[np.ndarray] | torch.Tensor, image_ids: list[str]) -> pa.Table:
        raise NotImplementedError

    @staticmethod
    def rows_per_image(table: pa.Table) -> dict[str, int]:
        """Rows of ``table`` by image id (the Ray executor checks every image came back with its rows)."""
        if table.num_rows == 0:
            return {}
        return {c["values"]: int(c["counts"]) for c in pc.value_counts(table["image_id"]).to_pylist()}

    @classmethod
    def check_inputs(cls, ctx: RunContext) -> None:
        """Before the stage runs: its upstream outputs belong to the current inputs (hash)."""

    @classmethod
    def finish(cls, ctx: RunContext, image_ids: Sequence[str]) -> dict[str, Any]:
        """Check the output directory covers exactly ``image_ids`` under this stage's input hash, apply the error
        budget and return the manifest info ``{"rows", "images", "errors"}``, counted from disk."""
        disk = integrity.verify_shards(cls.output(ctx.layout), cls.name, ctx.hashes[cls.name], image_ids)
        check_error_budget(disk.failed, len(image_ids), ctx.cfg.run.error_budget, cls.name)
        return {"rows": disk.rows, "images": disk.images, "errors": disk.failed}



def training_images(cfg: Config) -> list:
    """The image records of the training split (the inputs of the sharded stages): the full split, as the
    reference's crop, concept and label-bank stages; curated lists filter only training and evaluation."""
    return split_records(cfg, cfg.data.train_split, subset=False)
