"""The Ray clusters of the tests, and the one place that starts and stops them.

* :func:`start_shared_local`: the session's shared local Ray (``ray_local`` in ``conftest.py``), started once at
  first use and kept for every module that needs a plain local Ray (starting one costs 5-10 s on the 2-core VM).
* The special clusters, one module each: :func:`local_ray` (a private local Ray with a job-level ``runtime_env``:
  worker environment variables), :func:`faulty_local_ray` (a worker setup hook that injects faults),
  :func:`multi_node_cluster` (``ray.cluster_utils.Cluster``: a head and worker nodes on this machine) and
  :func:`ray_start_head` (a ``ray start --head`` subprocess, for the Jobs API). Each first stops whatever Ray this
  process runs (Ray allows one ``ray.init`` per process), and stops its own cluster when the module ends; the shared
  Ray starts again at its next use.

Every cluster listens on 127.0.0.1 only and is private to this test process: never one another process on this
machine runs, and nothing here stops Ray processes it did not start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

MiB = 1024**2
#: The shared local Ray: two CPUs (the VM's), an object store that fits the Serve memory test, no dashboard.
SHARED_NUM_CPUS = 2
SHARED_OBJECT_STORE = 150 * MiB
#: How often this process started a Ray cluster, by kind (printed at the end of the session by ``conftest.py``).
STARTS: dict[str, int] = {}

_state = {"shared": False}


def worker_env(**extra: str) -> dict[str, str]:
    """Environment of the test clusters' worker processes: one OpenMP thread each (two cores shared by every actor
    and task), this checkout's ``transfgu`` on ``PYTHONPATH``, and ``extra``."""
    env = {"OMP_NUM_THREADS": "1", **{k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}}
    return {**env, **extra}


def _count(kind: str) -> None:
    STARTS[kind] = STARTS.get(kind, 0) + 1


