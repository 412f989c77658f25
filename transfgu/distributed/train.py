"""Stage 4 on Ray: bootstrapped decoder training with Ray Train V2 (issue 4 item 4).

One ``TorchTrainer.fit()`` per bootstrapping round, named ``<run>-train-<hash>-round<r>`` (no timestamp: a re-run
with the same storage restores that round's checkpoint manager). The worker loop is the one-process loop,
:func:`transfgu.training.train_rounds`, stopped at the round's last epoch; DDP comes from
``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU, chosen by Ray Train from ``use_gpu``).

Data (:func:`transfgu.data.loaders.make_train_loader`, :mod:`transfgu.ddp`): every worker draws the one-process
epoch order (reshuffled every epoch), cuts it into global batches of ``train.batch_size`` and takes its contiguous
slice of each, so W workers train on the one-process batches, take one step decision per global batch and share its
random draws; the run equals the one-process run (tested). Items stream from the packed label bank and the train-
size image store (:mod:`transfgu.data.train_store`), which the driver writes once before the first fit: a worker
reads only its batches' bytes and its memory does not grow with the data set. With one worker (or Train's local
mode, ``num_workers=0``) the loader is exactly the one-process one.

Checkpoints: rank 0 writes ``<run>/train/round_<r>/`` every epoch (as the one-process loop does) and reports that
directory as the Ray checkpoint; a worker that starts without it (a fresh node, no shared disk) restores it from
``ray.train.get_checkpoint()``. The driver writes ``model/`` from the last fit's ``result.checkpoint`` (Train's
storage, e.g. S3), not from whatever ``train/`` the driver's node sees. Every epoch all ranks call
``ray.train.report`` (it is a barrier in V2); rank 0 adds ``val_mIoU`` when asked (Tune's objective) and logs the
epoch to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from transfgu.checkpoint import install_state_dir, last_trained_epoch, load_train_state, read_state_info
from transfgu.config import Config
from transfgu.context import RunContext, run_backbone
from transfgu.data.loaders import make_train_loader, prepare_train_input
from transfgu.distributed.cluster import cluster_has_gpus, worker_config
from transfgu.evaluation import evaluate_decoder, has_labelled_val
from transfgu.layout import RunLayout, round_name
from transfgu.logs import setup_logging
from transfgu.runtime import autocast_dtype, configure_inputs, seed_everything
from transfgu.selection import Validator, validation_wanted
from transfgu.stages import finish_train
from transfgu.store import to_jsonable
from transfgu.tracking import EpochLogger
from transfgu.training import build_decoder, round_segments, train_rounds

log = logging.getLogger(__name__)


def restore_from_checkpoint(layout: RunLayout, input_hash: str | None = None) -> None:
    """Copy the latest Ray checkpoint into ``train/`` when this node does not already have that state.

    A checkpoint whose state records another train hash than ``input_hash`` is ignored (never resumed from).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        info = read_state_info(Path(d))
        if info is None:
            return
        if input_hash is not None and info.get("input_hash") != input_hash:
            log.warning("[train] the Ray checkpoint was trained under other settings; not restoring it")
            return
        if last_trained_epoch(layout.train, input_hash) >= info["epoch"]:
            return
        target = layout.round_dir(int(info["round"]))
        install_state_dir(Path(d), target)
        log.info("[train] restored epoch %d from the Ray checkpoint into %s", info["epoch"], target)


def finish_from_result(ctx: RunContext, result: Any | None) -> dict[str, Any]:
    """:func:`transfgu.stages.finish_train` from the final state in ``result.checkpoint`` (a Ray Train ``Result``);
    from the run's ``train/`` when no fit ran (every round was already trained) or it reported no checkpoint."""
    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        return finish_train(ctx)
    with ckpt.as_directory() as d:
        log.info("[train] model from the final Ray checkpoint %s", ckpt.path)
        return finish_train(ctx, state_dir=Path(d))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: one bootstrapping round (epochs ``[start, stop)``) of train_rounds."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

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
    layout = RunLayout(Path(config["run_dir"]))
    if not tune_direct:
        restore_from_checkpoint(layout, config.get("input_hash"))
    seed_everything(cfg.run.seed)
    device = ray.train.torch.get_device() if config.get("use_gpu") else torch.device("cpu")
    amp = autocast_dtype(cfg.backbone.precision, device)
    backbone = run_backbone(cfg, layout, device)  # as the one-process executor: compiled on CUDA
    loader = make_train_loader(cfg, layout.label_bank, config["bank_hash"], rank, world, cpus=config.get("threads"))

    epoch_log = None
    mlf = config.get("mlflow") or {}
    if rank == 0 and mlf.get("spec") and mlf.get("stage_run_id"):
        # one MLflow child run per bootstrapping round under the driver's train-stage run
        epoch_log = EpochLogger(mlf["spec"], mlf["stage_run_id"])

    def on_epoch(metrics: dict[str, Any]) -> None:
        out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        r, e = int(metrics["round"]), int(metrics["epoch"])
        round_dir = layout.round_dir(r)
        if rank == 0 and config.get("eval_every_epoch") and "val_mIoU" not in metrics:
            dec = build_decoder(cfg, backbone.embed_dim).to(device)
            dec.load_state_dict(load_train_state(round_dir)[0]["student"])
            dec.eval()
            scores, _, _ = evaluate_decoder(cfg, backbone, dec, device, amp)
            out["val_mIoU"] = float(scores["mIoU"])
            out["val_pixel_accuracy"] = float(scores["pixel_accuracy"])
            log.info("[train] round %d epoch %d val mIoU %.4f", r, e + 1, out["val_mIoU"])
        if epoch_log is not None:
            epoch_log(out)
        ckpt = Checkpoint.from_directory(str(round_dir)) if rank == 0 else None
        if tune_direct:
            from ray import tune

            tune.report(out, checkpoint=ckpt)
        else:
            ray.train.report(out, checkpoint=ckpt, checkpoint_dir_name=f"{round_name(r)}_epoch_{e:03d}")

    wrap = ray.train.torch.prepare_model if world > 1 else None
    # train.select=best_val / validate_every: rank 0 scores the student on val (transfgu.selection).
    validate = Validator(cfg, backbone, device, amp) if rank == 0 and validation_wanted(cfg) else None
    try:
        train_rounds(cfg, backbone, loader, layout, device, amp, on_epoch=on_epoch, rank=rank, wrap=wrap,
                     stop_epoch=int(config["stop_epoch"]), validate=validate, input_hash=config.get("input_hash"))
    except BaseException:
        if epoch_log is not None:
            epoch_log.close("FAILED")
        raise
    if epoch_log is not None:
        epoch_log.close()


