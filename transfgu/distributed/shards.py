"""Per-image stages on a Ray Data actor pool, written as Parquet shards (extract and label bank).

The dataset is built from the image records (index, id, path; no pixels), one block per shard of
``stages.SHARD_IMAGES`` images, so with ``batch_size = SHARD_IMAGES`` every UDF call sees exactly one shard,
just like the one-process executor (same grouping, same file names ``part-<shard>.parquet``, same numbers). The
actor decodes the images itself (undecodable files are reported back, not raised, and recorded in
``errors.jsonl`` by the driver), runs the stage's ``compute`` (:class:`transfgu.stages.ShardedStage`), writes its
shard atomically (``store.write_parquet_atomic``: plain pyarrow reads it) and returns one small summary row per
input image.

Resume: each shard file lists the record indices it covers in its key-value metadata (``transfgu.images``), decode
failures included, so a re-run only sends the images no finished file covers. One-process shard files (no such
metadata) cover their whole shard.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.data.datasets import ImageRecord
from transfgu.distributed.cluster import configure_data_context, task_resources, torch_threads, worker_config
from transfgu.errors import CollectedErrors, decode_images
from transfgu.layout import RunLayout, shard_file
from transfgu.logs import Progress, setup_logging
from transfgu.runtime import autocast_dtype, load_run_backbone
from transfgu.stages import SHARD_IMAGES, SHARDED_STAGES, ShardedStage
from transfgu.store import list_parquet_files, write_parquet_atomic

log = logging.getLogger(__name__)

META_KEY = b"transfgu.images"
_LEGACY = re.compile(r"^part-(\d{5})\.parquet$")
SUMMARY_COLUMNS = ("index", "image_id", "ok", "reason", "rows", "file")


def covered_indices(out_dir: Path, shard_images: int) -> set[int]:
    """Record indices already covered by finished shard files in ``out_dir``."""
    done: set[int] = set()
    if not out_dir.is_dir():
        return done
    for path in list_parquet_files(out_dir):
        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, ValueError) as exc:  # a torn file (ArrowInvalid): its images are computed again
            log.warning("%s is unreadable (%s); recomputing its images", path, exc)
            path.unlink()
            continue
        if META_KEY in meta:
            done.update(int(i) for i in json.loads(meta[META_KEY]))
            continue
        m = _LEGACY.match(path.name)
        if m:  # a shard written by the one-process pipeline covers all its images
            s = int(m.group(1))
            done.update(range(s * shard_images, (s + 1) * shard_images))
    return done


def shard_tables(records: Sequence[ImageRecord], todo: Sequence[int], shard_images: int) -> list[pa.Table]:
    """One small Arrow table (index, image_id, path, shard) per shard that still has work."""
    by_shard: dict[int, list[int]] = {}
    for i in sorted(todo):
        by_shard.setdefault(i // shard_images, []).append(i)
    return [
        pa.table({
            "index": pa.array(idx, pa.int64()),
            "image_id": pa.array([records[i].image_id for i in idx], pa.string()),
            "path": pa.array([str(Path(records[i].image_path).resolve()) for i in idx], pa.string()),
            "shard": pa.array([s] * len(idx), pa.int64()),
        })
        for s, idx in sorted(by_shard.items())
    ]


def shard_path(out_dir: Path, shard: int, indices: Sequence[int], shard_images: int) -> Path:
    """``part-<shard>.parquet`` for a whole shard (the one-process name), ``part-<shard>-<first>`` for a piece.

    The name is a function of the images alone, so a batch that Ray retries (its actor died after writing)
    replaces its own file atomically instead of adding a second copy of its rows.
    """
    whole = list(indices) == list(range(shard * shard_images, shard * shard_images + len(indices)))
    return shard_file(out_dir, shard, None if whole else min(indices))


class StageActor:
    """An actor of the pool: builds the run's backbone and the stage's worker state once, then one shard per call.

    ``stage`` names a :class:`transfgu.stages.ShardedStage`; its :meth:`~transfgu.stages.ShardedStage.compute` is
    the per-shard work, exactly the one the one-process executor runs.
    """

    def __init__(self, stage: str | type[ShardedStage], cfg: dict[str, Any], run_dir: str, out_dir: str,
                 shard_images: int, num_cpus: float, use_gpu: bool, inputs: dict[str, Any]) -> None:
        import torch

        setup_logging(worker=True)
        torch.set_num_threads(torch_threads(num_cpus))
        self.cfg = Config.model_validate(cfg)
        stage_cls = SHARDED_STAGES[stage] if isinstance(stage, str) else stage  # a class: not in the registry
        self.stage = stage_cls.name
        self.out_dir = Path(out_dir)
        self.shard_images = int(shard_images)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        amp = autocast_dtype(self.cfg.backbone.precision, device)
        # The run's backbone, built once per actor: a random one is read from the file the driver saved.
        backbone = load_run_backbone(self.cfg.backbone, RunLayout(Path(run_dir)), self.cfg.run.seed).to(device)
        backbone.eval()
        self.work = stage_cls(self.cfg, backbone, device, amp, **inputs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: [] for k in SUMMARY_COLUMNS}
        order = np.argsort(batch["index"], kind="stable")
        shards = batch["shard"][order]
        for s in np.unique(shards):
            sel = order[shards == s]
            indices = [int(i) for i in batch["index"][sel]]
            ids = [str(x) for x in batch["image_id"][sel]]
            paths = [str(x) for x in batch["path"][sel]]
            errors = CollectedErrors()
            recs = [ImageRecord(i, Path(p)) for i, p in zip(ids, paths)]
            decoded = list(decode_images(recs, errors, self.stage))
            ok_ids = [r.image_id for r, _ in decoded]
            table = self.work.compute([im for _, im in decoded], ok_ids)
            meta = dict(table.schema.metadata or {})
            meta[META_KEY] = json.dumps(indices).encode()
            path = shard_path(self.out_dir, int(s), indices, self.shard_images)
            write_parquet_atomic(table.replace_schema_metadata(meta), path)
            counts = self.work.rows_per_image(table)
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


def run_sharded_stage(ctx: RunContext, stage_cls: type[ShardedStage]) -> dict[str, Any]:
    """The Ray executor of a per-image stage: the records that no finished shard covers go through an actor pool;
    then the stage's own checks (:meth:`~transfgu.stages.ShardedStage.finish`).

    Returns the stage's manifest info plus ``new_images``: the images sent to the actors by this call.
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    stage = stage_cls.name
    out_dir = stage_cls.output(ctx.layout)
    records = stage_cls.records(ctx.cfg)
    cfg = ctx.cfg
    out_dir.mkdir(parents=True, exist_ok=True)
    done = covered_indices(out_dir, SHARD_IMAGES)
    todo = [i for i in range(len(records)) if i not in done]
    kept = len(records) - len(todo)
    if kept:
        log.info("[%s] %d of %d images already covered by finished shards", stage, kept, len(records))
    if not todo:
        return {**stage_cls.finish(ctx, len(records)), "new_images": 0}
    tables = shard_tables(records, todo, SHARD_IMAGES)
    res = task_resources(cfg)
    gpu = "num_gpus" in res
    lo, hi = cfg.ray.extract_actors
    hi = max(lo, min(hi, len(tables)))
    configure_data_context(DataContext.get_current())
    ds = ray.data.from_arrow(tables)
    ds = ds.map_batches(
        StageActor,
        batch_size=SHARD_IMAGES,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=min(lo, hi), max_size=hi),
        fn_constructor_kwargs={
            # a registered stage travels by name; another one (Leopart's dense stage of a split) as the class
            "stage": stage if SHARDED_STAGES.get(stage) is stage_cls else stage_cls,
            "cfg": worker_config(cfg), "run_dir": str(ctx.run_dir.resolve()),
            "out_dir": str(out_dir.resolve()), "shard_images": SHARD_IMAGES, "num_cpus": res["num_cpus"],
            "use_gpu": gpu, "inputs": stage_cls.worker_inputs(ctx.layout),
        },
        **res,
    )
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SUMMARY_COLUMNS}
    t0 = time.time()
    n_seen = 0
    with Progress(stage, len(records), bar=False) as prog:
        if kept:
            prog.update(kept, "(kept)")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in SUMMARY_COLUMNS:
                parts[k].append(batch[k])
            n_seen += len(batch["index"])
            prog.update(len(batch["index"]), f"rows={int(sum(int(r.sum()) for r in parts['rows']))}")
    summary = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    log.debug("[%s] %d images through the actor pool in %.1fs", stage, n_seen, time.time() - t0)
    _check_counts(stage, todo, summary, out_dir)
    for p, reason, ok in zip(
        [str(records[int(i)].image_path) for i in summary["index"]], summary["reason"], summary["ok"]
    ):
        if not ok:
            ctx.errors.record(p, stage, str(reason))
    return {**stage_cls.finish(ctx, len(records)), "new_images": int(summary["ok"].sum())}


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
