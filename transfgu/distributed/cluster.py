"""Connecting to Ray and sizing remote work.

``ray.init(local_mode=True)`` is gone (Ray >= 2.54); tests use a small real cluster instead, and Ray Train's own
local mode (``ScalingConfig(num_workers=0)``) for in-process training (ecosystem_notes.md §1.1, §1.7).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transfgu.config import Config
from transfgu.logs import quiet_libraries, verbose_requested

if TYPE_CHECKING:  # Ray is imported where it is used, so importing this module stays cheap
    from ray.data import DataContext

log = logging.getLogger(__name__)


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


def cluster_has_gpus(cfg: Config) -> bool:
    """``ray.use_gpu``: ``auto`` = the cluster has GPUs now; ``true`` = request them (an autoscaler adds nodes)."""
    import ray

    if cfg.ray.use_gpu == "auto":
        return float(ray.cluster_resources().get("GPU", 0)) > 0
    return bool(cfg.ray.use_gpu)


def task_resources(cfg: Config, gpu: bool | None = None) -> dict[str, float]:
    """One GPU per actor/task when GPUs are used, else an explicit CPU share (``ray.cpus_per_actor``).

    Explicit CPUs matter on small nodes: actors that take every CPU starve Ray Data's own tasks
    (ray-project/ray#44687).
    """
    if gpu is None:
        gpu = cluster_has_gpus(cfg)
    if gpu:
        return {"num_gpus": 1, "num_cpus": min(1.0, cfg.ray.cpus_per_actor)}
    return {"num_cpus": float(cfg.ray.cpus_per_actor)}


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


def configure_data_context(ctx: DataContext) -> None:
    """Ray Data settings of this project: its own progress bars on a terminal (off in job logs, where each redraw
    would be a line), and no per-operator progress bars (one bar per stage is enough)."""
    ctx.enable_progress_bars = sys.stderr.isatty() and not os.environ.get("TRANSFGU_NO_BAR")
    if hasattr(ctx, "enable_operator_progress_bars"):
        ctx.enable_operator_progress_bars = False
    quiet_libraries()  # Ray Data sets up its console logger when imported
