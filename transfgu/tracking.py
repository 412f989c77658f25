"""MLflow tracking of pipeline runs and sweeps (no Ray import here: the one-process pipeline uses it too).

Store: ``sqlite:///<run.root>/mlflow.db`` with artifacts under ``<run.root>/mlartifacts`` unless ``mlflow.tracking_uri``
or ``MLFLOW_TRACKING_URI`` names another store (e.g. ``http://mlflow-server:5000`` on a cluster). MLflow >= 3.13
refuses the old ``./mlruns`` file store, and a SQLite file needs no server.

Run tree (a parent run per pipeline, nested child runs per stage and round)::

    pipeline <run.name>               params = Config.flat(), tag pretrained, artifacts: config, eval, report PNGs
      ├─ stage extract / concepts / label_bank / train / evaluate   (tag skipped=true when resumed past)
      │    └─ (train) round=<r>       metrics per epoch, step = epoch
    sweep <name>                      best config + best metric logged at the end
      └─ trial <id>                   params = the trial's flattened config, metrics per epoch

Every call goes through :class:`mlflow.MlflowClient` with explicit run ids, never the fluent API: the fluent active
run is thread-local and process-local, and Ray workers (Train rank 0, Tune trials) log into runs created elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transfgu.config import Config
from transfgu.data.loaders import split_records
from transfgu.layout import RunLayout
from transfgu.mlflow_model import default_registered_name, log_model
from transfgu.quality import mlflow_metrics
from transfgu.store.manifest import config_hash

log = logging.getLogger(__name__)

_PARAM_BATCH = 100  # MLflow's log_batch limit for params
# The experiment type of MLflow's own API; UIs that key their layout on it open the experiment on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: What the MLflow UI (3.17) reads to choose an experiment's view: the ``workflowType`` query parameter of the page's
#: URL, else the browser's stored position of the "GenAI | Model training" switch, else ``genai`` (the traces
#: "Overview" page). The experiment's kind tag is not consulted, so the link we print carries the parameter.
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
#: Where ``mlflow ui`` listens unless told otherwise.
UI_DEFAULT = "http://127.0.0.1:5000"
_PARAM_VALUE_MAX = 6000


def resolve_tracking_uri(cfg: Config) -> str:
    """``mlflow.tracking_uri`` if set, else ``MLFLOW_TRACKING_URI``, else a SQLite file in the run root."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(cfg.run.root).resolve() / 'mlflow.db').as_posix()}"


def _is_local_sqlite(uri: str) -> bool:
    return uri.startswith("sqlite:///")


