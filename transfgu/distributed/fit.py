"""One Ray Train wrapper for the training stages: :func:`fit_on_ray` (driver) and the worker context it builds once.

The bootstrapping rounds (:mod:`transfgu.distributed.train`) and Leopart's dense fine-tuning
(:mod:`transfgu.distributed.finetune_stage`) differ only in their loop body. Everything around it is here, once:

* the driver: ``ScalingConfig`` (``ray.num_workers`` workers with ``ray.cpus_per_worker`` CPUs and one GPU each when
  the cluster has GPUs; ``num_workers=0`` = Train's local mode), ``RunConfig`` named without a timestamp (a re-run
  with the same storage restores its checkpoint manager) with two checkpoints kept and one restart on failure, the
  Tune callback inside a Tune trial, and the worker's configuration (config, run directory, input hash, threads, GPU,
  MLflow spec);
* the worker preamble (:class:`WorkerContext`): logging, config, input settings, threads, rank/world, the checkpoint
  restore, seeding, device, the MLflow epoch logger of rank 0, and ``report`` (every rank reports every epoch, a
  barrier in Train V2; rank 0 attaches its state directory as the Ray checkpoint);
* the one checkpoint-restore rule: a worker that starts without the reported state (a fresh node, no shared disk)
  installs ``ray.train.get_checkpoint()`` when it is of the same input hash and newer than what the node has.

A loop is a :class:`RayLoop`: module-level functions (Ray ships them by reference) for the body, the latest epoch this
node has, and the directory a checkpoint's state belongs in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from transfgu.checkpoint import install_state_dir, read_state_info
from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.distributed.cluster import cluster_has_gpus, worker_config
from transfgu.layout import RunLayout
from transfgu.logs import setup_logging
from transfgu.paths import default_storage
from transfgu.runtime import configure_inputs, seed_everything
from transfgu.tracking import EpochLogger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayLoop:
    """What a training stage gives :func:`fit_on_ray`."""

    stage: str  # the stage name: its input hash, log prefix and MLflow epoch-run prefix
    body: Callable[[WorkerContext], None]  # the per-worker loop; reports through ``WorkerContext.report``
    latest_epoch: Callable[[WorkerContext], int]  # last epoch whose state this node has under this hash (-1: none)
    state_dir: Callable[[WorkerContext, Mapping[str, Any]], Path]  # where a checkpoint's state (its info) goes


@dataclass
class WorkerContext:
    """Everything a Ray Train worker's loop body needs, built once by the worker preamble."""

    cfg: Config
    layout: RunLayout
    input_hash: str
    rank: int
    world: int
    device: torch.device
    options: dict[str, Any]  # the caller's extra loop options
    epoch_log: EpochLogger | None = None
    tune_direct: bool = False  # Train's local mode inside a Tune trial: rank 0 of 1 reports straight to Tune

    @property
    def wrap(self) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
        """DDP wrapping of the model (``ray.train.torch.prepare_model``) when there are several workers."""
        if self.world <= 1:
            return None
        import ray.train.torch

        return ray.train.torch.prepare_model

    def report(self, metrics: Mapping[str, Any], state_dir: Path, checkpoint_name: str) -> None:
        """Log the epoch (rank 0, MLflow) and report it on every rank, rank 0 with ``state_dir`` as the checkpoint."""
        from ray.train import Checkpoint

        m = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.epoch_log is not None:
            self.epoch_log(m)
        ckpt = Checkpoint.from_directory(str(state_dir)) if self.rank == 0 else None
        if self.tune_direct:
            from ray import tune

            tune.report(m, checkpoint=ckpt)
        else:
            import ray.train

            ray.train.report(m, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name)


