"""Per-image stages on a Ray Data actor pool, written as Parquet shards (extract and label bank).

The dataset is built from the image records (index, id, path; no pixels), one block per shard of
``pipeline.SHARD_IMAGES`` images, so with ``batch_size = SHARD_IMAGES`` every UDF call sees exactly one shard,
just like the one-process pipeline (same grouping, same file names ``part-<shard>.parquet``, same numbers). The
actor decodes the images itself (undecodable files are reported back, not raised, and recorded in
``errors.jsonl`` by the driver), runs the stage function of :mod:`transfgu.stages`, writes its shard atomically
(``store.write_parquet_atomic``: plain pyarrow reads it) and returns one small summary row per input image.

Resume is by image id, as in the one-process pipeline (:mod:`transfgu.integrity`): each shard file carries the
stage's input hash and the ids it covers (decode failures included) in its key-value metadata; the driver plans
which files are kept and names every new file before the pool starts, so a re-run only sends the images no kept
file covers, and a retried batch replaces its own file.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfgu import integrity, stages
from transfgu.config import Config
from transfgu.data.datasets import ImageRecord
from transfgu.distributed.cluster import task_resources, torch_threads, worker_config
from transfgu.store import write_parquet_atomic

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("index", "image_id", "ok", "reason", "rows", "file")


class _CollectErrors(stages.ErrorLog):
    """ErrorLog semantics inside an actor: remember failures; the driver writes them to errors.jsonl."""

    def __init__(self) -> None:
        super().__init__(None)
        self.failed: dict[str, str] = {}

    def record(self, file: str, stage: str, reason: str) -> None:
        super().record(file, stage, reason)
        self.failed[str(file)] = reason


def shard_tables(records: Sequence[ImageRecord], plan: integrity.ShardPlan) -> list[pa.Table]:
    """One small Arrow table (index, image_id, path, shard, file) per new shard file of the plan."""
    return [
        pa.table({
            "index": pa.array(g.positions, pa.int64()),
            "image_id": pa.array([records[i].image_id for i in g.positions], pa.string()),
            "path": pa.array([str(Path(records[i].image_path).resolve()) for i in g.positions], pa.string()),
            "shard": pa.array([n] * len(g.positions), pa.int64()),
            "file": pa.array([g.name] * len(g.positions), pa.string()),
        })
        for n, g in enumerate(plan.groups)
    ]


class ShardActor:
    """Base of the stage actors: builds the run's backbone once, then processes one shard per call.

    Subclasses implement :meth:`compute` (decoded images -> Arrow table) and :meth:`rows_per_image`.
    """

    stage = "?"

    def __init__(self, cfg: dict[str, Any], run_dir: str, out_dir: str, shard_images: int, num_cpus: float,
                 use_gpu: bool, input_hash: str = "") -> None:
        import torch

        torch.set_num_threads(torch_threads(num_cpus))
        self.cfg = Config.model_validate(cfg)
        stages.configure_inputs(self.cfg)
        self.run_dir = Path(run_dir)
        self.out_dir = Path(out_dir)
        self.shard_images = int(shard_images)
        self.input_hash = input_hash  # the driver's stage hash (the shipped config has absolute paths)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.amp = stages.autocast_dtype(self.cfg.backbone.precision, self.device)
        # The run's backbone, built once per actor: a random one is read from the file the driver saved.
        self.backbone = stages.load_run_backbone(self.cfg.backbone, self.run_dir, self.cfg.run.seed).to(self.device)
        self.backbone.eval()

    def compute(self, images: list[np.ndarray], image_ids: list[str]) -> pa.Table:
        raise NotImplementedError

    def rows_per_image(self, table: pa.Table, image_ids: list[str]) -> dict[str, int]:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: [] for k in SUMMARY_COLUMNS}
        order = np.argsort(batch["index"], kind="stable")
        shards = batch["shard"][order]
        for s in np.unique(shards):
            sel = order[shards == s]
            indices = [int(i) for i in batch["index"][sel]]
            ids = [str(x) for x in batch["image_id"][sel]]
            paths = [str(x) for x in batch["path"][sel]]
            errors = _CollectErrors()
            recs = [ImageRecord(i, Path(p)) for i, p in zip(ids, paths)]
            decoded = list(stages.decode_images(recs, errors, self.stage))
            ok_ids = [r.image_id for r, _ in decoded]
            table = self.compute([im for _, im in decoded], ok_ids)
            table = integrity.stamp_table(table, self.input_hash, ids, [i for i in ids if i not in set(ok_ids)])
            path = self.out_dir / str(batch["file"][sel][0])
            write_parquet_atomic(table, path)
            counts = self.rows_per_image(table, ok_ids)
            for i, image_id, p in zip(indices, ids, paths):
                reason = errors.failed.get(p)
                out["index"].append(i)
                out["image_id"].append(image_id)
                out["ok"].append(reason is None)
                out["reason"].append(reason or "")
                out["rows"].append(0 if reason else counts.get(image_id, 0))
                out["file"].append(path.name)
        return {
            "index": np.asarray(out["index"], dtype=np.int64),
            "image_id": np.asarray(out["image_id"], dtype=object),
            "ok": np.asarray(out["ok"], dtype=bool),
            "reason": np.asarray(out["reason"], dtype=object),
            "rows": np.asarray(out["rows"], dtype=np.int64),
            "file": np.asarray(out["file"], dtype=object),
        }


def run_sharded_stage(
    ctx: Any,
    stage: str,
    out_dir: Path,
    actor_cls: type[ShardActor],
    records: Sequence[ImageRecord],
    extra_kwargs: dict[str, Any] | None = None,
    progress: Callable[[int, str], None] | None = None,
) -> dict[str, Any]:
    """Run ``actor_cls`` over the records that no finished shard covers; check and return the counts.

    Returns ``{"images": decodable images processed now, "errors": failures now, "rows": rows written now,
    "kept": records covered by earlier files, "summary": the per-image summary of this call}``.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    from transfgu.pipeline import SHARD_IMAGES

    cfg: Config = ctx.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    h = ctx.hashes[stage]
    plan = integrity.plan_shards(out_dir, ctx.run_dir, stage, h, [r.image_id for r in records], SHARD_IMAGES)
    todo = plan.todo
    kept = len(records) - len(todo)
    empty = {"images": 0, "errors": 0, "rows": 0, "kept": kept, "summary": {}}
    if not todo:
        return empty
    tables = shard_tables(records, plan)
    res = task_resources(cfg)
    gpu = "num_gpus" in res
    lo, hi = cfg.ray.extract_actors
    hi = max(lo, min(hi, len(tables)))
    dctx = DataContext.get_current()
    dctx.enable_progress_bars = False
    ds = ray.data.from_arrow(tables)
    ds = ds.map_batches(
        actor_cls,
        batch_size=SHARD_IMAGES,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=min(lo, hi), max_size=hi),
        fn_constructor_kwargs={
            "cfg": worker_config(cfg), "run_dir": str(ctx.run_dir.resolve()),
            "out_dir": str(out_dir.resolve()), "shard_images": SHARD_IMAGES, "num_cpus": res["num_cpus"],
            "use_gpu": gpu, "input_hash": h, **(extra_kwargs or {}),
        },
        **res,
    )
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SUMMARY_COLUMNS}
    t0 = time.time()
    n_seen = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for k in SUMMARY_COLUMNS:
            parts[k].append(batch[k])
        n_seen += len(batch["index"])
        if progress is not None:
            progress(len(batch["index"]), f"rows={int(sum(int(r.sum()) for r in parts['rows']))}")
    summary = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    log.info("[%s] %d images through the actor pool in %.1fs", stage, n_seen, time.time() - t0)
    _check_counts(stage, todo, summary, out_dir)
    for p, reason, ok in zip(
        [str(records[int(i)].image_path) for i in summary["index"]], summary["reason"], summary["ok"]
    ):
        if not ok:
            ctx.errors.record(p, stage, str(reason))
    return {
        "images": int(summary["ok"].sum()),
        "errors": int((~summary["ok"]).sum()),
        "rows": int(summary["rows"].sum()),
        "kept": kept,
        "summary": summary,
    }


def _check_counts(stage: str, todo: Sequence[int], summary: dict[str, np.ndarray], out_dir: Path) -> None:
    """Every input image comes back exactly once, and the written files hold exactly the reported rows."""
    got = Counter(int(i) for i in summary["index"])
    missing = sorted(set(todo) - set(got))
    dup = sorted(i for i, c in got.items() if c != 1)
    extra = sorted(set(got) - set(todo))
    if missing or dup or extra:
        raise RuntimeError(
            f"{stage}: row-count check failed: {len(missing)} input images missing (e.g. {missing[:5]}), "
            f"{len(dup)} duplicated (e.g. {dup[:5]}), {len(extra)} unexpected"
        )
    per_file: dict[str, Counter] = {}
    for f, image_id, n in zip(summary["file"], summary["image_id"], summary["rows"]):
        if n:
            per_file.setdefault(str(f), Counter())[str(image_id)] += int(n)
    for f, expected in per_file.items():
        ids = pq.read_table(out_dir / f, columns=["image_id"])["image_id"].to_pylist()
        if Counter(ids) != expected:
            raise RuntimeError(f"{stage}: {out_dir / f} does not hold the rows its actor reported")
