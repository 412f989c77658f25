"""Ray Tune sweeps over K, the beta set, omega1/omega2 and lr, with ASHA (issue 4 item 6).

Each trial is a *driver function* (the Train V2 pattern: ``Tuner(trainable=function)``, never ``Tuner(trainer)``)
that runs the Ray pipeline for its config: Ray Data extraction, distributed k-means, the label-bank pool, then one
``TorchTrainer`` whose rank 0 reports ``val_mIoU`` once per epoch (one ASHA rung step per report), then evaluation.

Shared stages: a trial's stage outputs live in ``<sweep>/cache/<stage>-<input hash>/`` and the trial's run directory
links to them, so trials with the same betas (same extract hash) reuse the features and trials with the same betas
and K (same concepts and label-bank hashes) reuse the concepts and the label bank. A per-key file lock makes a trial
wait while another computes the same key; a ``_done.json`` marks a finished key.

MLflow: a parent run ``sweep <name>`` (tagged ``sweep=<name>``) with one child per trial (itself the parent of the
trial's stage runs); the best trial's config and metric are logged on the sweep run at the end and its model is
registered as ``<method>-<sweep name>``. Trials that ASHA stopped are killed by Tune before their runs can end: the
sweep ends those runs (and their running children) as KILLED with a ``stop_reason`` tag, so no run stays RUNNING.

Without labels there is no mIoU: sweep on ``train/loss`` of the last round (``metric="loss", mode="min"``), or
better, fix the settings from a labelled stand-in data set and only sweep the cheap ones (K) by inspection of the
report's concept galleries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from transfgu.config import Config
from transfgu.context import RunContext
from transfgu.distributed.cluster import init_ray, worker_config
from transfgu.distributed.executor import RayExecutor
from transfgu.distributed.pipeline import prepare_run_dir
from transfgu.distributed.train import run_train_ray
from transfgu.layout import RunLayout
from transfgu.logs import setup_logging
from transfgu.method import Executor, StageFn
from transfgu.methods import get_method
from transfgu.mlflow_model import default_registered_name, register_logged_model
from transfgu.paths import check_name, default_storage
from transfgu.pipeline import run_pipeline
from transfgu.store.atomic import atomic_write_json, to_jsonable
from transfgu.tracking import Tracker, config_params, resolve_tracking_uri, run_tags

log = logging.getLogger(__name__)

#: Short names of the swept settings -> config keys (``K`` sets ``concepts.k_per_pool``).
SWEEP_KEYS = {"betas": "crops.betas", "w_div": "train.w_div", "w_unc": "train.w_unc", "lr": "train.lr"}
#: The stages whose outputs trials share.
SHARED_STAGES = ("extract", "concepts", "label_bank")


def apply_trial(base: Config, params: Mapping[str, Any], run_root: Path, name: str) -> Config:
    """The trial's config: ``base`` with the sampled values, its run directory, and the sweep's MLflow store."""
    d = base.model_dump(mode="json")
    for key, value in params.items():
        if key == "K":
            pools = list(d["concepts"]["k_per_pool"])
            if isinstance(value, Mapping):
                d["concepts"]["k_per_pool"] = {str(k): int(v) for k, v in value.items()}
            elif len(pools) == 1:
                d["concepts"]["k_per_pool"] = {pools[0]: int(value)}
            else:
                raise ValueError(f"K={value!r}: the config has pools {pools}; give K as a dict per pool")
            continue
        path = SWEEP_KEYS.get(key, key).split(".")
        node = d
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = list(value) if isinstance(value, tuple) else value
    d["run"]["root"] = str(run_root)
    d["run"]["name"] = name
    d["mlflow"]["tracking_uri"] = resolve_tracking_uri(base)
    return Config.model_validate(d)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (works across processes on one machine and on NFS with lock support)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_stage(stage: str, runner: StageFn, cache_root: Path) -> StageFn:
    """Wrap a stage runner so that its output directory is shared by every trial with the same input hash."""
    assert stage in SHARED_STAGES, stage

    def run(ctx: RunContext, ex: Executor) -> dict[str, Any]:
        key = f"{stage}-{ctx.hashes[stage][:16]}"
        shared = RunLayout(cache_root / key)
        shared.output(stage).mkdir(parents=True, exist_ok=True)
        link = ctx.layout.output(stage)
        if link.is_symlink() or not link.exists():
            if link.is_symlink():
                link.unlink()
            link.symlink_to(shared.output(stage).resolve(), target_is_directory=True)
        done = shared.cache_done
        with file_lock(cache_root / f".{key}.lock"):
            if done.is_file():
                info = json.loads(done.read_text())
                log.info("[%s] reusing %s (computed by %s)", stage, shared.root, info.get("computed_by"))
                return {**info, "reused": True}
            info = runner(ctx, ex)
            atomic_write_json(done, {**info, "computed_by": ctx.cfg.run.name})
        return {**info, "reused": False}

    return run


def trial_driver(params: dict[str, Any], base: dict[str, Any], sweep_dir: str, parent_run_id: str | None) -> None:
    """The Tune trainable: the whole Ray pipeline of one trial, reporting val mIoU every epoch."""
    import ray.tune

    setup_logging(worker=True)
    trial = ray.tune.get_context().get_trial_name() or ray.tune.get_context().get_trial_id()
    root = Path(sweep_dir)
    cfg = apply_trial(Config.model_validate(base), params, root / "trials", trial)
    cache = root / "cache"
    ex = RayExecutor(cfg)
    method = get_method(cfg.method)
    runners: dict[str, StageFn] = {s: cached_stage(s, method.stage(s).runner(ex.name), cache) for s in SHARED_STAGES}
    runners["train"] = lambda ctx, ex: run_train_ray(ctx, tune=True)
    prepare_run_dir(cfg)
    run_pipeline(cfg, runners=runners, kind="trial", tracking_parent=parent_run_id, executor=ex)


def default_space(cfg: Config) -> dict[str, Any]:
    """A small default search space around the config (Tune domain objects stay out of the pydantic model)."""
    from ray import tune

    k = cfg.concepts.k
    pools = list(cfg.concepts.k_per_pool)
    ks = [max(1, k - 2), k, k + 3] if len(pools) == 1 else [dict(cfg.concepts.k_per_pool)]
    return {
        "K": tune.choice(ks),
        "betas": tune.choice([list(cfg.crops.betas), list(cfg.crops.betas)[:2]]),
        "w_div": tune.uniform(0.5, 1.5),
        "w_unc": tune.uniform(0.1, 0.5),
        "lr": tune.loguniform(cfg.train.lr / 3, cfg.train.lr * 3),
    }


def trial_resources(cfg: Config, cluster: Mapping[str, float]) -> dict[str, float]:
    """Resources of one trial's driver function: its CPUs, plus a sliver of the head's ``TRAIN_DRIVER`` resource when
    the cluster defines it (cluster.yaml), so drivers run on the on-demand head, never on spot GPU nodes."""
    res = {"cpu": float(cfg.ray.trial_cpus)}
    if cluster.get("TRAIN_DRIVER", 0) > 0:
        res["TRAIN_DRIVER"] = 0.01
    return res


def auto_concurrency(cfg: Config, cluster: Mapping[str, float], num_samples: int) -> int:
    """Trials that fit side by side: one per GPU when the trial trains on GPUs, else by CPUs (a trial's Train workers
    plus its driver); at least 1, at most ``num_samples``. Counts the cluster's resources now (an autoscaling cluster
    grows; Tune then queues the rest)."""
    workers = max(1, int(cfg.ray.num_workers))
    if cfg.ray.use_gpu is True and cluster.get("GPU", 0) > 0:
        fit = int(cluster["GPU"] // workers)
    else:
        per_trial = workers * float(cfg.ray.cpus_per_worker) + float(cfg.ray.trial_cpus)
        fit = int(cluster.get("CPU", 1) // per_trial)
    return max(1, min(int(num_samples), fit))


def run_sweep(
    cfg: Config,
    space: Mapping[str, Any] | None = None,
    name: str = "sweep",
    num_samples: int = 4,
    max_concurrent: int = 0,
    metric: str = "val_mIoU",
    mode: str = "max",
    grace_period: int = 1,
    reduction_factor: int = 2,
) -> dict[str, Any]:
    """Run a sweep; returns ``{"best_config", "best_metric", "trials", "sweep_dir", "mlflow_run_id", ...}``.

    Trials share ``<run.root>/<name>/cache``; ``grace_period`` epochs run before ASHA may stop a trial
    (``grace_period = train.epochs`` disables early stopping). ``max_concurrent=0`` sizes concurrency from the
    cluster (:func:`auto_concurrency`). A trial that fails (a spot node lost) is retried twice from its last report;
    re-running the same sweep ``name`` resumes it with ``Tuner.restore`` instead of starting the search again.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    check_name(name, "the sweep name (--name)")  # <run.root>/<name>: never a path out of the run root
    setup_logging()
    init_ray(cfg)
    sweep_dir = (Path(cfg.run.root) / name).resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    space = dict(space if space is not None else default_space(cfg))
    tracker = Tracker.from_config(cfg)
    storage = default_storage(cfg.ray.storage_path, sweep_dir / "ray_results", sweep_dir)
    experiment = f"{storage.rstrip('/')}/{name}"
    restoring = tune.Tuner.can_restore(experiment)
    parent = None
    if tracker is not None:
        tags = {**run_tags(cfg, "sweep"), "pipeline_stage": "tune", "run_name": name, "sweep": name,
                "run_dir": str(sweep_dir)}
        parent = _previous_sweep_run(tracker, sweep_dir) if restoring else None
        if parent is not None:  # a resumed sweep goes on in its run
            tracker.client.update_run(parent, status="RUNNING")
        else:
            parent = tracker.start_run(f"sweep {name}", tags=tags)
            tracker.log_params(parent, {f"base.{k}": v for k, v in config_params(cfg).items()})
            tracker.log_dict(parent, {k: repr(v) for k, v in space.items()}, "sweep/space.json")
    import ray

    resources = ray.cluster_resources()
    concurrent = max_concurrent or auto_concurrency(cfg, resources, num_samples)
    trainable = tune.with_resources(
        tune.with_parameters(trial_driver, base=worker_config(cfg), sweep_dir=str(sweep_dir),
                             parent_run_id=parent),
        trial_resources(cfg, resources),
    )
    if restoring:
        log.info("[tune] resuming sweep %r from %s (finished trials are kept, errored ones retried)", name, experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=num_samples, max_concurrent_trials=concurrent,
                # max_t one past the last report: a trial that survives every rung ends by itself (and evaluates)
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs + 1,
                                        grace_period=min(grace_period, cfg.train.epochs),
                                        reduction_factor=reduction_factor),
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      failure_config=tune.FailureConfig(max_failures=2)),
        )
    log.info("[tune] sweep %r: %d samples, up to %d trials at once, trial resources %s", name, num_samples,
             concurrent, trial_resources(cfg, resources))
    try:
        grid = tuner.fit()
        best = grid.get_best_result(metric=metric, mode=mode)
    except BaseException:
        if tracker is not None and parent is not None:
            close_trial_runs(tracker, parent, None, cfg.train.epochs)
            tracker.end_run(parent, "FAILED")
        raise
    best_params = {k: best.config[k] for k in space if k in best.config}
    best_metric = float(best.metrics.get(metric, float("nan"))) if best.metrics else float("nan")
    best_dir = _trial_run_dir(sweep_dir, (best.metrics or {}).get("trial_id"))
    registered = None
    if tracker is not None and parent is not None:
        close_trial_runs(tracker, parent, list(grid), cfg.train.epochs)
        tracker.log_params(parent, {f"best.{k}": v for k, v in best_params.items()})
        tracker.log_metrics(parent, {f"best_{metric}": best_metric})
        tracker.log_dict(parent, {"params": to_jsonable(best_params), metric: best_metric}, "sweep/best.json")
        if best_dir is not None and cfg.mlflow.log_model and cfg.mlflow.registered_model != "":
            registered = _register_trial_model(tracker, parent, Path(best_dir).name,
                                               cfg.mlflow.registered_model or default_registered_name(cfg.method, name))
        tracker.end_run(parent, "FINISHED")
    summary = {
        "best_config": to_jsonable(best_params),
        "best_metric": best_metric,
        "trials": len(grid),
        "errors": len(grid.errors),
        "sweep_dir": str(sweep_dir),
        "mlflow_run_id": parent,
        "best_run_dir": best_dir,
        "best_trial": Path(best_dir).name if best_dir else None,
        "registered_model": registered,
        "max_concurrent": concurrent,
    }
    atomic_write_json(sweep_dir / "best.json", summary)
    log.info("[tune] best %s = %.4f with %s", metric, best_metric, summary["best_config"])
    return summary


