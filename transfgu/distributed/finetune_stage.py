"""The ``finetune`` stage (Leopart's dense fine-tuning, :mod:`transfgu.leopart.finetune_stage`) on Ray Train V2.

One ``TorchTrainer.fit()`` named ``<run>-finetune-<hash>`` (no timestamp: a re-run with the same storage restores
its checkpoint manager) through :func:`transfgu.distributed.fit.fit_on_ray`, as the bootstrapping rounds of
:mod:`transfgu.distributed.train`; this module keeps only the loop body and where its state lives. The worker
loop is the one-process loop, :func:`transfgu.leopart.finetune_stage.finetune`; DDP comes from
``ray.train.torch.prepare_model`` (gloo on CPU, NCCL on GPU).

Checkpoints follow the bootstrapping rules: rank 0 writes ``<run>/finetune/epoch_<e>/`` every epoch and reports that
directory as the Ray checkpoint; a worker that starts without it (a restarted worker on a fresh node, no shared disk)
restores it from ``ray.train.get_checkpoint()`` when it is of the same input hash and newer than what the node has.
``FailureConfig(max_failures=1)``: a killed worker is restarted once and resumes from the last epoch's state. Every
epoch all ranks call ``ray.train.report`` (a barrier in V2); rank 0 logs the epoch to MLflow.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transfgu.checkpoint import read_state_info
from transfgu.context import RunContext
from transfgu.distributed.fit import RayLoop, WorkerContext, fit_on_ray
from transfgu.errors import CollectedErrors, ErrorLog
from transfgu.leopart import finetune_stage as ftt
from transfgu.runtime import load_run_backbone
from transfgu.store import to_jsonable

log = logging.getLogger(__name__)


def _out(w: WorkerContext) -> Path:
    return w.layout.root / "finetune"


def _finetune_body(w: WorkerContext) -> None:
    """Every (remaining) epoch of :func:`transfgu.leopart.finetune_stage.finetune`."""
    cfg, out = w.cfg, _out(w)
    errors = ErrorLog(w.layout.errors) if w.rank == 0 else CollectedErrors()  # rank 0 records skipped images
    images, _ = ftt.decode_training_images(cfg, errors)
    backbone = load_run_backbone(cfg.backbone, w.layout, cfg.run.seed).to(w.device)

    def on_epoch(metrics: dict[str, Any]) -> None:
        e = int(metrics["epoch"])
        w.report(metrics, ftt.state_dir(out, e), f"finetune_epoch_{e:03d}")

    ftt.finetune(cfg, backbone, images, out, w.input_hash, w.device, rank=w.rank, world=w.world, wrap=w.wrap,
                 on_epoch=on_epoch, source=w.options["source"])


def _finetune_latest_epoch(w: WorkerContext) -> int:
    have = ftt.latest_state(_out(w), w.input_hash)
    info = read_state_info(have) if have is not None else None
    return int(info["epoch"]) if info is not None else -1


def _finetune_state_dir(w: WorkerContext, info: Mapping[str, Any]) -> Path:
    return ftt.state_dir(_out(w), int(info["epoch"]))


FINETUNE_LOOP = RayLoop("finetune", _finetune_body, _finetune_latest_epoch, _finetune_state_dir)


def run_finetune_ray(ctx: RunContext) -> dict[str, Any]:
    """The Ray executor of the finetune stage: one TorchTrainer fit over every epoch (:func:`fit_on_ray`)."""
    cfg = ctx.cfg
    out = ctx.run_dir / "finetune"
    h = ctx.hashes["finetune"]
    done = (out / ftt.INFO_FILE).is_file() and (out / ftt.BACKBONE_OUT).is_file()
    latest = ftt.latest_state(out, h)
    if not (done and latest is not None and int(read_state_info(latest)["epoch"]) >= cfg.finetune.epochs - 1):
        fit_on_ray(ctx, FINETUNE_LOOP, f"{cfg.run.name}-finetune-{h[:10]}", num_workers=max(1, cfg.ray.num_workers),
                   options={"source": ftt.source_record(cfg)})
    return to_jsonable({**ftt.finish_info(out), "workers": max(1, cfg.ray.num_workers)})

