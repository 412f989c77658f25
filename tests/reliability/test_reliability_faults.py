"""Reliability, faults (issue 5 item 2): a killed driver and failed writes lose nothing and trust nothing torn.

* The driver (``transfgu run`` in a subprocess) is SIGKILLed twice -- inside the label-bank stage and inside
  training after its first round's checkpoint -- and re-run: each re-run resumes at the first unfinished stage,
  rewrites no finished file, and the final decoder and metrics equal an uninterrupted run's bit for bit.
* A write that fails half way leaves neither the target nor a temporary file; a temporary file left by a killed
  writer is ignored by readers and by the skip-if-done logic; a torn Parquet shard is never counted as done.

The kill points are made deterministic by a wrapper that pauses the real CLI right after the event (a label-bank
batch about to be computed, a round checkpoint written) and tells the test through a marker file; the process is
then killed with SIGKILL, which no handler can intercept. The Ray faults (actor and Train worker killed) are in
``tests/ray/test_reliability_ray.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers.configs import tiny_config
from helpers.data import REPO
from safetensors.torch import load_file

from transfgu.pipeline import run_pipeline
from transfgu.stages import STAGES
from transfgu.store import atomic, formats
from transfgu.store.formats import list_parquet_files, read_features
from transfgu.store.manifest import Manifest

torch.set_num_threads(2)

PAUSING_CLI = textwrap.dedent(
    """
    # transfgu's real CLI, paused at one point (env PAUSE_AT) so the test can SIGKILL it there.
    import os, sys, time
    from pathlib import Path

    import torch

    torch.set_num_threads(2)
    at, marker = os.environ.get("PAUSE_AT"), Path(os.environ.get("PAUSE_MARKER", "/nonexistent"))
    if at == "label_bank":
        from transfgu import stages

        real = stages.build_label_maps

        def paused(*a, **k):
            marker.write_text("label_bank")
            time.sleep(300)
            return real(*a, **k)

        stages.build_label_maps = paused
    elif at == "train":
        from transfgu import training

        real = training.save_train_state

        def paused(directory, *a, **k):
            real(directory, *a, **k)
            marker.write_text(Path(directory).name)
            time.sleep(300)

        training.save_train_state = paused
    from transfgu.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def _cli(tmp_path: Path, config: Path, pause_at: str | None = None) -> subprocess.Popen:
    script = tmp_path / "pausing_cli.py"
    script.write_text(PAUSING_CLI)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    if pause_at:
        env |= {"PAUSE_AT": pause_at, "PAUSE_MARKER": str(tmp_path / f"paused_{pause_at}")}
    log = open(tmp_path / f"cli_{pause_at or 'final'}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, str(script), "run", "--config", str(config)], cwd=tmp_path,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def _kill_when_paused(proc: subprocess.Popen, marker: Path, timeout: float = 240.0) -> str:
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc={proc.returncode}) before reaching {marker.name}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timeout waiting for {marker.name}")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return marker.read_text()


def _mtimes(run: Path, *tops: str) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for t in tops for p in (run / t).rglob("*") if p.is_file()}


def _status(run: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads((run / "_manifest.json").read_text())["stages"].items()}


