"""Stage 1 on Ray: crops + CLS features with a Ray Data actor pool (issue 4 item 1).

``compute=ActorPoolStrategy(min_size, max_size)`` lets the pool grow as an autoscaler adds nodes; each actor holds
one GPU when the cluster has GPUs (integer batch size, as Ray requires for GPU UDFs), else an explicit CPU share.
The features Parquet is the one of DESIGN.md §3 (``store.features_table``), shard for shard the same files the
one-process pipeline writes.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from transfgu import stages
from transfgu.distributed.shards import ShardActor, run_sharded_stage

log = logging.getLogger(__name__)


class FeatureExtractor(ShardActor):
    """Actor of the extract pool: ``__call__`` runs :func:`transfgu.stages.extract_features` on one shard."""

    stage = "extract"

    def compute(self, images: list[np.ndarray], image_ids: list[str]) -> pa.Table:
        return stages.extract_features(
            self.backbone, images, image_ids, self.cfg.data.train_split, self.cfg.crops, self.device, self.amp
        )

    def rows_per_image(self, table: pa.Table, image_ids: list[str]) -> dict[str, int]:
        if table.num_rows == 0:
            return {}
        counts = pc.value_counts(table["image_id"]).to_pylist()
        return {c["values"]: int(c["counts"]) for c in counts}


def run_extract_ray(ctx: Any) -> dict[str, Any]:
    """Drop-in for :func:`transfgu.pipeline.run_extract` (same outputs, same manifest info)."""
    from transfgu.pipeline import Progress

    cfg = ctx.cfg
    records = stages.split_records(cfg, cfg.data.train_split, subset=False)
    prog = Progress("extract", len(records))
    out_dir = ctx.run_dir / "features"
    res = run_sharded_stage(ctx, "extract", out_dir, FeatureExtractor, records, progress=prog.update)
    n_err = ctx.errors.count("extract")
    stages.check_error_budget(n_err, len(records), cfg.run.error_budget, "extract")
    rows = _total_rows(out_dir)
    if rows == 0:
        raise RuntimeError("extract: no crops were produced (no readable images, or no window passed the fg/bg test)")
    return {"rows": rows, "images": len(records) - n_err, "errors": n_err, "new_images": res["images"]}


def _total_rows(out_dir) -> int:
    import pyarrow.parquet as pq

    from transfgu.store import list_parquet_files

    return int(sum(pq.ParquetFile(p).metadata.num_rows for p in list_parquet_files(out_dir)))
