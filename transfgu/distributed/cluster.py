"""Connecting to Ray and sizing remote work.

``ray.init(local_mode=True)`` is gone (Ray >= 2.54); tests use a small real cluster instead, and Ray Train's own
local mode (``ScalingConfig(num_workers=0)``, Train V2) for in-process training, as Ray's testing tips advise for
2-CPU machines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from transfgu.config import Config
from transfgu.logs import quiet_libraries, verbose_requested

if TYPE_CHECKING:  # Ray is imported where it is used, so importing this module stays cheap
    from ray.data import DataContext, Dataset

log = logging.getLogger(__name__)
T = TypeVar("T")


def init_ray(cfg: Config, **kwargs: Any) -> None:
    """Join the cluster at ``ray.address`` or ``RAY_ADDRESS`` (``ray job submit`` sets it; ``auto`` = the Ray that
    ``ray start --head`` runs on this machine), else start a private local Ray bound to 127.0.0.1.

    Nothing is joined implicitly: a Ray some other process happens to run on this machine (a test cluster, another
    user's) may vanish under the job.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_libraries()  # before ray.init, which logs its own start-up at INFO
    # Worker processes' output (Ray Train's controller, placement-group cleaners, every actor's log lines) reaches
    # this console only with --verbose; it is always in Ray's session logs. The driver logs what each stage did.
    kwargs.setdefault("log_to_driver", verbose_requested())
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **kwargs)
        quiet_libraries()
        log.info("joined the Ray cluster at %s: %s", address, ray.cluster_resources())
        for warning in check_storage(cfg):
            log.warning("%s", warning)
        return
    # A private Ray is single-machine: keep every Ray process on loopback. Ray otherwise swaps 127.0.0.1 for the
    # machine's outward address; this switch (read by Ray at call time, and inherited by the processes it starts)
    # is how Ray itself runs single-machine clusters on macOS/Windows.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] not in ("0", "false")
    except (ImportError, AttributeError):  # private API moved: Ray's default address is used
        pass
    ray.init(
        address="local",
        num_cpus=cfg.ray.num_cpus,
        object_store_memory=cfg.ray.object_store_memory,
        include_dashboard=cfg.ray.include_dashboard,
        _node_ip_address="127.0.0.1",
        **kwargs,
    )
    quiet_libraries()  # Ray configures its loggers when imported, after setup_logging
    log.info("started a local Ray: %s", ray.cluster_resources())


