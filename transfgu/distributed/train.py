"""Stage 4 on Ray: bootstrapped decoder training with Ray Train V2 (issue 4 item 4).

One ``TorchTrainer.fit()`` per bootstrapping round, named ``<run>-train-<hash>-round<r>`` (no timestamp: a re-run
with the same storage restores that round's checkpoint manager), through :func:`transfgu.distributed.fit.fit_on_ray`
(the worker preamble, checkpoint restore and trainer set-up shared with the fine-tuning); this module keeps the loop
body. The worker loop is the one-process loop,
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfgu.checkpoint import last_trained_epoch, load_train_state
from transfgu.context import RunContext, run_backbone
from transfgu.data.loaders import make_train_loader, prepare_train_input
from transfgu.distributed.cluster import cluster_has_gpus
from transfgu.distributed.fit import RayLoop, WorkerContext, fit_on_ray
from transfgu.evaluate_stage import evaluate_decoder, has_labelled_val
from transfgu.layout import round_name
from transfgu.runtime import autocast_dtype
from transfgu.selection import Validator, validation_wanted
from transfgu.stages import finish_train
from transfgu.store import to_jsonable
from transfgu.training import build_decoder, round_segments, train_rounds

log = logging.getLogger(__name__)


def finish_from_result(ctx: RunContext, result: Any | None) -> dict[str, Any]:
    """:func:`transfgu.stages.finish_train` from the final state in ``result.checkpoint`` (a Ray Train ``Result``);
    from the run's ``train/`` when no fit ran (every round was already trained) or it reported no checkpoint."""
    ckpt = getattr(result, "checkpoint", None)
    if ckpt is None:
        return finish_train(ctx)
    with ckpt.as_directory() as d:
        log.info("[train] model from the final Ray checkpoint %s", ckpt.path)
        return finish_train(ctx, state_dir=Path(d))


def _train_body(w: WorkerContext) -> None:
    """One bootstrapping round (epochs up to ``stop_epoch``) of :func:`transfgu.training.train_rounds`."""
    cfg, layout, device = w.cfg, w.layout, w.device
    amp = autocast_dtype(cfg.backbone.precision, device)
    backbone = run_backbone(cfg, layout, device)  # as the one-process executor: compiled on CUDA
    loader = make_train_loader(cfg, layout.label_bank, w.options["bank_hash"], w.rank, w.world,
                               cpus=max(1, int(cfg.ray.cpus_per_worker)))

    def on_epoch(metrics: dict[str, Any]) -> None:
        out = dict(metrics)
        r, e = int(metrics["round"]), int(metrics["epoch"])
        round_dir = layout.round_dir(r)
        if w.rank == 0 and w.options.get("eval_every_epoch") and "val_mIoU" not in metrics:
            dec = build_decoder(cfg, backbone.embed_dim).to(device)
            dec.load_state_dict(load_train_state(round_dir)[0]["student"])
            dec.eval()
            scores, _, _ = evaluate_decoder(cfg, backbone, dec, device, amp)
            out["val_mIoU"] = float(scores["mIoU"])
            out["val_pixel_accuracy"] = float(scores["pixel_accuracy"])
            log.info("[train] round %d epoch %d val mIoU %.4f", r, e + 1, out["val_mIoU"])
        w.report(out, round_dir, f"{round_name(r)}_epoch_{e:03d}")

    # train.select=best_val / validate_every: rank 0 scores the student on val (transfgu.selection).
    validate = Validator(cfg, backbone, device, amp) if w.rank == 0 and validation_wanted(cfg) else None
    train_rounds(cfg, backbone, loader, layout, device, amp, on_epoch=on_epoch, rank=w.rank, wrap=w.wrap,
                 stop_epoch=int(w.options["stop_epoch"]), validate=validate, input_hash=w.input_hash)


def _train_latest_epoch(w: WorkerContext) -> int:
    return last_trained_epoch(w.layout.train, w.input_hash)


def _train_state_dir(w: WorkerContext, info: Mapping[str, Any]) -> Path:
    return w.layout.round_dir(int(info["round"]))


TRAIN_LOOP = RayLoop("train", _train_body, _train_latest_epoch, _train_state_dir)


def run_train_ray(ctx: RunContext, tune: bool = False) -> dict[str, Any]:
    """The Ray executor of the train stage: one TorchTrainer fit per round, then the stage's own
    :func:`transfgu.stages.finish_train` (``model/`` and the manifest info).

    ``tune=True`` (inside a Tune trial) evaluates on val after every epoch and forwards rank 0's reports to Tune.
    """
    cfg = ctx.cfg
    gpu = cluster_has_gpus(cfg)
    n_workers = cfg.ray.num_workers
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
        name = f"{cfg.run.name}-train-{h}" + (f"-round{r:03d}" if cfg.ray.fit_per_round else "")
        result = fit_on_ray(ctx, TRAIN_LOOP, name, tune=tune,
                            options={"stop_epoch": stop, "bank_hash": ctx.hashes["label_bank"],
                                     "eval_every_epoch": bool(tune and has_labelled_val(cfg))})
        last_metrics = dict(result.metrics or {})
        if "loss" in last_metrics:  # worker lines reach the console only with --verbose: say how the round ended
            log.info("[train] round %d: epoch %d/%d loss %.4f%s", r, stop, cfg.train.epochs, last_metrics["loss"],
                     f" val mIoU {last_metrics['val_mIoU']:.4f}" if "val_mIoU" in last_metrics else "")
    out = {**finish_from_result(ctx, result), "workers": n_workers}
    if "val_mIoU" in last_metrics:
        out["val_mIoU"] = float(last_metrics["val_mIoU"])
    return to_jsonable(out)
