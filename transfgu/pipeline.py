"""Orchestration of a run: stage order, input hashes, the manifest, skip-if-done, tracking, the report.

The stages are the run's method's (:class:`transfgu.method.Method`, from the registry :mod:`transfgu.methods`),
each a function ``run(ctx, ex) -> manifest info`` of the run context and an *executor*:
:class:`transfgu.local.LocalExecutor` (one process) or :class:`transfgu.distributed.executor.RayExecutor` (a Ray
cluster). This module does the rest, identically for every method and both executors, so a run directory can be
resumed by either executor (docs/architecture.md).

Every stage is idempotent: it records its input hash in ``_manifest.json`` when it finishes, and a re-run skips
stages whose hash matches, so an interrupted run resumes at the first unfinished stage. Within the per-image
stages, finished Parquet shards are kept as well.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from transfgu import integrity
from transfgu.config import Config, save_config
from transfgu.context import RunContext
from transfgu.layout import RunLayout
from transfgu.local import LocalExecutor
from transfgu.logs import run_log_file, setup_logging
from transfgu.method import Executor, Stage, StageFn
from transfgu.methods import get_method, run_context, stage_hashes
from transfgu.mlflow_model import write_model_card
from transfgu.preflight import preflight
from transfgu.report import write_report
from transfgu.runlock import run_lock
from transfgu.runtime import seed_everything
from transfgu.tracking import PipelineTracker

log = logging.getLogger("transfgu")

__all__ = ["RunContext", "run_pipeline", "stage_hashes"]


def run_pipeline(
    cfg: Config,
    only: Sequence[str] | None = None,
    force: Sequence[str] = (),
    runners: Mapping[str, StageFn] | None = None,
    kind: str = "pipeline",
    tracking_parent: str | None = None,
    checked: bool = False,
    executor: Executor | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage; returns the manifest as a dict.

    The stages are ``cfg.method``'s (:class:`transfgu.method.Method`), run by ``executor`` (default: this process,
    :class:`transfgu.local.LocalExecutor`; the Ray executor passes its own). ``runners`` replaces stage functions by
    name (a Tune trial's cached stages); skip-if-done, the manifest, MLflow and the report stay here.
    With ``mlflow.enabled`` the run is tracked as one parent MLflow run with a child per stage and per bootstrapping
    round (:mod:`transfgu.tracking`), itself a child of ``tracking_parent`` when given (a Tune trial under its
    sweep). ``checked=True``: the caller already ran :func:`transfgu.preflight.preflight`.
    """
    images = None if checked else preflight(cfg)  # fail before any stage writes anything
    with run_lock(cfg.run_dir), run_log_file(RunLayout(cfg.run_dir).log):  # one run per directory, its own log
        return _run_locked(cfg, only, force, runners, kind, tracking_parent, executor, images)


def _run_locked(cfg: Config, only: Sequence[str] | None, force: Sequence[str],
                runners: Mapping[str, StageFn] | None, kind: str, tracking_parent: str | None,
                executor: Executor | None, images: Any) -> dict[str, Any]:
    method = get_method(cfg.method)
    ctx = run_context(cfg)
    setup_logging()
    if images is not None:
        log.info("preflight: images per split %s", images)
    save_config(cfg, ctx.layout.config)
    seed_everything(cfg.run.seed)
    if not ctx.pretrained:
        log.warning("RUN WITHOUT PRETRAINED WEIGHTS: backbone %s is random, so its features, pseudo labels and "
                    "metrics are not the method's; set backbone.weights to a DINO checkpoint for real results",
                    cfg.backbone.arch)
    log.info("run directory %s on %s", ctx.run_dir, ctx.device)
    ex = executor if executor is not None else LocalExecutor()
    tracker = PipelineTracker.from_config(cfg, kind=kind, parent_id=tracking_parent, log_model=method.mlflow_model)
    ctx.tracker = tracker
    selected = [st.name for st in method.stages if only is None or st.name in only]
    all_done = all(n not in force and ctx.manifest.is_done(n, ctx.hashes[n]) for n in selected)
    previous = tracker.finished_run() if all_done else None
    if previous is not None:  # nothing to do: no second MLflow run (nor a second copy of the model) for it
        log.info("[mlflow] every stage is done; run %s already records it", previous)
    else:
        tracker.start()
    try:
        for stage in method.stages:
            if only is not None and stage.name not in only:
                continue
            run = (runners or {}).get(stage.name) or stage.runner(ex.name)
            _run_stage(ctx, stage, run, ex, force=stage.name in force)
        _write_model_card(ctx)
        if cfg.run.report and (only is None or "report" in only):
            with contextlib.suppress(ImportError):  # optional: matplotlib (imported when drawing) may be missing
                write_report(ctx.run_dir)
    except BaseException as exc:
        tracker.finish(ctx.run_dir, status=_run_status(exc))
        raise
    tracker.finish(ctx.run_dir)
    return ctx.manifest.to_dict()


def _run_stage(ctx: RunContext, stage: Stage, run: StageFn, ex: Executor, force: bool) -> None:
    """One stage with skip-if-done, the outputs of other inputs set aside, the manifest record and its MLflow child
    run."""
    name = stage.name
    tracker = ctx.tracker
    assert tracker is not None
    h = ctx.hashes[name]
    if not force and ctx.manifest.is_done(name, h):
        log.info("[%s] already done (input %s); skipping", name, h[:12])
        tracker.stage_run(name, skipped=True, info=ctx.manifest.stage(name).get("extra", {}))
        return
    # outputs of other inputs (all of them with --force) go to _stale/, for every method alike
    integrity.prepare_stage_outputs(ctx.run_dir, name, h, stage.outputs, force=force)
    ctx.manifest.mark_running(name, input_hash=h)
    ctx.stage_run_id = tracker.stage_run(name)
    epoch_log = tracker.epoch_logger(ctx.stage_run_id, prefix=name) if stage.epochs else None
    ctx.on_epoch = epoch_log
    t0 = time.time()
    try:
        info = run(ctx, ex)
    except BaseException as exc:
        ctx.manifest.mark_failed(name, error=f"{type(exc).__name__}: {exc}")
        status = _run_status(exc)
        if epoch_log is not None:
            epoch_log.close(status)
        tracker.end_stage(ctx.stage_run_id, {}, status=status)
        raise
    finally:
        ctx.on_epoch = None
    if epoch_log is not None:
        epoch_log.close()
    info = {**info, "seconds": round(time.time() - t0, 2), "pretrained": ctx.pretrained}
    ctx.manifest.mark_done(name, input_hash=h, **info)
    tracker.end_stage(ctx.stage_run_id, info)
    ctx.stage_run_id = None
    log.info("[%s] done in %.1fs: %s", name, info["seconds"], {k: v for k, v in info.items() if k != "history"})


def _write_model_card(ctx: RunContext) -> None:
    """``model/MODEL_CARD.md`` of a TransFGU run from its records (no model yet: nothing); a card is never worth a
    failed run."""
    if not get_method(ctx.cfg.method).mlflow_model:  # the card describes the model logged to MLflow (TransFGU's)
        return

    try:
        write_model_card(ctx.run_dir)
    except Exception as exc:
        log.warning("could not write the model card: %s: %s", type(exc).__name__, exc)


def _run_status(exc: BaseException) -> str:
    """MLflow status of an interrupted run: KILLED when stopped from outside (Ctrl-C, a Tune early stop)."""
    return "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