def is_remote(cfg: Config) -> bool:
    """True when the job joins an existing cluster (``ray.address`` / ``RAY_ADDRESS``) rather than a private Ray."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    return bool(address) and address != "local"


def cluster_has_gpus(cfg: Config) -> bool:
    """Whether stages run on GPUs, from ``ray.use_gpu``; GPUs are requested, never guessed, on a remote cluster.

    * ``false``: CPU only.
    * ``true``: the stages need GPUs: when the cluster has none yet, the autoscaler is asked for one
      (``ray.autoscaler.sdk.request_resources``) and we wait up to ``ray.gpu_wait_s``, then fail naming the setting.
      (GPU actors also ask for ``num_gpus`` themselves, which is what makes the autoscaler add GPU nodes.)
    * ``auto``: for a private local Ray only (its GPUs, if any). On a remote cluster that autoscales from zero GPU
      workers, "has GPUs now" is the wrong question: the whole pipeline would silently run on CPU. Refused there.
    """
    import ray

    if cfg.ray.use_gpu == "auto":
        if is_remote(cfg):
            raise ValueError(
                "ray.use_gpu=auto refuses to guess on a remote Ray cluster (an autoscaling cluster may have no GPU "
                "node up yet): set ray.use_gpu=true to request GPUs or ray.use_gpu=false to run on CPUs"
            )
        return float(ray.cluster_resources().get("GPU", 0)) > 0
    if cfg.ray.use_gpu:
        wait_for_gpus(cfg.ray.gpu_wait_s)
        return True
    return False


def wait_for_gpus(timeout_s: float, poll_s: float = 2.0) -> None:
    """Return once the cluster has a GPU; ask the autoscaler for one meanwhile; raise after ``timeout_s``."""
    import ray

    if float(ray.cluster_resources().get("GPU", 0)) > 0:
        return
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[{"GPU": 1}])
    except Exception as e:  # no autoscaler (a plain `ray start` cluster): nothing to ask, just wait
        log.debug("request_resources failed: %s", e)
    log.info("ray.use_gpu=true: waiting up to %.0f s for a GPU node", timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if float(ray.cluster_resources().get("GPU", 0)) > 0:
            return
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
    raise RuntimeError(
        f"ray.use_gpu=true but the Ray cluster has no GPU after waiting {timeout_s:.0f} s "
        f"(resources: {ray.cluster_resources()}); add GPU worker nodes (cluster.yaml gpu_workers), raise "
        "ray.gpu_wait_s while the autoscaler starts them, or set ray.use_gpu=false"
    )


def task_resources(cfg: Config, gpu: bool | None = None) -> dict[str, float]:
    """``ray.gpus_per_actor`` GPUs (fractions pack several actors on one GPU) and ``ray.cpus_per_actor`` CPUs per
    actor/task when GPUs are used, else the CPU share alone.

    Explicit CPUs matter on small nodes: actors that take every CPU starve Ray Data's own tasks
    (ray-project/ray#44687); GPU actors get their own CPUs too (batching, host-to-device copies).
    """
    if gpu is None:
        gpu = cluster_has_gpus(cfg)
    if gpu:
        return {"num_gpus": float(cfg.ray.gpus_per_actor), "num_cpus": float(cfg.ray.cpus_per_actor)}
    return {"num_cpus": float(cfg.ray.cpus_per_actor)}


#: Ray resource names of the per-actor requests of :func:`task_resources`.
_RESOURCE_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU"}


def actor_pool_bounds(
    actors: tuple[int, int | str],
    per_actor: Mapping[str, float],
    cluster: Mapping[str, float],
    n_items: int,
) -> tuple[int, int]:
    """``(min_size, max_size)`` of an actor pool over ``n_items`` work items (shards).

    ``actors`` is ``ray.extract_actors``. A max of ``"auto"`` is what the cluster holds at submit time: the fewest
    actors of ``per_actor`` (:func:`task_resources`: ``num_gpus`` and ``num_cpus``) that ``cluster``
    (``ray.cluster_resources()``) fits, i.e. GPUs / gpus_per_actor for GPU actors (also bounded by the CPUs they
    ask for), CPUs / cpus_per_actor else; at least 1. An integer max is kept as given even when the cluster holds
    fewer now: Ray Data (2.60) accepts an ``ActorPoolStrategy.max_size`` above the current resources, starts only
    the actors that fit and adds more as the cluster grows (an autoscaling cluster). Either way there is no more
    than one actor per item, and ``min_size <= max_size``.
    """
    lo, hi = actors
    if hi == "auto":
        fits = [
            int(float(cluster.get(_RESOURCE_NAMES.get(k, k), 0.0)) / float(v) + 1e-9)
            for k, v in per_actor.items() if float(v) > 0
        ]  # fmt: skip
        hi = max(1, min(fits)) if fits else 1
    hi = max(1, min(int(hi), int(n_items)))
    return min(int(lo), hi), hi


def check_storage(cfg: Config) -> list[str]:
    """Refuse run roots and Train storage that other nodes cannot see; return warnings (e.g. a SQLite MLflow store
    written by several nodes).

    Only for a remote cluster: a private local Ray is one machine, where every path is shared.
    """
    import ray

    warnings: list[str] = []
    if not is_remote(cfg):
        return warnings
    if not Path(cfg.run.root).is_absolute() and "://" not in str(cfg.run.root):
        raise ValueError(
            f"run.root={str(cfg.run.root)!r} is relative: on a Ray cluster it would resolve inside the job's temporary "
            "working directory and vanish with it; give an absolute path on storage every node mounts (EFS/NFS)"
        )
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        sp = cfg.ray.storage_path
        if sp is None:
            raise ValueError(
                f"the Ray cluster has {len(nodes)} nodes and ray.storage_path is not set: Ray Train/Tune would "
                "checkpoint to <run>/ray_results on each node's local disk; set ray.storage_path=s3://bucket/prefix "
                "(or an absolute path on a filesystem every node mounts)"
            )
        if "://" not in sp and not Path(sp).is_absolute():
            raise ValueError(f"ray.storage_path={sp!r} must be a URI (s3://...) or an absolute shared path")
        uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
        if cfg.mlflow.enabled and (uri == "" or uri.startswith("sqlite:")):
            warnings.append(
                f"MLflow store is SQLite ({uri or 'the default <run.root>/mlflow.db'}) on a {len(nodes)}-node Ray "
                "cluster: the driver, Train rank 0 and Tune trials write it concurrently from different machines; "
                "run `mlflow server --backend-store-uri <database> --artifacts-destination s3://...` and set "
                "MLFLOW_TRACKING_URI=http://<host>:5000"
            )
    return warnings


def torch_threads(num_cpus: float) -> int:
    """Intra-op threads for a worker holding ``num_cpus`` CPUs (at least one)."""
    return max(1, int(num_cpus))


def worker_config(cfg: Config) -> dict[str, Any]:
    """The config as plain data for remote workers, with paths made absolute against this driver's directory.

    Ray Train workers run in their own directory, so a relative ``data.root`` would not resolve there. Only the
    shipped copy changes: the driver keeps the config as given, so its stage hashes (and resume) are unaffected.
    """
    d = cfg.model_dump(mode="json")
    d["data"]["root"] = str(Path(d["data"]["root"]).resolve())
    d["run"]["root"] = str(Path(d["run"]["root"]).resolve())
    src = cfg.backbone.source
    if src.path is not None and src.path.exists():
        d["backbone"]["weights"] = src.spec
    return d


#: Ray remote args of every Ray Data actor pool of the package: Ray does not restart a pool actor that died. Ray Data
#: starts pool actors with ``max_restarts=-1`` by default, and Ray's core then logs an ERROR line on every run ("has
#: constructor arguments in the object store and max_restarts > 0": Ray Data always ships the pool's function as an
#: object reference). The restart is not needed: every pool of the package writes its results as files named before
#: the pool starts, so after a lost actor the driver plans again from the files on disk and sends only the missing
#: work to a fresh pool (:func:`run_pool_with_retries`).
POOL_ACTOR_ARGS: dict[str, Any] = {"max_restarts": 0}
#: How many times a pool runs in all when its actors die (each time with only the work no written file covers).
POOL_ATTEMPTS = 3


def map_on_pool(ds: Dataset, fn: type, **kwargs: Any) -> Dataset:
    """``ds.map_batches(fn, **kwargs)`` on an actor pool whose actors Ray does not restart (:data:`POOL_ACTOR_ARGS`).

    ``max_restarts`` reaches the pool only through ``map_batches``' free remote args, which Ray (2.60) reports as
    deprecated for the parameters it names; it names none for restarts yet, so that one warning is not shown.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs, **POOL_ACTOR_ARGS)