@pytest.mark.slow
def test_driver_killed_twice_resumes_and_matches_an_uninterrupted_run(tiny_run_dir, tmp_path):
    cfg = tiny_config(tmp_path / "runs", "killed")  # same stage hashes as tiny_run_dir (run.* is not hashed)
    config = tmp_path / "config.yaml"
    config.write_text(cfg.to_yaml())
    run = cfg.run_dir

    # 1. Killed inside the label-bank stage, before its shard is written.
    _kill_when_paused(_cli(tmp_path, config, "label_bank"), tmp_path / "paused_label_bank")
    assert _status(run) == {"extract": "done", "concepts": "done", "label_bank": "running"}
    assert not list_parquet_files(run / "label_bank")
    after_1 = _mtimes(run, "features", "concepts")
    random_backbone = (run / "backbone_random.safetensors").stat().st_mtime_ns

    # 2. Killed inside training, right after round 0's checkpoint.
    assert _kill_when_paused(_cli(tmp_path, config, "train"), tmp_path / "paused_train") == "round_000"
    assert _status(run) == {"extract": "done", "concepts": "done", "label_bank": "done", "train": "running"}
    after_2 = _mtimes(run, "features", "concepts", "label_bank", "train")
    assert all(after_2[k] == v for k, v in after_1.items() if k.startswith(("features", "concepts")))
    assert not (run / "train" / "round_001").exists() and not (run / "model").exists()

    # 3. Uninterrupted re-run: resumes in training after epoch 0, recomputes nothing finished.
    proc = _cli(tmp_path, config)
    assert proc.wait(timeout=300) == 0, (tmp_path / "cli_final.log").read_text()[-3000:]
    assert _status(run) == dict.fromkeys(STAGES, "done")
    after_3 = _mtimes(run, "features", "concepts", "label_bank", "train")
    assert all(after_3[k] == v for k, v in after_2.items())  # round_000 included
    assert (run / "backbone_random.safetensors").stat().st_mtime_ns == random_backbone
    logtext = (run / "pipeline.log").read_text()
    for stage in ("extract", "concepts", "label_bank"):
        assert f"[{stage}] already done" in logtext
    assert "[train] resuming after epoch 0" in logtext

    ref, got = load_file(str(tiny_run_dir / "model" / "decoder.safetensors")), load_file(
        str(run / "model" / "decoder.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=0)
    assert json.loads((run / "eval" / "metrics.json").read_text()) == json.loads(
        (tiny_run_dir / "eval" / "metrics.json").read_text())
    assert pq.read_table(run / "label_bank").equals(pq.read_table(tiny_run_dir / "label_bank"))


def test_write_failing_half_way_leaves_nothing_and_the_rerun_completes(tmp_path, monkeypatch):
    """``pq.write_table`` dies after writing part of the shard (disk full): no file, no temp, stage failed."""
    cfg = tiny_config(tmp_path, "diskfull", **{"data.max_train_images": "3"})
    real = formats.pq.write_table

    def dies(table, where, **kw):
        where.write(b"PAR1" + b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(formats.pq, "write_table", dies)
    with pytest.raises(OSError, match="No space left"):
        run_pipeline(cfg, only=["extract"])
    assert sorted(p.name for p in (cfg.run_dir / "features").iterdir()) == []
    rec = Manifest.load(cfg.run_dir).stage("extract")
    assert rec["status"] == "failed" and "No space left" in rec["error"]
    monkeypatch.setattr(formats.pq, "write_table", real)
    run_pipeline(cfg, only=["extract"])
    assert Manifest.load(cfg.run_dir).stage("extract")["status"] == "done"
    assert len(set(read_features(cfg.run_dir / "features")[0]["image_id"].to_pylist())) == 3


def _killed_copy(src: Path, dst: Path, stage: str) -> Path:
    """A copy of a finished run as if the driver had died inside ``stage`` (its status left 'running')."""
    shutil.copytree(src, dst)
    Manifest.load(dst).mark_running(stage, input_hash=Manifest.load(dst).stage(stage)["input_hash"])
    return dst


def test_temp_files_of_a_killed_writer_are_ignored(tiny_run_dir, tmp_path):
    run = _killed_copy(tiny_run_dir, tmp_path / "tiny", "extract")
    part = run / "features" / "part-00000.parquet"
    part.unlink()  # the writer died before its rename: only the temporary name exists
    torn = run / "features" / ".part-00000.parquet.k1ll3d.tmp"
    torn.write_bytes(b"PAR1" + os.urandom(1000))
    (run / "label_bank" / ".part-00000.parquet.x.tmp").write_bytes(b"PAR1")
    assert list_parquet_files(run / "features") == []  # readers skip hidden names
    assert [p.name for p in list_parquet_files(run / "label_bank")] == ["part-00000.parquet"]
    run_pipeline(tiny_config(tmp_path, "tiny"), only=["extract"])
    assert pq.read_table(part).equals(pq.read_table(tiny_run_dir / "features" / "part-00000.parquet"))
    meta, _ = read_features(run / "features")
    assert meta.num_rows == pq.read_metadata(part).num_rows  # the temp file was not read as a shard


def test_manifest_save_failing_keeps_the_previous_manifest(tmp_path, monkeypatch):
    m = Manifest(tmp_path)
    m.mark_done("extract", rows=5, input_hash="h1")
    before = (tmp_path / Manifest.FILE).read_text()

    def boom(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError, match="power cut"):
        Manifest.load(tmp_path).mark_done("concepts", rows=3, input_hash="h2")
    assert (tmp_path / Manifest.FILE).read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == [Manifest.FILE]  # no temporary left behind
    assert Manifest.load(tmp_path).is_done("extract", "h1") and not Manifest.load(tmp_path).is_done("concepts")


def test_truncated_shard_is_recomputed_not_trusted(tiny_run_dir, tmp_path):
    run = _killed_copy(tiny_run_dir, tmp_path / "tiny", "extract")
    part = run / "features" / "part-00000.parquet"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])  # e.g. a non-atomic copy or sync of the run directory died
    run_pipeline(tiny_config(tmp_path, "tiny"), only=["extract"])
    assert pq.read_table(part).equals(pq.read_table(tiny_run_dir / "features" / "part-00000.parquet"))
