"""The one-process executor: :class:`LocalExecutor`, every stage's work as a loop in this process.

It implements :class:`transfgu.method.Executor` (what every method's stages are written against); the Ray executor
is :class:`transfgu.distributed.executor.RayExecutor`. TransFGU's concepts and train stages have a one-process form
here (:func:`run_concepts`, :func:`run_train`), their Ray form in :mod:`transfgu.distributed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from transfgu import integrity
from transfgu.context import RunContext
from transfgu.data.loaders import make_train_loader
from transfgu.kmeans import kmeans
from transfgu.kmeans.minibatch import minibatch_kmeans
from transfgu.logs import Progress
from transfgu.method import StageInfo
from transfgu.selection import Validator, validation_wanted
from transfgu.sharded import SHARD_IMAGES, ShardedStage
from transfgu.stages import ExtractStage, LabelBankStage, concept_pools, finish_concepts, finish_train
from transfgu.store.formats import read_features, write_parquet_atomic
from transfgu.throughput.prefetch import PrefetchLoader, default_writer_threads, overlapped
from transfgu.training import train_rounds

log = logging.getLogger(__name__)
T = TypeVar("T")
H = TypeVar("H")

def run_sharded(ctx: RunContext, stage_cls: type[ShardedStage]) -> dict[str, Any]:
    """Run a per-image stage over the training split, one shard after the other.

    Resume is by image id (:func:`transfgu.integrity.plan_shards`): kept files are those of this stage's input hash
    whose images are all still listed; the rest are set aside. Every new file is stamped with the input hash and
    the ids it covers (:func:`transfgu.integrity.stamp_table`); the stage's ``finish`` counts from disk.
    """
    stage_cls.check_inputs(ctx)
    out_dir = stage_cls.output(ctx.layout)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = stage_cls.records(ctx.cfg)
    ids = [r.image_id for r in records]
    h = ctx.hashes[stage_cls.name]
    plan = integrity.plan_shards(out_dir, ctx.run_dir, stage_cls.name, h, ids, SHARD_IMAGES)
    stage = stage_cls(ctx.cfg, ctx.backbone, ctx.device, ctx.amp, **stage_cls.worker_inputs(ctx.layout))
    rows = 0
    todo = [([records[p] for p in g.positions], out_dir / g.name) for g in plan.groups]

    def load(item: tuple[list, Path]) -> tuple[Any, list[str]]:
        return stage.load(item[0], ctx.errors)

    def compute(item: tuple[list, Path], payload: tuple[Any, list[str]]) -> Any:
        shard_ids = [r.image_id for r in item[0]]
        ok = set(payload[1])
        return integrity.stamp_table(stage.compute(*payload), h, shard_ids, [i for i in shard_ids if i not in ok])

    with Progress(stage_cls.name, len(records)) as prog:
        if plan.covered:
            prog.update(len(plan.covered), "(kept)")
        # Decoding + resizing of the next shard runs on a prefetch thread and the Parquet write of the previous one
        # on writer threads (throughput.prefetch.overlapped), so the model waits for neither. Each shard is its own
        # atomically renamed file, so several writer threads give the same files as one.
        threads = ctx.cfg.run.write_threads or default_writer_threads()
        for (shard, _), table in overlapped(
            todo, load, compute, lambda item, table: write_parquet_atomic(table, item[1]), write_threads=threads,
        ):
            rows += table.num_rows
            prog.update(len(shard), f"rows={rows}")
    return stage_cls.finish(ctx, ids)


def run_extract(ctx: RunContext) -> StageInfo:
    """TransFGU's extract stage in this process (what ``LocalExecutor().run_sharded(ctx, ExtractStage)`` runs)."""
    return run_sharded(ctx, ExtractStage)


def run_label_bank(ctx: RunContext) -> StageInfo:
    """TransFGU's label-bank stage in this process."""
    return run_sharded(ctx, LabelBankStage)


def run_concepts(ctx: RunContext) -> dict[str, Any]:
    """faiss k-means of every pool in this process (all crop features of a pool in memory); sklearn's
    MiniBatchKMeans with ``concepts.algorithm=minibatch_kmeans`` (protocol: paper, Cityscapes/LIP)."""
    cfg = ctx.cfg
    integrity.require_stamped(ctx.layout.features, "extract", ctx.hashes["extract"])
    fits = {}
    for pool, k in concept_pools(cfg).items():
        _, cls = read_features(ctx.layout.features, pools=[pool])
        if len(cls) < k:
            raise ValueError(f"pool {pool!r} has {len(cls)} crops, fewer than its k={k} concepts")
        if cfg.concepts.algorithm == "minibatch_kmeans":
            res = minibatch_kmeans(cls, k, max_iter=cfg.concepts.niter, random_state=cfg.concepts.seed)
        else:
            res = kmeans(cls, k, niter=cfg.concepts.niter, seed=cfg.concepts.seed)
        fits[pool] = res
    return finish_concepts(ctx, fits, extra={"nredo": 1, "init": "random", "algorithm": cfg.concepts.algorithm})


def run_train(ctx: RunContext) -> dict[str, Any]:
    """Every epoch of bootstrapped training in this process, then ``model/``."""
    integrity.require_stamped(ctx.layout.label_bank, "label_bank", ctx.hashes["label_bank"])
    # next batches decoded during a step
    loader = PrefetchLoader(make_train_loader(ctx.cfg, ctx.layout.label_bank, ctx.hashes["label_bank"]))
    # train.select=best_val / validate_every: the student is scored on val during training (transfgu.selection).
    validate = Validator(ctx.cfg, ctx.backbone, ctx.device, ctx.amp) if validation_wanted(ctx.cfg) else None
    train_rounds(ctx.cfg, ctx.backbone, loader, ctx.layout, ctx.device, ctx.amp, on_epoch=ctx.on_epoch,
                 validate=validate, input_hash=ctx.hashes["train"])
    return finish_train(ctx)


class LocalExecutor:
    """The one-process executor (:class:`transfgu.method.Executor`): every stage's work in this process."""

    name = "local"

    def run_sharded(self, ctx: RunContext, stage: type[ShardedStage]) -> StageInfo:
        return run_sharded(ctx, stage)

    def map_files(self, fn: Callable[[str], T], files: Sequence[Path]) -> list[T]:
        return [fn(str(f)) for f in files]

    def hold(self, holder: Callable[..., H], files: Sequence[Path], *args: Any) -> H:
        return holder([str(f) for f in files], *args)  # one holder for every file

    def release(self, held: object) -> None:
        pass