def _trial_run_dir(sweep_dir: Path, trial_id: str | None) -> str | None:
    """The run directory of a trial (named after Tune's trial name, which ends with its id)."""
    if not trial_id:
        return None
    found = sorted((sweep_dir / "trials").glob(f"*{trial_id}"))
    return str(found[0]) if found else None


def best_trial_config(cfg: Config, summary: Mapping[str, Any]) -> Config | None:
    """The config of the sweep's best trial (its run directory, metrics, report and model), from :func:`run_sweep`'s
    summary; None when no trial finished."""
    if not summary.get("best_trial"):
        return None
    return apply_trial(cfg, summary["best_config"], Path(summary["sweep_dir"]) / "trials", summary["best_trial"])


def _previous_sweep_run(tracker: Tracker, sweep_dir: Path) -> str | None:
    """The MLflow run of an earlier session of the sweep in ``sweep_dir`` (resumed with ``Tuner.restore``)."""
    if "'" in str(sweep_dir):
        return None
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.kind = 'sweep' and tags.run_dir = '{sweep_dir}'",
                                      max_results=1, order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _descendants(tracker: Tracker, run_id: str) -> list[Any]:
    out, todo = [], [run_id]
    while todo:
        rid = todo.pop()
        kids = tracker.client.search_runs([tracker.experiment_id],
                                          filter_string=f"tags.`mlflow.parentRunId` = '{rid}'", max_results=1000)
        out.extend(kids)
        todo.extend(k.info.run_id for k in kids)
    return out