def experiment_ui_url(ui: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs (``ui``: the server's base URL)."""
    return f"{ui.rstrip('/')}/#/experiments/{experiment_id}/runs?{UI_WORKFLOW_QUERY}"


def find_experiment_id(tracking_uri: str, name: str) -> str | None:
    """The id of experiment ``name`` in a store, None when the store or the experiment does not exist (a local
    SQLite file is never created by asking; a server that does not answer is not retried)."""
    if _is_local_sqlite(tracking_uri) and not Path(tracking_uri[len("sqlite:///"):]).is_file():
        return None
    from unittest import mock

    from mlflow import MlflowClient

    try:
        with mock.patch.dict(os.environ, {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                                          "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}):
            exp = MlflowClient(tracking_uri).get_experiment_by_name(name)
    except Exception as exc:
        log.debug("[mlflow] experiment %r not found in %s: %s", name, tracking_uri, exc)
        return None
    return None if exp is None else str(exp.experiment_id)


def ui_lines(cfg: Config) -> list[tuple[str, str]]:
    """``(label, text)`` lines that tell a user how to look at the run's experiment in the MLflow UI: the command that
    starts the UI on a local store, and the URL of the experiment's training runs."""
    uri = resolve_tracking_uri(cfg)
    lines: list[tuple[str, str]] = []
    if _is_local_sqlite(uri):
        lines.append(("mlflow ui:", f"mlflow ui --backend-store-uri {uri}"))
        base = UI_DEFAULT
    elif uri.startswith(("http://", "https://")):
        base = uri
    else:
        return lines
    exp_id = find_experiment_id(uri, cfg.mlflow.experiment)
    if exp_id is not None:
        lines.append(("mlflow runs:", experiment_ui_url(base, exp_id)))
    return lines


def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


@dataclass(frozen=True)
class TrackerSpec:
    """What a remote process needs to log into an existing run tree (plain data: crosses the Ray boundary)."""

    tracking_uri: str
    experiment_id: str

    def to_dict(self) -> dict[str, str]:
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id}

    @classmethod
    def from_dict(cls, d: Mapping[str, str]) -> TrackerSpec:
        return cls(tracking_uri=d["tracking_uri"], experiment_id=d["experiment_id"])


class Tracker:
    """A thin, process-safe wrapper of :class:`mlflow.MlflowClient` bound to one experiment."""

    def __init__(self, tracking_uri: str, experiment: str | None = None, experiment_id: str | None = None,
                 artifact_location: str | None = None) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        if _is_local_sqlite(tracking_uri):
            Path(tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        if experiment_id is None:
            if experiment is None:
                raise ValueError("give an experiment name or id")
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
                except Exception:  # another process created it meanwhile
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    experiment_id = exp.experiment_id
            else:
                experiment_id = exp.experiment_id
        self.experiment_id = str(experiment_id)
        if experiment is not None:
            self._mark_model_training()

    def _mark_model_training(self) -> None:
        """Tag the experiment as model training, so ``mlflow ui`` opens on its runs rather than on the (empty)
        GenAI traces overview. A kind already chosen in the UI is left alone."""
        try:
            exp = self.client.get_experiment(self.experiment_id)
            if EXPERIMENT_KIND_TAG not in (exp.tags or {}):
                self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        except Exception as exc:  # a read-only or older server: the runs still log
            log.warning("[mlflow] could not tag the experiment kind: %s", exc)

    @classmethod
    def from_config(cls, cfg: Config) -> Tracker | None:
        """The run's tracker, or None when ``mlflow.enabled`` is false."""
        if not cfg.mlflow.enabled:
            return None
        uri = resolve_tracking_uri(cfg)
        artifacts = None
        if _is_local_sqlite(uri):
            artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
        return cls(uri, experiment=cfg.mlflow.experiment, artifact_location=artifacts)

    @classmethod
    def from_spec(cls, spec: TrackerSpec | Mapping[str, str]) -> Tracker:
        if not isinstance(spec, TrackerSpec):
            spec = TrackerSpec.from_dict(spec)
        return cls(spec.tracking_uri, experiment_id=spec.experiment_id)

    @property
    def spec(self) -> TrackerSpec:
        return TrackerSpec(self.tracking_uri, self.experiment_id)

    # -- runs ----------------------------------------------------------------------------------------------------
    def start_run(self, name: str, parent_id: str | None = None, tags: Mapping[str, Any] | None = None) -> str:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_id is not None:
            all_tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, tags=all_tags, run_name=name)
        return run.info.run_id

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), _param_value(v)) for k, v in params.items()]
        for i in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(run_id, params=items[i : i + _PARAM_BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(str(k), float(v), ts, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        if items:
            self.client.log_batch(run_id, metrics=items)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(run_id, str(path), artifact_path)
        elif path.is_file():
            self.client.log_artifact(run_id, str(path), artifact_path)

    def log_dict(self, run_id: str, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, obj, artifact_file)

    @contextlib.contextmanager
    def run(self, name: str, parent_id: str | None = None, tags: Mapping[str, Any] | None = None) -> Iterator[str]:
        """A run that ends FINISHED, or FAILED when the block raises."""
        run_id = self.start_run(name, parent_id, tags)
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, "FAILED")
            raise
        self.end_run(run_id, "FINISHED")


def _param_value(v: Any) -> str:
    s = str(v)
    return s if len(s) <= _PARAM_VALUE_MAX else s[: _PARAM_VALUE_MAX - 3] + "..."


def run_tags(cfg: Config, kind: str) -> dict[str, str]:
    """Tags every run of a pipeline carries (kind, backbone, data set, config hash, git sha: searchable)."""
    tags = {
        "kind": kind,
        "pretrained": str(cfg.backbone.source.pretrained).lower(),
        "prior": cfg.backbone.source.prior,
        "backbone": cfg.backbone.arch,
        "dataset": cfg.data.name,
        "run_name": cfg.run.name,
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "config_hash": config_hash(cfg.model_dump(mode="json"))[:16],
    }
    sha = _git_sha()
    if sha:
        tags["git_sha"] = sha
        tags["mlflow.source.git.commit"] = sha
    # The UI's "Source" column: the entry point that started the run (ray_jobs/x.py, the transfgu CLI, pytest...).
    tags["mlflow.source.name"] = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    tags["mlflow.source.type"] = "JOB" if os.environ.get("RAY_JOB_SUBMISSION_ID") else "LOCAL"
    job = os.environ.get("RAY_JOB_SUBMISSION_ID") or os.environ.get("RAY_JOB_ID")
    if job:
        tags["ray_job_submission_id"] = job
    return tags


def config_params(cfg: Config) -> dict[str, Any]:
    """The flattened config plus ``pretrained``, which every run states (its numbers mean nothing without it)."""
    return {**cfg.flat(), "pretrained": cfg.backbone.source.pretrained}


class EpochLogger:
    """``on_epoch(metrics)`` callback: one child run per bootstrapping round under a stage run, step = epoch.

    Built from a :class:`TrackerSpec` so that Ray Train's rank 0 can log into the driver's run tree.
    """

    def __init__(self, spec: TrackerSpec | Mapping[str, str], stage_run_id: str, prefix: str = "train",
                 tags: Mapping[str, Any] | None = None) -> None:
        self.tracker = Tracker.from_spec(spec)
        self.stage_run_id = stage_run_id
        self.prefix = prefix
        self.tags = dict(tags or {})
        self.round: int | None = None
        self.round_run_id: str | None = None

    def __call__(self, metrics: Mapping[str, Any]) -> None:
        r = int(metrics.get("round", 0))
        if r != self.round:
            self.close()
            self.round = r
            self.round_run_id = self.tracker.start_run(
                f"{self.prefix}/round={r}", parent_id=self.stage_run_id,
                tags={**self.tags, "pipeline_stage": "train", "round": r},
            )
        step = int(metrics.get("epoch", 0))
        m = {f"{self.prefix}/{k}": v for k, v in metrics.items() if k not in ("epoch", "round")}
        self.tracker.log_metrics(self.round_run_id, m, step=step)
        self.tracker.log_metrics(self.stage_run_id, m, step=step)

    def close(self, status: str = "FINISHED") -> None:
        if self.round_run_id is not None:
            self.tracker.end_run(self.round_run_id, status)
            self.round_run_id = None


def chain(*callbacks: Callable[[Mapping[str, Any]], None] | None) -> Callable[[Mapping[str, Any]], None] | None:
    """Call several ``on_epoch`` callbacks in order (None entries are dropped)."""
    cbs = [c for c in callbacks if c is not None]
    if not cbs:
        return None

    def call(metrics: Mapping[str, Any]) -> None:
        for c in cbs:
            c(metrics)

    return call


class PipelineTracker:
    """The MLflow side of one pipeline run: a parent run, a child per stage, per-round runs under train.

    Every method is a no-op when tracking is disabled (``tracker is None``), so callers need no ``if``.
    """

    def __init__(self, cfg: Config, tracker: Tracker | None, kind: str = "pipeline",
                 parent_id: str | None = None, log_model: bool = False) -> None:
        self.cfg = cfg
        self.log_model = log_model  # the method's model/ is an MLflow pyfunc (transfgu.method.Method.mlflow_model)
        self.tracker = tracker
        self.kind = kind
        self.parent_of_root = parent_id
        self.run_id: str | None = None
        self._monitors: dict[str, Any] = {}

    @classmethod
    def from_config(cls, cfg: Config, kind: str = "pipeline", parent_id: str | None = None,
                    log_model: bool = False) -> PipelineTracker:
        return cls(cfg, Tracker.from_config(cfg), kind, parent_id, log_model)

    @property
    def enabled(self) -> bool:
        return self.tracker is not None

    @property
    def spec(self) -> TrackerSpec | None:
        return self.tracker.spec if self.tracker is not None else None

    def registered_name(self) -> str | None:
        """The registry name of the run's model: ``mlflow.registered_model``, by default ``<method>-<run.name>``;
        None for ``""`` and for a sweep's trials (the sweep registers its best trial's model)."""
        name = self.cfg.mlflow.registered_model
        if name is None:
            return None if self.kind == "trial" else default_registered_name(self.cfg.method, self.cfg.run.name)
        return name or None

    def finished_run(self) -> str | None:
        """The id of a FINISHED run of this kind that already records this run directory with this config (what a
        re-run whose stages all skip would only repeat), else None."""
        if self.tracker is None:
            return None
        tags = run_tags(self.cfg, self.kind)
        query = " and ".join(f"tags.{k} = '{tags[k]}'" for k in ("kind", "run_dir", "config_hash")
                             if "'" not in tags[k])
        try:
            runs = self.tracker.client.search_runs(
                [self.tracker.experiment_id], filter_string=f"{query} and attributes.status = 'FINISHED'",
                max_results=1, order_by=["attributes.start_time DESC"])
        except Exception as exc:  # a store that cannot answer: track the run as a new one
            log.debug("[mlflow] no search for a previous run: %s", exc)
            return None
        return runs[0].info.run_id if runs else None

    def start(self, name: str | None = None, tags: Mapping[str, Any] | None = None) -> str | None:
        if self.tracker is None:
            return None
        self.run_id = self.tracker.start_run(
            name or f"{self.kind} {self.cfg.run.name}", parent_id=self.parent_of_root,
            tags={**run_tags(self.cfg, self.kind), **(tags or {})},
        )
        self.tracker.log_params(self.run_id, config_params(self.cfg))
        self.tracker.log_dict(self.run_id, self.cfg.model_dump(mode="json"), "config/config.json")
        _best_effort("dataset inputs", log_dataset_inputs, self.tracker, self.run_id, self.cfg)
        # No system-metrics sampler on the parent: its stage runs have theirs, and MLflow copies the parent's metrics
        # onto the model logged there.
        log.info("[mlflow] %s run %s in %s", self.kind, self.run_id, self.tracker.tracking_uri)
        return self.run_id

    def _monitor(self, run_id: str) -> None:
        """System metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) sampled into ``run_id``."""
        if self.tracker is None or not self.cfg.mlflow.system_metrics:
            return
        mon = _best_effort("system metrics", start_system_metrics, self.tracker.tracking_uri, run_id,
                           self.cfg.mlflow.system_metrics_interval)
        if mon is not None:
            self._monitors[run_id] = mon

    def _stop_monitor(self, run_id: str | None) -> None:
        mon = self._monitors.pop(run_id, None) if run_id is not None else None
        if mon is not None:
            _best_effort("system metrics", mon.finish)

    def stage_run(self, stage: str, skipped: bool = False, info: Mapping[str, Any] | None = None) -> str | None:
        """Open the child run of a stage (closed with :meth:`end_stage`); a skipped stage is opened and closed."""
        if self.tracker is None or self.run_id is None:
            return None
        rid = self.tracker.start_run(
            f"stage {stage}", parent_id=self.run_id,
            tags={"pipeline_stage": stage, "skipped": str(skipped).lower(),
                  "pretrained": str(self.cfg.backbone.source.pretrained).lower()},
        )
        if skipped:
            self.end_stage(rid, info or {})
        else:
            self._monitor(rid)
        return rid

    def end_stage(self, run_id: str | None, info: Mapping[str, Any], status: str = "FINISHED") -> None:
        if self.tracker is None or run_id is None:
            return
        self._stop_monitor(run_id)
        self.tracker.log_metrics(run_id, _numeric(info))
        self.tracker.end_run(run_id, status)

    def epoch_logger(self, stage_run_id: str | None, prefix: str = "train") -> EpochLogger | None:
        if self.tracker is None or stage_run_id is None:
            return None
        return EpochLogger(self.tracker.spec, stage_run_id, prefix=prefix)

    def finish(self, run_dir: Path | None, status: str = "FINISHED") -> None:
        """Final metrics and artifacts on the parent run, then close it."""
        if self.tracker is None or self.run_id is None:
            return
        if run_dir is not None:
            model_dir = RunLayout(run_dir).model
            model_id = None
            # the MLflow pyfunc wraps the checkpoints of the methods that say so (TransFGU's; a Leopart model is
            # served by transfgu predict); logged before the run's metrics, which are then linked to it with their
            # data set
            if (status == "FINISHED" and self.cfg.mlflow.log_model and self.log_model
                    and RunLayout(run_dir).model_json.is_file()):
                info = _best_effort("the model", log_model, self.tracker.tracking_uri, self.run_id, model_dir,
                                    self.registered_name())
                model_id = getattr(info, "model_id", None)
            try:
                log_run_artifacts(self.tracker, self.run_id, Path(run_dir), model_id=model_id,
                                  dataset=_best_effort("the evaluation data set", eval_dataset, self.cfg))
            except Exception as exc:  # artifacts are a convenience; never fail a finished pipeline on them
                log.warning("[mlflow] could not log artifacts: %s", exc)
        for rid in list(self._monitors):
            self._stop_monitor(rid)
        self.tracker.end_run(self.run_id, status)


def _best_effort(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Tracking extras must never fail a pipeline whose work is done: log and carry on."""
    try:
        return fn(*args)
    except Exception as exc:
        log.warning("[mlflow] could not log %s: %s: %s", what, type(exc).__name__, exc)
        return None


def start_system_metrics(tracking_uri: str, run_id: str, interval: float) -> Any:
    """Start MLflow's system-metrics sampler for ``run_id`` (a thread; ``.finish()`` stops it).

    MLflow's sampler publishes a sample only after a whole ``interval``: a stage shorter than that (a skipped-fast
    stage, a tiny run) would end with no ``system/*`` metric at all. ``finish()`` therefore logs one last sample
    when none was published, so every stage run records at least its end-of-stage CPU/memory/disk figures.
    """
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class _StageMonitor(SystemMetricsMonitor):  # type: ignore[misc]
        def finish(self) -> None:
            super().finish()
            if getattr(self, "_logging_step", 1) == 0:
                self.collect_metrics()
                self.publish_metrics(self.aggregate_metrics())
                self.mlflow_logger.flush()

    mon = _StageMonitor(run_id, sampling_interval=interval, samples_before_logging=1, tracking_uri=tracking_uri)
    mon.start()
    return mon


def dataset_digest(image_ids: list[str]) -> str:
    """A short content key of a split: the hash of its sorted image ids (what the run saw, not the pixels)."""
    import hashlib

    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()[:16]


def _split_dataset(cfg: Config, split: str) -> tuple[str, str, int]:
    """``(name, digest, images)`` of a split as MLflow records it."""
    records = split_records(cfg, split)
    return f"{cfg.data.name}/{split}", dataset_digest([r.image_id for r in records]), len(records)


def eval_dataset(cfg: Config) -> tuple[str, str] | None:
    """``(name, digest)`` of the labelled split the evaluation metrics come from (None without one)."""
    if cfg.data.val_split is None or cfg.data.name == "folder":
        return None
    name, digest, _ = _split_dataset(cfg, cfg.data.val_split)
    return name, digest


def log_dataset_inputs(tracker: Tracker, run_id: str, cfg: Config) -> None:
    """The train (and validation) split as MLflow dataset inputs: name, split (context), digest, source path."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    splits = [("training", cfg.data.train_split)]
    if cfg.data.val_split is not None and cfg.data.name != "folder":
        splits.append(("validation", cfg.data.val_split))
    for context, split in splits:
        name, digest, n = _split_dataset(cfg, split)
        with warnings.catch_warnings():  # a local folder matches two equivalent source kinds; either is right
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(str(Path(cfg.data.root).resolve()))
        ds = MetaDataset(source=source, name=name, digest=digest)
        inputs.append(DatasetInput(ds._to_mlflow_entity(), tags=[
            InputTag("mlflow.data.context", context), InputTag("split", str(split)), InputTag("images", str(n))]))
    tracker.client.log_inputs(run_id, datasets=inputs)


def _numeric(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_run_artifacts(tracker: Tracker, run_id: str, run_dir: Path, model_id: str | None = None,
                      dataset: tuple[str, str] | None = None) -> None:
    """Resolved config, eval metrics, per-class IoU, confusion matrix (CSV + PNG), model card and report PNGs of a
    run dir. The evaluation metrics are linked to the logged model ``model_id`` and to their data set
    ``(name, digest)`` when given."""
    import json

    from mlflow.entities import Metric

    layout = RunLayout(run_dir)
    tracker.log_artifact(run_id, layout.config, "config")
    tracker.log_artifact(run_id, layout.model_card, "model_card")
    ev = layout.eval
    metrics_path = layout.metrics
    if metrics_path.is_file():
        m = json.loads(metrics_path.read_text())
        scores = {"mIoU": m.get("mIoU"), "pixel_accuracy": m.get("pixel_accuracy"),
                  **{f"iou/{k}": v for k, v in m.get("per_class_iou", {}).items()}}
        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, 0, model_id=model_id, dataset_name=dataset[0] if dataset else None,
                        dataset_digest=dataset[1] if dataset else None)
                 for k, v in scores.items() if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if items:
            tracker.client.log_batch(run_id, metrics=items)

        flat, per_round = mlflow_metrics(m)  # the stage-quality funnel: concepts, pseudo labels, rounds
        tracker.log_metrics(run_id, flat)
        for step, vals in per_round:
            tracker.log_metrics(run_id, vals, step=step)
        if m.get("prior"):
            tracker.set_tags(run_id, {"prior": m["prior"]})
        for name in ("metrics.json", "per_class_iou.csv", "confusion.csv"):
            tracker.log_artifact(run_id, ev / name, "eval")
        png = layout.confusion_png
        if not png.is_file() and (ev / "confusion.csv").is_file():
            png = confusion_png(ev / "confusion.csv", ev / "confusion.png")
        if png is not None and png.is_file():
            tracker.log_artifact(run_id, png, "eval")
    val_history = layout.val_history  # train.select=best_val / train.validate_every
    if val_history.is_file():
        tracker.log_artifact(run_id, val_history, "train")
    report = layout.report
    if report.is_dir():
        for p in sorted(report.glob("*.png")):
            tracker.log_artifact(run_id, p, "report")
        tracker.log_artifact(run_id, report / "index.html", "report")


def confusion_png(csv_path: Path, out: Path) -> Path | None:
    """A row-normalised confusion-matrix image (rows: ground truth, columns: predicted class)."""
    import numpy as np

    conf = np.loadtxt(csv_path, delimiter=",", ndmin=2)
    if conf.size == 0:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion (row-normalised)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