def run_train_ray(ctx: RunContext, tune: bool = False) -> dict[str, Any]:
    """The Ray executor of the train stage: one TorchTrainer fit per round, then the stage's own
    :func:`transfgu.stages.finish_train` (``model/`` and the manifest info).

    ``tune=True`` (inside a Tune trial) evaluates on val after every epoch and forwards rank 0's reports to Tune.
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = ctx.cfg
    gpu = cluster_has_gpus(cfg)
    n_workers = cfg.ray.num_workers
    if n_workers == 0:
        scaling = ScalingConfig(num_workers=0)
    else:
        per = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1} if gpu else {})}
        scaling = ScalingConfig(num_workers=n_workers, use_gpu=gpu, resources_per_worker=per)
    storage = cfg.ray.storage_path or str(ctx.layout.ray_results.resolve())
    tracker = ctx.tracker if ctx.tracker is not None and ctx.tracker.enabled else None
    callbacks = []
    if tune and n_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    h = ctx.hashes["train"][:10]
    last_metrics: dict[str, Any] = {}
    segments = round_segments(cfg)
    if not cfg.ray.fit_per_round:
        segments = [(segments[0][0], 0, cfg.train.epochs)]
    from transfgu import integrity

    integrity.require_stamped(ctx.layout.label_bank, "label_bank", ctx.hashes["label_bank"])
    # written once here, only opened by the workers
    prepare_train_input(cfg, ctx.layout.label_bank, ctx.hashes["label_bank"])
    result = None
    for r, start, stop in segments:
        if last_trained_epoch(ctx.layout.train, ctx.hashes["train"]) >= stop - 1:
            log.info("[train] round %d (epochs %d-%d) already trained; skipping", r, start + 1, stop)
            continue
        log.info("[train] round %d: epochs %d-%d on %s worker(s)%s", r, start + 1, stop, max(n_workers, 1),
                 " with GPUs" if gpu else "")
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "cfg": worker_config(cfg),
                "run_dir": str(ctx.run_dir.resolve()),
                "stop_epoch": stop,
                "input_hash": ctx.hashes["train"],
                "bank_hash": ctx.hashes["label_bank"],
                "threads": max(1, int(cfg.ray.cpus_per_worker)),
                "use_gpu": gpu,
                "eval_every_epoch": bool(tune and has_labelled_val(cfg)),
                "tune_direct": bool(tune and n_workers == 0),
                "mlflow": {
                    "spec": tracker.spec.to_dict() if tracker is not None else None,
                    "stage_run_id": ctx.stage_run_id,
                },
            },
            scaling_config=scaling,
            run_config=ray.train.RunConfig(
                name=f"{cfg.run.name}-train-{h}" + (f"-round{r:03d}" if cfg.ray.fit_per_round else ""),
                storage_path=storage,
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=1),
                callbacks=callbacks or None,
            ),
        )
        result = trainer.fit()
        last_metrics = dict(result.metrics or {})
        if "loss" in last_metrics:  # worker lines reach the console only with --verbose: say how the round ended
            log.info("[train] round %d: epoch %d/%d loss %.4f%s", r, stop, cfg.train.epochs, last_metrics["loss"],
                     f" val mIoU {last_metrics['val_mIoU']:.4f}" if "val_mIoU" in last_metrics else "")
    out = {**finish_from_result(ctx, result), "workers": n_workers}
    if "val_mIoU" in last_metrics:
        out["val_mIoU"] = float(last_metrics["val_mIoU"])
    return to_jsonable(out)