def close_trial_runs(tracker: Tracker, sweep_run_id: str, results: list[Any] | None, epochs: int) -> list[str]:
    """End every run of the sweep that is still RUNNING: a trial that ASHA stopped (Tune kills its process, so its
    runs cannot end themselves) and the stage and round runs under it become KILLED with a ``stop_reason`` tag.
    ``results``: Tune's results (None when the sweep itself failed). Returns the ids of the runs it ended."""
    by_trial = {}
    for res in results or []:
        trial_id = (res.metrics or {}).get("trial_id")
        if trial_id:
            by_trial[str(trial_id)] = res
    ended: list[str] = []
    for trial_run in _descendants_of_kind(tracker, sweep_run_id):
        res = next((r for t, r in by_trial.items() if trial_run.data.tags.get("run_name", "").endswith(t)), None)
        done = int(((res.metrics or {}) if res is not None else {}).get("training_iteration", 0))
        status = "KILLED"
        if res is None:
            reason = "the sweep stopped before the trial ended"
        elif res.error is not None:
            reason, status = f"the trial failed: {type(res.error).__name__}", "FAILED"
        elif done < epochs:
            reason = f"stopped early by the ASHA scheduler after {done} of {epochs} epochs"
        else:  # the trial ended in a later attempt (Tune retries a trial whose process died)
            reason, status = "an attempt of the trial that died; the trial was retried", "FAILED"
        stuck = [r for r in [trial_run, *_descendants(tracker, trial_run.info.run_id)] if r.info.status == "RUNNING"]
        for r in stuck:
            tracker.set_tags(r.info.run_id, {"stop_reason": reason})
            tracker.end_run(r.info.run_id, status)
            ended.append(r.info.run_id)
    if ended:
        log.info("[tune] ended %d MLflow runs of stopped trials", len(ended))
    return ended


def _descendants_of_kind(tracker: Tracker, sweep_run_id: str) -> list[Any]:
    """The trial runs (direct children) of a sweep run."""
    return tracker.client.search_runs([tracker.experiment_id],
                                      filter_string=f"tags.`mlflow.parentRunId` = '{sweep_run_id}'", max_results=1000)


def _register_trial_model(tracker: Tracker, sweep_run_id: str, trial: str, registered: str) -> str | None:
    """Register the model the best trial logged under ``registered``; returns ``<name>/<version>`` (None: no model)."""
    trial_runs = [r for r in _descendants_of_kind(tracker, sweep_run_id) if r.data.tags.get("run_name") == trial]
    if not trial_runs:
        return None
    models = tracker.client.search_logged_models(
        experiment_ids=[tracker.experiment_id], filter_string=f"source_run_id = '{trial_runs[0].info.run_id}'")
    if not models:
        return None
    try:
        return register_logged_model(tracker.tracking_uri, models[0].model_id, registered)
    except Exception as exc:  # the sweep's results stand without a registry entry
        log.warning("[mlflow] could not register the best trial's model: %s: %s", type(exc).__name__, exc)
        return None
