"""The ``finetune`` stage (Leopart's dense fine-tuning, :mod:`transfgu.leopart.finetune_train`) on Ray Train V2.

One ``TorchTrainer.fit()`` named ``<run>-finetune-<hash>`` (no timestamp: a re-run with the same storage restores
its checkpoint manager), as the bootstrapping rounds of :mod:`transfgu.distributed.train`. The worker loop is the
one-process loop, :func:`transfgu.leopart.finetune_train.finetune`; DDP comes from ``ray.train.torch.prepare_model``
(gloo on CPU, NCCL on GPU).

Checkpoints follow the bootstrapping rules: rank 0 writes ``<run>/finetune/epoch_<e>/`` every epoch and reports that
directory as the Ray checkpoint; a worker that starts without it (a restarted worker on a fresh node, no shared disk)
restores it from ``ray.train.get_checkpoint()`` when it is of the same input hash and newer than what the node has.
``FailureConfig(max_failures=1)``: a killed worker is restarted once and resumes from the last epoch's state. Every
epoch all ranks call ``ray.train.report`` (a barrier in V2); rank 0 logs the epoch to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from transfgu.checkpoint import install_state_dir, read_state_info
from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.distributed.cluster import cluster_has_gpus, worker_config
from transfgu.errors import CollectedErrors, ErrorLog
from transfgu.layout import RunLayout
from transfgu.leopart import finetune_train as ftt
from transfgu.logs import setup_logging
from transfgu.runtime import configure_inputs, load_run_backbone, seed_everything
from transfgu.store import to_jsonable
from transfgu.tracking import EpochLogger

log = logging.getLogger(__name__)


def restore_from_checkpoint(out: Path, input_hash: str) -> None:
    """Copy the latest Ray checkpoint into ``<run>/finetune/epoch_<e>/`` when this node lacks that state."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        info = read_state_info(Path(d))
        if info is None or info.get("input_hash") != input_hash:
            return
        have = ftt.latest_state(out, input_hash)
        if have is not None and int(read_state_info(have)["epoch"]) >= int(info["epoch"]):  # type: ignore[index]
            return
        target = ftt.state_dir(out, int(info["epoch"]))
        install_state_dir(Path(d), target)
        log.info("[finetune] restored epoch %d from the Ray checkpoint into %s", info["epoch"], target)


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: every (remaining) epoch of the fine-tuning."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    setup_logging(worker=True)
    cfg = Config.model_validate(config["cfg"])
    configure_inputs(cfg)
    torch.set_num_threads(max(1, int(config.get("threads", 1))))
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    layout = RunLayout(Path(config["run_dir"]))
    out = layout.root / "finetune"
    h = config["input_hash"]
    restore_from_checkpoint(out, h)
    seed_everything(cfg.run.seed)
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    errors = ErrorLog(layout.errors) if rank == 0 else CollectedErrors()  # rank 0 records skipped images
    images, _ = ftt.decode_training_images(cfg, errors)
    backbone = load_run_backbone(cfg.backbone, layout, cfg.run.seed).to(device)

    epoch_log = None
    mlf = config.get("mlflow") or {}
    if rank == 0 and mlf.get("spec") and mlf.get("stage_run_id"):
        epoch_log = EpochLogger(mlf["spec"], mlf["stage_run_id"], prefix="finetune")

    def on_epoch(metrics: dict[str, Any]) -> None:
        m = {k: float(v) for k, v in metrics.items()}
        if epoch_log is not None:
            epoch_log(m)
        e = int(metrics["epoch"])
        ckpt = Checkpoint.from_directory(str(ftt.state_dir(out, e))) if rank == 0 else None
        ray.train.report(m, checkpoint=ckpt, checkpoint_dir_name=f"finetune_epoch_{e:03d}")

    wrap = ray.train.torch.prepare_model if world > 1 else None
    try:
        ftt.finetune(cfg, backbone, images, out, h, device, rank=rank, world=world, wrap=wrap, on_epoch=on_epoch,
                     source=config["source"])
    except BaseException:
        if epoch_log is not None:
            epoch_log.close("FAILED")
        raise
    if epoch_log is not None:
        epoch_log.close()


def run_finetune_ray(ctx: RunContext) -> dict[str, Any]:
    """The Ray executor of the finetune stage: one TorchTrainer fit over every epoch."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = ctx.cfg
    out = ctx.run_dir / "finetune"
    h = ctx.hashes["finetune"]
    done = (out / ftt.INFO_FILE).is_file() and (out / ftt.BACKBONE_OUT).is_file()
    latest = ftt.latest_state(out, h)
    if not (done and latest is not None and int(read_state_info(latest)["epoch"]) >= cfg.finetune.epochs - 1):
        gpu = cluster_has_gpus(cfg)
        n_workers = max(1, cfg.ray.num_workers)
        per = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
        tracker = ctx.tracker if ctx.tracker is not None and ctx.tracker.enabled else None
        trainer = TorchTrainer(
            finetune_loop_per_worker,
            train_loop_config={
                "cfg": worker_config(cfg),
                "run_dir": str(ctx.run_dir.resolve()),
                "input_hash": h,
                "threads": max(1, int(cfg.ray.cpus_per_worker)),
                "use_gpu": gpu,
                "source": ftt.source_record(cfg),
                "mlflow": {"spec": tracker.spec.to_dict() if tracker is not None else None,
                           "stage_run_id": ctx.stage_run_id},
            },
            scaling_config=ScalingConfig(num_workers=n_workers, use_gpu=gpu, resources_per_worker=per),
            run_config=ray.train.RunConfig(
                name=f"{cfg.run.name}-finetune-{h[:10]}",
                storage_path=cfg.ray.storage_path or str(ctx.layout.ray_results.resolve()),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=1),
            ),
        )
        trainer.fit()
    return to_jsonable({**ftt.finish_info(out), "workers": max(1, cfg.ray.num_workers)})