def restore_from_checkpoint(loop: RayLoop, wctx: WorkerContext) -> Path | None:
    """Install the latest Ray checkpoint where ``loop.state_dir`` puts it when this node lacks that state; a
    checkpoint of another input hash is never resumed from. Returns the directory installed, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        info = read_state_info(Path(d))
        if info is None:
            return None
        if info.get("input_hash") != wctx.input_hash:
            log.warning("[%s] the Ray checkpoint was trained under other settings; not restoring it", loop.stage)
            return None
        if loop.latest_epoch(wctx) >= int(info["epoch"]):
            return None
        target = loop.state_dir(wctx, info)
        install_state_dir(Path(d), target)
        log.info("[%s] restored epoch %d from the Ray checkpoint into %s", loop.stage, info["epoch"], target)
        return target


def _worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function of every loop: the preamble, then the loop body."""
    import ray.train
    import ray.train.torch

    loop: RayLoop = config["loop"]
    setup_logging(worker=True)
    cfg = Config.model_validate(config["cfg"])
    configure_inputs(cfg)
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    # Inside a Tune trial, Train's local mode (num_workers=0) runs this in the trial's process, where ray.train.*
    # is disallowed (ray-project/ray#49454): then rank 0 of 1 reports straight to Tune.
    tune_direct = bool(config.get("tune_direct"))
    if tune_direct:
        rank, world = 0, 1
    else:
        tctx = ray.train.get_context()
        rank, world = tctx.get_world_rank(), tctx.get_world_size()
    wctx = WorkerContext(
        cfg=cfg, layout=RunLayout(Path(config["run_dir"])), input_hash=config["input_hash"], rank=rank, world=world,
        device=torch.device("cpu"), options=dict(config.get("options") or {}), tune_direct=tune_direct,
    )
    if not tune_direct:
        restore_from_checkpoint(loop, wctx)
    seed_everything(cfg.run.seed)
    wctx.device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    mlf = config.get("mlflow") or {}
    if rank == 0 and mlf.get("spec") and mlf.get("stage_run_id"):
        # one MLflow child run per round / fit under the driver's stage run
        wctx.epoch_log = EpochLogger(mlf["spec"], mlf["stage_run_id"], prefix=loop.stage)
    try:
        loop.body(wctx)
    except BaseException:
        if wctx.epoch_log is not None:
            wctx.epoch_log.close("FAILED")
        raise
    if wctx.epoch_log is not None:
        wctx.epoch_log.close()


def fit_on_ray(ctx: RunContext, loop: RayLoop, name: str, *, num_workers: int | None = None,
               options: Mapping[str, Any] | None = None, tune: bool = False) -> Any:
    """One ``TorchTrainer.fit()`` of ``loop`` named ``name`` (see the module docstring); returns Train's ``Result``.

    ``num_workers`` defaults to ``ray.num_workers`` (0 = Train's local mode); ``options`` reach the loop body as
    ``WorkerContext.options``; ``tune=True`` (inside a Tune trial) forwards rank 0's reports to Tune.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = ctx.cfg
    gpu = cluster_has_gpus(cfg)
    n_workers = cfg.ray.num_workers if num_workers is None else num_workers
    if n_workers == 0:
        scaling = ScalingConfig(num_workers=0)
    else:
        per = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
        scaling = ScalingConfig(num_workers=n_workers, use_gpu=gpu, resources_per_worker=per)
    callbacks = []
    if tune and n_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    tracker = ctx.tracker if ctx.tracker is not None and ctx.tracker.enabled else None
    trainer = TorchTrainer(
        _worker,
        train_loop_config={
            "loop": loop,
            "cfg": worker_config(cfg),
            "run_dir": str(ctx.run_dir.resolve()),
            "input_hash": ctx.hashes[loop.stage],
            "threads": max(1, int(cfg.ray.cpus_per_worker)),
            "use_gpu": gpu,
            "tune_direct": bool(tune and n_workers == 0),
            "mlflow": {"spec": tracker.spec.to_dict() if tracker is not None else None,
                       "stage_run_id": ctx.stage_run_id},
            "options": dict(options or {}),
        },
        scaling_config=scaling,
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=default_storage(cfg.ray.storage_path, ctx.layout.ray_results, ctx.run_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=1),
            callbacks=callbacks or None,
        ),
    )
    return trainer.fit()
