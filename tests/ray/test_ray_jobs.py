"""``ray job submit`` path: the full pipeline as a job on a ``ray start --head`` cluster, through the Jobs API."""

from __future__ import annotations

import json
import time

import pytest
from helpers.data import REPO, require_shared_data
from helpers.ray import ray_start_head

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


#: The tiny whole-method settings of helpers.configs.tiny_config, as command-line overrides.
TINY = [
    "data.max_train_images=6", "data.max_val_images=4", "backbone.arch=vit_test_tiny", "backbone.weights=none",
    "crops.input_size=[96,128]", "crops.betas=[0.5,0.3]", "crops.selection=all", "crops.crop_size=32",
    "concepts.k_per_pool={all: 4}", "concepts.niter=10", "pseudo.input_size=[64,80]", "pseudo.grad_scale=0.5",
    "train.train_size=[64,80]", "train.batch_size=4", "train.epochs=2", "train.teacher_intervals=[1]",
    "train.bootstrap_start=1", "eval.eval_size=[64,80]", "eval.batch_size=4", "run.name=job",
    "ray.cpus_per_actor=0.5", "ray.cpus_per_worker=0.5", "ray.num_workers=0", "run.report=false",
    "ray.use_gpu=false",  # explicit: `auto` is refused on a cluster the job joins (it would guess)
]


@pytest.fixture(scope="module")
def head():
    """A ``ray start --head`` cluster with the Jobs API (``helpers.ray.ray_start_head``): its client."""
    with ray_start_head() as client:
        yield client


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