def stop() -> None:
    """Disconnect from (and, for a local Ray, stop) the Ray this process runs, if any."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _state["shared"] = False


def _init_local(**kwargs: Any) -> None:
    import ray

    # address="local": a private Ray, never one that another process on this machine happens to run
    kwargs = {"num_cpus": SHARED_NUM_CPUS, "object_store_memory": 80 * MiB, "include_dashboard": False,
              "_node_ip_address": "127.0.0.1", **kwargs}
    ray.init(address="local", **kwargs)


def start_shared_local() -> None:
    """Start the shared local Ray unless it already runs (a special cluster that still runs is stopped first)."""
    import ray

    if _state["shared"] and ray.is_initialized():
        return
    stop()
    _init_local(object_store_memory=SHARED_OBJECT_STORE, runtime_env={"env_vars": worker_env()})
    _state["shared"] = True
    _count("shared local")


def stop_shared_local() -> None:
    """Stop the shared local Ray if it runs (the end of the session)."""
    if _state["shared"]:
        stop()


def clean_shared_local() -> None:
    """What a module leaves on the shared Ray that would change the next module's: a Serve application (its
    detached controller and replicas hold CPUs)."""
    import ray

    if not (_state["shared"] and ray.is_initialized()) or "ray.serve" not in sys.modules:
        return
    from ray import serve

    serve.shutdown()


@contextlib.contextmanager
def local_ray(**init_kwargs: Any) -> Iterator[None]:
    """A private local Ray with settings of its own (a job-level ``runtime_env`` such as worker environment
    variables, which cannot change once Ray runs), for the duration of the ``with`` block."""
    stop()
    _init_local(**init_kwargs)
    _count("local, own settings")
    try:
        yield
    finally:
        stop()


@contextlib.contextmanager
def faulty_local_ray(hook: Callable[[], None], module: ModuleType, **env: str) -> Iterator[Path]:
    """A private local Ray whose worker processes run ``hook`` (``runtime_env.worker_process_setup_hook``) before any
    task: the fault injection of ``module``. Yields the control file the hook reads (``TRANSFGU_FAULTS``): a test arms
    a fault point by writing it (:func:`arm`).

    ``module`` and this one travel to the workers by value (they are not importable there)."""
    from ray import cloudpickle

    control = Path(tempfile.mkdtemp(prefix="transfgu_faults_")) / "control.json"
    by_value = [module, sys.modules[__name__]]
    for m in by_value:
        cloudpickle.register_pickle_by_value(m)
    try:
        with local_ray(runtime_env={"worker_process_setup_hook": hook,
                                    "env_vars": worker_env(TRANSFGU_FAULTS=str(control), **env)}):
            yield control
    finally:
        for m in by_value:
            cloudpickle.unregister_pickle_by_value(m)
        shutil.rmtree(control.parent, ignore_errors=True)


def arm(control: Path, point: str, tmp_path: Path) -> Path:
    """Arm the fault ``point`` of a :func:`faulty_local_ray`; returns the marker file the fault writes when it fires."""
    import json

    marker = tmp_path / f"fired_{point}"
    control.write_text(json.dumps({"point": point, "marker": str(marker)}))
    return marker


def fire_once(control: Path, point: str) -> bool:
    """In a worker: True the first time the armed ``point`` is reached in the whole cluster (the marker file records
    the process that fired it), False after that or when another point is armed."""
    import json

    spec = json.loads(control.read_text()) if control.is_file() else {}
    if spec.get("point") != point:
        return False
    try:
        fd = os.open(spec["marker"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def patch_on_import(patches: dict[str, Callable[[ModuleType], None]]) -> None:
    """In a worker: apply ``patches[name](module)`` to each named module, now if it is imported, else right after the
    worker imports it (so workers that never touch transfgu do not pay for importing torch)."""
    import importlib.abc
    import importlib.util

    class PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in patches:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            real_exec = spec.loader.exec_module

            def exec_module(module):
                real_exec(module)
                patches[name](module)

            spec.loader.exec_module = exec_module
            return spec

    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
    sys.meta_path.insert(0, PatchOnImport())


@contextlib.contextmanager
def multi_node_cluster(head_cpus: int, node_cpus: list[int], connect: bool = True,
                       object_store_memory: int = 80 * MiB) -> Iterator[Any]:
    """A real multi-node Ray on this machine (``ray.cluster_utils.Cluster``): a head with ``head_cpus`` CPUs and one
    worker node per entry of ``node_cpus``. With ``connect`` this process joins it (else the test joins it, e.g. through
    ``init_ray`` with ``ray.address``). Yields the cluster."""
    import ray
    from ray.cluster_utils import Cluster

    stop()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False,
                                                       "object_store_memory": object_store_memory})
    _count("multi-node")
    try:
        for n in node_cpus:
            c.add_node(num_cpus=n, object_store_memory=object_store_memory)
        c.wait_for_nodes()
        if connect:
            ray.init(address=c.address)
        yield c
    finally:
        stop()
        c.shutdown()


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the processes of our ``ray start`` (its own process group) and nothing else."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    time.sleep(2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # GCS and raylet may outlive `ray start --block`


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_start_head(num_cpus: int = 2, object_store_memory: int = 150_000_000) -> Iterator[Any]:
    """``ray start --head --block`` with the dashboard (the Jobs API) in its own process group, stopped by signalling
    that group only. Yields a ``JobSubmissionClient`` for it; skips when the dashboard's packages are missing."""
    import pytest

    stop()
    temp = Path(f"/tmp/rayjobs{os.getpid()}")  # short: Ray's socket paths have a length limit
    # every port ray start would otherwise take from its fixed defaults (client server 10001, dashboard agent 52365):
    # free ones, so another cluster on this machine (a pytest-xdist worker, another user) never collides with it
    port, dash, client, agent = _free_port(), _free_port(), _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    extra = os.environ.get("TRANSFGU_RAY_DASHBOARD_PATH")  # a dir with the ray[default] packages, if not installed
    if extra:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (extra, env.get("PYTHONPATH")) if p)
    probe = subprocess.run([sys.executable, "-c", "import aiohttp_cors, opencensus, prometheus_client, grpc"],
                           env=env, capture_output=True)
    if probe.returncode != 0:
        pytest.skip("the Jobs API needs the dashboard: install ray[default] (or set TRANSFGU_RAY_DASHBOARD_PATH)")
    ray_cli = str(Path(sys.executable).parent / "ray")
    proc = subprocess.Popen(
        [ray_cli, "start", "--head", "--block", "--num-cpus", str(num_cpus),
         f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--node-ip-address=127.0.0.1", f"--object-store-memory={object_store_memory}", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    _count("ray start --head")
    from ray.job_submission import JobSubmissionClient

    # Ray >= 2.59 starts local clusters with token auth: the client sends the cluster's token (`ray get-auth-token`)
    token = subprocess.run([ray_cli, "get-auth-token"], env=env, capture_output=True, text=True).stdout.strip()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    address = f"http://127.0.0.1:{dash}"
    client = None
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            _stop_group(proc)
            raise RuntimeError(f"ray start exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            client = JobSubmissionClient(address, headers=headers)
            client.list_jobs()
            break
        except Exception:
            client = None
            time.sleep(2)
    try:
        if client is None:
            raise RuntimeError("the Ray head did not come up")
        yield client
    finally:
        _stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def http_request(url: str, data: bytes | None = None, ctype: str | None = None,
                 timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """GET (or POST ``data`` as ``ctype``) over HTTP; an error status is an answer too: (status, headers, body)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if ctype:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@contextlib.contextmanager
def serve_endpoint(run_dir: Path, options: dict[str, str], ready_s: float = 120) -> Iterator[str]:
    """The model server of ``run_dir`` (``transfgu.serve.app`` with ``options``) as a Serve application on the
    shared local Ray, over HTTP on 127.0.0.1; yields its base URL once ``/healthz`` answers, shuts Serve down after."""
    from ray import serve

    from transfgu.serve import app

    start_shared_local()
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(app({"model": str(run_dir), "device": "cpu", **options}), name="transfgu", route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + ready_s
        while True:
            status, _, _ = http_request(base + "/healthz", timeout=30)
            if status == 200 or time.time() > deadline:
                break
            time.sleep(1)
        assert status == 200, f"the Serve endpoint did not answer /healthz within {ready_s:.0f} s"
        yield base
    finally:
        serve.shutdown()
