"""Reliability, Ray faults (issue 5 item 2): a killed Ray Data actor or Ray Train worker loses nothing, repeats nothing.

Faults are injected inside the real worker processes by a ``worker_process_setup_hook`` (runtime_env of the job):
it wraps three functions of the package so that, when the control file arms them, the process SIGKILLs itself once
(an ``O_EXCL`` marker file makes it once across processes and retries):

* ``extract_before_write``: a Ray Data actor dies inside ``stages.extract_features``, before its shard is written;
* ``extract_after_write``: it dies right after ``write_parquet_atomic`` renamed the shard into place, before the
  actor returns its summary (so Ray Data retries a batch whose file already exists);
* ``train_after_epoch0``: the Ray Train worker dies right after epoch 0's training state is on disk, in the middle
  of a two-epoch round; ``FailureConfig(max_failures=1)`` restarts it and it must resume from that state.

The stage must complete; every image must appear exactly once in the Parquet (same rows as the one-process run),
and training must resume from the last state (recorded by the hook's wrapper of ``load_train_state``) and end
with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers.configs import tiny_config
from helpers.ray import arm as _arm
from helpers.ray import faulty_local_ray, fire_once, patch_on_import
from safetensors.torch import load_file

ray = pytest.importorskip("ray")
cloudpickle = pytest.importorskip("ray.cloudpickle")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY_OVERRIDES = {
    "ray.cpus_per_actor": "0.5",
    "ray.cpus_per_worker": "0.5",
    "ray.extract_actors": "[1, 1]",
    "ray.kmeans_shards": "2",
    "ray.num_workers": "1",
}
# A round of two epochs (round 0 = epochs 0-1, the teacher reboots at epoch 2), so a kill after epoch 0 is mid-round;
# one TorchTrainer fit for all epochs keeps the test short (the per-round fits resume the same way).
TRAIN_OVERRIDES = {"train.epochs": "3", "train.bootstrap_start": "2", "train.teacher_intervals": "[1]",
                   "data.max_train_images": "4", "data.max_val_images": "2", "ray.fit_per_round": "false"}


def fault_hook() -> None:
    """Runs in every Ray worker process before it executes tasks (``runtime_env.worker_process_setup_hook``).

    The wrappers are installed when the worker imports the module, not here, so the many Ray workers that never
    touch transfgu (Train controller, Data planner tasks) do not pay for importing torch.
    """
    import json
    import os
    import signal
    from pathlib import Path

    control = Path(os.environ["TRANSFGU_FAULTS"])

    def armed(point: str) -> bool:
        return fire_once(control, point)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def patch_stages(mod) -> None:
        real = mod.extract_features

        def extract_features(*a, **k):
            if armed("extract_before_write"):
                die()
            return real(*a, **k)

        mod.extract_features = extract_features

    def patch_shards(mod) -> None:
        real = mod.write_parquet_atomic

        def write_parquet_atomic(table, path, *a, **k):
            real(table, path, *a, **k)
            if Path(path).parent.name == "features" and armed("extract_after_write"):
                die()

        mod.write_parquet_atomic = write_parquet_atomic

    def patch_training(mod) -> None:
        real_save, real_load = mod.save_train_state, mod.load_train_state

        def save_train_state(directory, *a, **k):
            real_save(directory, *a, **k)
            if armed("train_after_epoch0"):
                die()

        def load_train_state(directory):
            groups, info = real_load(directory)
            if control.is_file():
                log = Path(json.loads(control.read_text())["marker"] + ".resumes")
                with open(log, "a") as fh:
                    fh.write(json.dumps({"pid": os.getpid(), "epoch": info["epoch"], "dir": Path(directory).name}))
                    fh.write("\n")
            return groups, info

        mod.save_train_state, mod.load_train_state = save_train_state, load_train_state

    patches = {"transfgu.stages": patch_stages, "transfgu.distributed.shards": patch_shards,
               "transfgu.training": patch_training}

    patch_on_import(patches)


@pytest.fixture(scope="module")
def faulty_ray():
    """A local Ray of this module's own whose workers run ``fault_hook``; yields the fault control file."""
    with faulty_local_ray(fault_hook, sys.modules[__name__]) as control:
        yield control


