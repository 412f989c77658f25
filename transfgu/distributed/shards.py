"""Per-image stages on a Ray Data actor pool, written as Parquet shards (extract and label bank).

The dataset is built from the image records (index, id, path; no pixels), one block per shard of
``stages.SHARD_IMAGES`` images, so with ``batch_size = SHARD_IMAGES`` every UDF call sees exactly one shard,
just like the one-process executor (same grouping, same file names ``part-<shard>.parquet``, same numbers). The
actor decodes the images itself (undecodable files are reported back, not raised, and recorded in
``errors.jsonl`` by the driver), runs the stage's ``compute`` (:class:`transfgu.stages.ShardedStage`), writes its
shard atomically (``store.write_parquet_atomic``: plain pyarrow reads it) and returns one small summary row per
input image.

With ``ray.decode_stage`` on (default: when the actors get GPUs) the decoding moves to Ray Data CPU tasks ahead of
the pool (:func:`load_shards`, as ``distributed/predict.py`` decodes ahead of its GPU actors): the dataset is then
one row per shard (:func:`shard_specs`), so no batching can split a shard, and the actor only computes and writes.
The pool's maximum follows the cluster (:func:`transfgu.distributed.cluster.actor_pool_bounds`).

Resume is by image id, as in the one-process executor (:mod:`transfgu.integrity`): each shard file carries the
stage's input hash and the ids it covers (decode failures included) in its key-value metadata; the driver plans
which files are kept and names every new file before the pool starts, so a re-run only sends the images no kept
file covers, and a retried batch replaces its own file.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from transfgu import integrity
from transfgu.config import Config
from transfgu.context import RunContext, run_backbone
from transfgu.data.datasets import ImageRecord
from transfgu.distributed.cluster import (
    actor_pool_bounds,
    configure_data_context,
    map_on_pool,
    run_pool_with_retries,
    task_resources,
    torch_threads,
    worker_config,
)
from transfgu.errors import CollectedErrors
from transfgu.layout import RunLayout
from transfgu.logs import Progress, setup_logging
from transfgu.runtime import autocast_dtype, configure_inputs
from transfgu.stages import SHARD_IMAGES, SHARDED_STAGES, ShardedStage
from transfgu.store.formats import write_parquet_atomic

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("index", "image_id", "ok", "reason", "rows", "file")
#: Concurrent calls per stage actor: one in the model, one decoding or writing (StageActor).
CALLS_PER_ACTOR = 2


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


def shard_specs(records: Sequence[ImageRecord], plan: integrity.ShardPlan) -> list[pa.Table]:
    """The decode stage's input: one one-row table (a block) per new shard file, its images as JSON. A shard is one
    row from here on, so however Ray Data bundles blocks into batches, no shard is split between two calls."""
    return [
        pa.table({
            "shard": pa.array([n], pa.int64()),
            "file": pa.array([g.name], pa.string()),
            "items": pa.array([json.dumps({
                "index": [int(i) for i in g.positions],
                "image_id": [records[i].image_id for i in g.positions],
                "path": [str(Path(records[i].image_path).resolve()) for i in g.positions],
            })], pa.string()),
        })
        for n, g in enumerate(plan.groups)
    ]


def load_shards(batch: dict[str, np.ndarray], stage: str | type[ShardedStage], cfg: dict[str, Any],
                inputs: dict[str, Any], num_cpus: float) -> dict[str, np.ndarray]:
    """CPU task of the decode stage: the stage's own data path (:meth:`ShardedStage.load`: decode, undecodable files
    recorded not raised, then ``prepare``) for each shard row, as in ``predict.decode_batch`` ahead of the
    prediction actors. The model input, the decoded ids and the failures travel to the actor as one Python object
    per shard in the ``decoded`` column (Ray Data carries object columns itself; the package never calls pickle).
    """
    import torch

    torch.set_num_threads(torch_threads(num_cpus))
    config = Config.model_validate(cfg)
    configure_inputs(config)
    stage_cls = SHARDED_STAGES[stage] if isinstance(stage, str) else stage
    work = stage_cls(config, None, torch.device("cpu"), None, **inputs)  # no model: load() needs none
    decoded = np.empty(len(batch["items"]), dtype=object)
    for n, items in enumerate(batch["items"]):
        spec = json.loads(str(items))
        errors = CollectedErrors()
        payload, ok_ids = work.load([ImageRecord(i, Path(p)) for i, p in zip(spec["image_id"], spec["path"])], errors)
        decoded[n] = {"payload": payload, "ok_ids": ok_ids, "failed": errors.failed}
    return {"shard": batch["shard"], "file": batch["file"], "items": batch["items"], "decoded": decoded}


class StageActor:
    """An actor of the pool: builds the run's backbone and the stage's worker state once, then one shard per call.

    ``stage`` names a :class:`transfgu.stages.ShardedStage`; its :meth:`~transfgu.stages.ShardedStage.compute` is
    the per-shard work, exactly the one the one-process executor runs.
    """

    def __init__(self, stage: str | type[ShardedStage], cfg: dict[str, Any], run_dir: str, out_dir: str,
                 shard_images: int, num_cpus: float, use_gpu: bool, inputs: dict[str, Any],
                 input_hash: str = "") -> None:
        import torch

        setup_logging(worker=True)
        torch.set_num_threads(torch_threads(num_cpus))
        self.cfg = Config.model_validate(cfg)
        configure_inputs(self.cfg)
        stage_cls = SHARDED_STAGES[stage] if isinstance(stage, str) else stage  # a class: not in the registry
        self.stage = stage_cls.name
        self.input_hash = input_hash  # the driver's stage hash (the shipped config has absolute paths)
        self.out_dir = Path(out_dir)
        self.shard_images = int(shard_images)
        device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        amp = autocast_dtype(self.cfg.backbone.precision, device)
        # The run's backbone, built once per actor as in the one-process executor (eval forward compiled on CUDA,
        # eager fallback); a random one is read from the file the driver saved.
        backbone = run_backbone(self.cfg, RunLayout(Path(run_dir)), device)
        self.work = stage_cls(self.cfg, backbone, device, amp, **inputs)
        # Ray Data runs CALLS_PER_ACTOR calls at once on this actor (threads): one call decodes + prepares its
        # shard (stage.load) or writes it while another holds the model, as the one-process executor's prefetch
        # and writer threads do. The model itself runs one call at a time.
        self._model = threading.Lock()
        self.calls_in_model = self.max_calls_in_model = 0

    def info(self) -> dict[str, Any]:
        """What this actor runs with (tests and logs): compiled backbone or not, most calls seen in the model."""
        bb = self.work.backbone
        return {"stage": self.stage, "compiled": bool(getattr(bb, "_transfgu_compiled", False)),
                "compile_failed": bool(getattr(bb, "_transfgu_compile_state", {}).get("failed", False)),
                "max_calls_in_model": self.max_calls_in_model}  # fmt: skip

    def _compute(self, payload: Any, ok_ids: list[str]) -> pa.Table:
        with self._model:
            self.calls_in_model += 1
            self.max_calls_in_model = max(self.max_calls_in_model, self.calls_in_model)
            try:
                return self.work.compute(payload, ok_ids)
            finally:
                self.calls_in_model -= 1

    def _shard(self, indices: list[int], ids: list[str], paths: list[str], file: str, payload: Any,
               ok_ids: list[str], failed: dict[str, str], out: dict[str, list[Any]]) -> None:
        """Model, integrity stamp, atomic write of one shard; one summary row per image into ``out``."""
        table = self._compute(payload, ok_ids)
        table = integrity.stamp_table(table, self.input_hash, ids, [i for i in ids if i not in set(ok_ids)])
        path = self.out_dir / file
        write_parquet_atomic(table, path)
        counts = self.work.rows_per_image(table)
        for i, image_id, p in zip(indices, ids, paths):
            reason = failed.get(p)
            out["index"].append(i)
            out["image_id"].append(image_id)
            out["ok"].append(reason is None)
            out["reason"].append(reason or "")
            out["rows"].append(0 if reason else counts.get(image_id, 0))
            out["file"].append(path.name)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {k: [] for k in SUMMARY_COLUMNS}
        if "decoded" in batch:  # shards decoded by the CPU decode stage (load_shards): one row per shard
            for items, file, d in zip(batch["items"], batch["file"], batch["decoded"]):
                spec = json.loads(str(items))
                self._shard(spec["index"], spec["image_id"], spec["path"], str(file), d["payload"], d["ok_ids"],
                            d["failed"], out)
            return _summary(out)
        order = np.argsort(batch["index"], kind="stable")
        shards = batch["shard"][order]
        for s in np.unique(shards):
            sel = order[shards == s]
            indices = [int(i) for i in batch["index"][sel]]
            ids = [str(x) for x in batch["image_id"][sel]]
            paths = [str(x) for x in batch["path"][sel]]
            errors = CollectedErrors()
            recs = [ImageRecord(i, Path(p)) for i, p in zip(ids, paths)]
            payload, ok_ids = self.work.load(recs, errors)  # the data path, outside the model lock
            self._shard(indices, ids, paths, str(batch["file"][sel][0]), payload, ok_ids, errors.failed, out)
        return _summary(out)


def _summary(out: dict[str, list[Any]]) -> dict[str, np.ndarray]:
    return {
        "index": np.asarray(out["index"], dtype=np.int64),
        "image_id": np.asarray(out["image_id"], dtype=object),
        "ok": np.asarray(out["ok"], dtype=bool),
        "reason": np.asarray(out["reason"], dtype=object),
        "rows": np.asarray(out["rows"], dtype=np.int64),
        "file": np.asarray(out["file"], dtype=object),
    }


def decode_stage_wanted(cfg: Config, gpu: bool) -> bool:
    """``ray.decode_stage``: auto = a CPU decode stage ahead of GPU actors only (there a GPU would otherwise wait on
    its actor's one or two CPUs decoding JPEGs); CPU actors decode their own shards, overlapped inside the actor."""
    v = cfg.ray.decode_stage
    return gpu if v == "auto" else bool(v)


def actor_kwargs(ctx: RunContext, stage_cls: type[ShardedStage], num_cpus: float, use_gpu: bool) -> dict[str, Any]:
    """The constructor arguments of a :class:`StageActor` of ``stage_cls`` for this run (plain data)."""
    stage = stage_cls.name
    return {
        # a registered stage travels by name; another one (Leopart's dense stage of a split) as the class
        "stage": stage if SHARDED_STAGES.get(stage) is stage_cls else stage_cls,
        "cfg": worker_config(ctx.cfg), "run_dir": str(ctx.run_dir.resolve()),
        "out_dir": str(stage_cls.output(ctx.layout).resolve()), "shard_images": SHARD_IMAGES, "num_cpus": num_cpus,
        "use_gpu": use_gpu, "inputs": stage_cls.worker_inputs(ctx.layout), "input_hash": ctx.hashes[stage],
    }


def run_sharded_stage(ctx: RunContext, stage_cls: type[ShardedStage]) -> dict[str, Any]:
    """The Ray executor of a per-image stage: the records that no finished shard covers go through an actor pool;
    then the stage's own checks (:meth:`~transfgu.stages.ShardedStage.finish`).

    A pool actor that dies is not restarted by Ray (``cluster.map_on_pool``): the shards written so far are
    kept and the shards no file covers go to a new pool (``cluster.run_pool_with_retries``), as on a re-run.

    Returns the stage's manifest info plus ``new_images``: the images the actors reported back by this call (one
    whose shard was written by an actor that died before reporting counts as kept).
    """
    received = [0]  # images reported back, over the attempts
    return run_pool_with_retries(stage_cls.name, lambda: _run_sharded_once(ctx, stage_cls, received))


def _run_sharded_once(ctx: RunContext, stage_cls: type[ShardedStage], received: list[int]) -> dict[str, Any]:
    """One attempt of :func:`run_sharded_stage`: plan from the files on disk, run the pool, check."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    stage = stage_cls.name
    out_dir = stage_cls.output(ctx.layout)
    records = stage_cls.records(ctx.cfg)
    cfg = ctx.cfg
    stage_cls.check_inputs(ctx)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = [r.image_id for r in records]
    h = ctx.hashes[stage]
    plan = integrity.plan_shards(out_dir, ctx.run_dir, stage, h, ids, SHARD_IMAGES)
    todo = plan.todo
    kept = len(records) - len(todo)
    if not todo:
        return {**stage_cls.finish(ctx, ids), "new_images": received[0]}
    res = task_resources(cfg)
    gpu = "num_gpus" in res
    lo, hi = actor_pool_bounds(cfg.ray.extract_actors, res, ray.cluster_resources(), len(plan.groups))
    kwargs = actor_kwargs(ctx, stage_cls, res["num_cpus"], gpu)
    ray_bar = configure_data_context(DataContext.get_current())  # Ray Data's bar on a terminal
    if decode_stage_wanted(cfg, gpu):
        # Decode + resize in CPU tasks ahead of the actors (as predict_ray does), one shard per row and per call.
        ds = ray.data.from_arrow(shard_specs(records, plan))
        ds = ds.map_batches(load_shards, batch_size=1, batch_format="numpy", num_cpus=cfg.ray.decode_cpus,
                            fn_kwargs={k: kwargs[k] for k in ("stage", "cfg", "inputs")} | {
                                "num_cpus": cfg.ray.decode_cpus})
        batch_size = 1
    else:
        ds = ray.data.from_arrow(shard_tables(records, plan))
        batch_size = SHARD_IMAGES
    log.info("[%s] %d shards on %d-%d actors (%s), decode %s", stage, len(plan.groups), lo, hi, res,
             "in CPU tasks" if batch_size == 1 else "in the actors")
    ds = map_on_pool(
        ds,
        StageActor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=lo, max_size=hi, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                  enable_true_multi_threading=True),
        fn_constructor_kwargs=kwargs,
        **res,
    )
    parts: dict[str, list[np.ndarray]] = {k: [] for k in SUMMARY_COLUMNS}
    t0 = time.time()
    n_seen = 0
    # Under Ray Data's bar only the final count is logged; elsewhere a status line every 10 s, also while a shard
    # is still running.
    with Progress(stage, len(records), bar=False, min_interval_s=math.inf if ray_bar else 10.0,
                  heartbeat=not ray_bar) as prog:
        if kept:
            prog.update(kept, "(kept)")
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in SUMMARY_COLUMNS:
                parts[k].append(batch[k])
            n_seen += len(batch["index"])
            received[0] += int(batch["ok"].sum())
            prog.update(len(batch["index"]), f"rows={int(sum(int(r.sum()) for r in parts['rows']))}")
    summary = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    log.debug("[%s] %d images through the actor pool in %.1fs", stage, n_seen, time.time() - t0)
    _check_counts(stage, todo, summary, out_dir)
    for p, reason, ok in zip(
        [str(records[int(i)].image_path) for i in summary["index"]], summary["reason"], summary["ok"]
    ):
        if not ok:
            ctx.errors.record(p, stage, str(reason))
    return {**stage_cls.finish(ctx, ids), "new_images": received[0]}


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
