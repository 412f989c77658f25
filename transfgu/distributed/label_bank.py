"""Stage 3 on Ray: the pseudo-label bank with a Ray Data actor pool (issue 4 item 3).

Each actor holds the backbone and the concept vectors and runs :func:`transfgu.stages.build_label_maps` (eq. 5-8) on
one shard of training images, writing ``label_bank/part-<shard>.parquet`` (DESIGN.md §3) itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from transfgu import stages
from transfgu.concepts import ConceptBank
from transfgu.distributed.shards import ShardActor, run_sharded_stage


class LabelBankBuilder(ShardActor):
    """Actor of the label-bank pool: one row of ``K x h x w`` lossless maps per decodable image."""

    stage = "label_bank"

    def __init__(self, centroids: list[list[float]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.centroids = np.asarray(centroids, dtype=np.float32)

    def compute(self, images: list[np.ndarray], image_ids: list[str]) -> pa.Table:
        maps = stages.build_label_maps(self.backbone, images, self.centroids, self.cfg.pseudo, self.device)
        return stages.label_bank_rows(image_ids, maps)

    def rows_per_image(self, table: pa.Table, image_ids: list[str]) -> dict[str, int]:
        return {i: 1 for i in table["image_id"].to_pylist()}


def run_label_bank_ray(ctx: Any) -> dict[str, Any]:
    """Drop-in for :func:`transfgu.pipeline.run_label_bank`."""
    from transfgu.pipeline import Progress

    cfg = ctx.cfg
    bank = ConceptBank.load(ctx.run_dir / "concepts")
    records = stages.split_records(cfg, cfg.data.train_split, subset=False)
    prog = Progress("label_bank", len(records))
    out_dir = ctx.run_dir / "label_bank"
    run_sharded_stage(
        ctx, "label_bank", out_dir, LabelBankBuilder, records,
        extra_kwargs={"centroids": bank.centroids.tolist()}, progress=prog.update,
    )
    n_err = ctx.errors.count("label_bank")
    stages.check_error_budget(n_err, len(records), cfg.run.error_budget, "label_bank")
    from transfgu.distributed.extract import _total_rows

    return {"rows": _total_rows(out_dir), "errors": n_err}