def _rows_per_image(features_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for f in sorted(p for p in features_dir.glob("*.parquet") if not p.name.startswith((".", "_"))):
        for i in pq.read_table(f, columns=["image_id"])["image_id"].to_pylist():
            counts[i] = counts.get(i, 0) + 1
    return counts


def _run_extract_with(control: Path, point: str, tmp_path: Path, tiny_run_dir: Path, caplog) -> Path:
    from transfgu.distributed.pipeline import run_pipeline_ray

    marker = _arm(control, point, tmp_path)
    cfg = tiny_config(tmp_path / "runs", point, **RAY_OVERRIDES)
    caplog.set_level("WARNING", logger="transfgu.distributed.cluster")
    manifest = run_pipeline_ray(cfg, only=["extract"])
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker process really died
    # Ray does not restart pool actors (its restart needs constructor arguments in the object store): the stage
    # planned the missing shards again from the files on disk and ran them on a new pool.
    assert "[extract] an actor of the pool died" in caplog.text
    assert manifest["stages"]["extract"]["status"] == "done"
    # Every image exactly once: the same crops, file for file, as the uninterrupted one-process run.
    ref = _rows_per_image(tiny_run_dir / "features")
    assert _rows_per_image(cfg.run_dir / "features") == ref
    assert manifest["stages"]["extract"]["rows"] == sum(ref.values())
    return cfg.run_dir


def test_actor_killed_before_writing_its_shard(faulty_ray, tmp_path, tiny_run_dir, caplog):
    run = _run_extract_with(faulty_ray, "extract_before_write", tmp_path, tiny_run_dir, caplog)
    assert pq.read_table(run / "features").equals(pq.read_table(tiny_run_dir / "features"))


def test_actor_killed_after_writing_its_shard(faulty_ray, tmp_path, tiny_run_dir, caplog):
    run = _run_extract_with(faulty_ray, "extract_after_write", tmp_path, tiny_run_dir, caplog)
    assert sorted(p.name for p in (run / "features").iterdir()) == ["part-00000.parquet"]


def test_train_worker_killed_mid_round_resumes_from_its_checkpoint(faulty_ray, tmp_path):
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(1)
    ref_cfg = tiny_config(tmp_path / "ref", "ref", **TRAIN_OVERRIDES)
    run_pipeline(ref_cfg, only=["extract", "concepts", "label_bank"])
    cfg = tiny_config(tmp_path / "runs", "ref", **RAY_OVERRIDES, **TRAIN_OVERRIDES)  # ray.* is not hashed
    shutil.copytree(ref_cfg.run_dir, cfg.run_dir)  # the stage inputs of training, shared by both runs
    run_pipeline(ref_cfg, only=["train"])  # uninterrupted reference

    marker = _arm(faulty_ray, "train_after_epoch0", tmp_path)
    manifest = run_pipeline_ray(cfg, only=["train"])
    assert manifest["stages"]["train"]["status"] == "done"
    killed = int(marker.read_text())
    resumes = [json.loads(line) for line in Path(str(marker) + ".resumes").read_text().splitlines()]
    # The restarted worker (a new process) loaded epoch 0's state of round 0 and trained on from there.
    assert resumes == [{"pid": resumes[0]["pid"], "epoch": 0, "dir": "round_000"}] and resumes[0]["pid"] != killed
    state = json.loads((cfg.run_dir / "train" / "round_001" / "state.json").read_text())
    assert state["epoch"] == 2 and state["round"] == 1
    ref = load_file(str(ref_cfg.run_dir / "model" / "decoder.safetensors"))
    got = load_file(str(cfg.run_dir / "model" / "decoder.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:  # same batches and RNG after the resume; only thread-count summation order may differ
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-5)