def actor_died(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says a Ray actor process died or became unreachable."""
    from ray.exceptions import RayActorError, WorkerCrashedError

    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, (RayActorError, WorkerCrashedError)):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def run_pool_with_retries(name: str, attempt: Callable[[], T], attempts: int = POOL_ATTEMPTS) -> T:
    """Run ``attempt`` (plan the missing work from the files on disk, run it on a Ray Data actor pool) until it
    returns; after an actor death (:func:`actor_died`) it is called again, at most ``attempts`` times in all."""
    for n in range(1, attempts + 1):
        try:
            return attempt()
        except Exception as e:
            if n == attempts or not actor_died(e):
                raise
            log.warning("[%s] an actor of the pool died (%s); the written files are kept, the rest runs again "
                        "(attempt %d of %d)", name, type(e).__name__, n + 1, attempts)
    raise AssertionError("unreachable")


def configure_data_context(ctx: DataContext) -> bool:
    """Ray Data settings of this project; returns whether Ray Data draws its progress bar.

    Its own bar on a terminal (Ray Data draws it only when stdout is one; it goes to stderr), none in job logs
    (where each redraw would be a line: the stage logs a status line instead), and no per-operator bars (one bar
    per stage is enough). ``TRANSFGU_NO_BAR`` turns the bars off on a terminal too.
    """
    bars = sys.stdout.isatty() and sys.stderr.isatty() and not os.environ.get("TRANSFGU_NO_BAR")
    ctx.enable_progress_bars = bars
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = False
    quiet_libraries()  # Ray Data sets up its console logger when imported
    return bars
