"""Leopart dense fine-tuning on Ray Train (issue 17): a worker killed mid-run resumes from its last epoch state and
ends with the weights of an uninterrupted one-process run; two DDP workers (gloo) train and write the backbone.

The fault is injected as in tests/ray/test_reliability_ray.py: a ``worker_process_setup_hook`` wraps
``finetune_stage.save_train_state`` so that the Ray Train worker SIGKILLs itself once, right after epoch 1's state is
on disk, and wraps ``load_train_state`` to record which state a (restarted) worker resumed from.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers.configs import FINETUNE_LEARN as LEARN
from helpers.configs import finetune_config
from helpers.ray import faulty_local_ray, fire_once, patch_on_import

ray = pytest.importorskip("ray")
cloudpickle = pytest.importorskip("ray.cloudpickle")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

RAY = {"ray.num_workers": "1", "ray.cpus_per_worker": "0.5", "ray.num_cpus": "2"}
EPOCHS = {**LEARN, "finetune.epochs": "4"}


def fault_hook() -> None:
    """Runs in every Ray worker process; wraps the fine-tuning module when (and if) the worker imports it."""
    import json
    import signal
    from pathlib import Path

    control = Path(os.environ["TRANSFGU_FAULTS"])
    name = "transfgu.leopart.finetune_stage"

    def armed() -> bool:
        return fire_once(control, "finetune_after_epoch1")

    def patch(mod) -> None:
        real_save, real_load = mod.save_train_state, mod.load_train_state

        def save_train_state(directory, *a, **k):
            real_save(directory, *a, **k)
            if Path(directory).name == "epoch_001" and armed():
                os.kill(os.getpid(), signal.SIGKILL)

        def load_train_state(directory):
            groups, info = real_load(directory)
            if control.is_file():
                with open(json.loads(control.read_text())["marker"] + ".resumes", "a") as fh:
                    fh.write(json.dumps({"pid": os.getpid(), "epoch": info["epoch"]}) + "\n")
            return groups, info

        mod.save_train_state, mod.load_train_state = save_train_state, load_train_state

    patch_on_import({name: patch})


@pytest.fixture(scope="module")
def faulty_ray():
    """A local Ray of this module's own whose workers run ``fault_hook``; yields the fault control file."""
    with faulty_local_ray(fault_hook, sys.modules[__name__]) as control:
        yield control


def test_killed_finetune_worker_resumes_from_its_last_epoch(faulty_ray, tmp_path):
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.leopart import finetune_stage as ftt
    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(1)
    ref = finetune_config(tmp_path / "ref", "ft", **EPOCHS)
    run_pipeline(ref)  # uninterrupted, one process
    marker = tmp_path / "fired"
    faulty_ray.write_text(json.dumps({"point": "finetune_after_epoch1", "marker": str(marker)}))
    cfg = finetune_config(tmp_path / "ray", "ft", **EPOCHS, **RAY)
    manifest = run_pipeline_ray(cfg)
    assert manifest["stages"]["finetune"]["status"] == "done"
    killed = int(marker.read_text())
    resumes = [json.loads(line) for line in Path(str(marker) + ".resumes").read_text().splitlines()]
    assert resumes == [{"pid": resumes[0]["pid"], "epoch": 1}] and resumes[0]["pid"] != killed
    info = json.loads((cfg.run_dir / "finetune" / "finetune.json").read_text())
    assert info["start_epoch"] == 2 and len(info["history"]) == 4
    want = ftt.load_train_state(ref.run_dir / "finetune" / "epoch_003")[0]
    got = ftt.load_train_state(cfg.run_dir / "finetune" / "epoch_003")[0]
    for group in ("student", "teacher"):
        for k in want[group]:
            torch.testing.assert_close(got[group][k], want[group][k], rtol=1e-4, atol=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(ref.run_dir / "finetune" / "backbone.safetensors"))
    b = load_file(str(cfg.run_dir / "finetune" / "backbone.safetensors"))
    assert a.keys() == b.keys()


def test_two_ddp_workers_train_and_write_the_backbone(faulty_ray, tmp_path):
    from transfgu.distributed.pipeline import run_pipeline_ray
    from transfgu.models.backbone import build_backbone

    faulty_ray.write_text("{}")
    cfg = finetune_config(tmp_path, "ddp", **{**EPOCHS, "finetune.epochs": "2"},
                          **{**RAY, "ray.num_workers": "2"})
    manifest = run_pipeline_ray(cfg)
    rec = manifest["stages"]["finetune"]
    assert rec["status"] == "done" and rec["extra"]["workers"] == 2
    info = json.loads((cfg.run_dir / "finetune" / "finetune.json").read_text())
    assert info["workers"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in info["history"])
    build_backbone("vit_test_tiny", str(cfg.run_dir / "finetune" / "backbone.safetensors"))
