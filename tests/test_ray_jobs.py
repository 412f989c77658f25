"""``ray job submit`` path: the full pipeline as a job on a ``ray start --head`` cluster, through the Jobs API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import require_shared_data

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]

#: The tiny whole-method settings of conftest.tiny_config, as command-line overrides.
TINY = [
    "data.max_train_images=6", "data.max_val_images=4", "backbone.arch=vit_test_tiny", "backbone.weights=none",
    "crops.input_size=[96,128]", "crops.betas=[0.5,0.3]", "crops.selection=all", "crops.crop_size=32",
    "concepts.k_per_pool={all: 4}", "concepts.niter=10", "pseudo.input_size=[64,80]", "pseudo.grad_scale=0.5",
    "train.train_size=[64,80]", "train.batch_size=4", "train.epochs=2", "train.teacher_intervals=[1]",
    "train.bootstrap_start=1", "eval.eval_size=[64,80]", "eval.batch_size=4", "run.name=job",
    "ray.cpus_per_actor=0.5", "ray.cpus_per_worker=0.5", "ray.num_workers=0", "run.report=false",
    "ray.use_gpu=false",  # explicit: `auto` is refused on a cluster the job joins (it would guess)
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """``ray start --head --block`` in its own process group (stopped by signalling that group only)."""
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
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2",
         f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--node-ip-address=127.0.0.1", "--object-store-memory=150000000", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    from ray.job_submission import JobSubmissionClient

    # Ray >= 2.59 starts local clusters with token auth: the client sends the cluster's token (`ray get-auth-token`)
    token = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token"], env=env,
                           capture_output=True, text=True).stdout.strip()
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


def test_full_pipeline_as_a_ray_job(head, tmp_path):
    from ray.job_submission import JobStatus

    camvid = require_shared_data("camvid")
    run_root = tmp_path / "runs"
    entry = ("python ray_jobs/full_pipeline.py --config conf/demo_camvid.yaml "
             f"data.root={camvid} run.root={run_root} " + " ".join(f"'{o}'" for o in TINY))
    # the head's job agent can lag its dashboard on a busy machine; Ray answers "No available agent to submit job,
    # please try again later" until it is up (minutes when every core is busy)
    deadline = time.time() + 300
    while True:
        try:
            job = head.submit_job(entrypoint=entry, runtime_env={"working_dir": str(REPO)})
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(3)
    deadline = time.time() + 540
    status = head.get_job_status(job)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.time() < deadline:
        time.sleep(3)
        status = head.get_job_status(job)
    logs = head.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    run_dir = run_root / "job"
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert 0 <= metrics["mIoU"] <= 1 and metrics["pretrained"] is False
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    assert all(rec["status"] == "done" for rec in manifest["stages"].values())
    # the job prints where its results are
    assert f"metrics:        {run_dir / 'eval' / 'metrics.json'}" in logs
    assert f"mlflow store:   sqlite:///{run_root / 'mlflow.db'}" in logs
    assert (run_root / "mlflow.db").is_file()
    # the uploaded working dir left out what .gitignore ignores (.venv, runs)
    pkg = [line for line in logs.splitlines() if "working_dir" in line.lower() and ".venv" in line]
    assert not pkg
