"""What a run prints: one console format (ours, also for Ray's and MLflow's lines), no MLflow set-up chatter or
warning the user cannot act on, Ray's token notice left out, one random-backbone warning naming the real key, and
progress for evaluation and prediction."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.data import REPO

from transfgu.logs import Progress

OUR_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")

SCRIPT = r"""
import logging, sys
from transfgu.config import load_config
from transfgu.logs import setup_logging, quiet_libraries
setup_logging()
import ray  # noqa: F401  (configures Ray's console logger, as in a run)
quiet_libraries()
logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
    "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
logging.getLogger("ray.data.some_module").warning("a Ray warning the user should see")
from transfgu.models.backbone import build_backbone
build_backbone("vit_test_tiny", "none")
build_backbone("vit_test_tiny", "none")
from transfgu.tracking import PipelineTracker
cfg = load_config(sys.argv[1], [f"data.root={sys.argv[2]}", f"run.root={sys.argv[3]}", "mlflow.enabled=true",
                                "mlflow.system_metrics=true", "mlflow.system_metrics_interval=1"])
tracker = PipelineTracker.from_config(cfg)   # creates the SQLite store: MLflow's "Creating initial tables"
tracker.start()                              # dataset inputs: MLflow's "interpreted in multiple ways" warning
rid = tracker.stage_run("extract")           # system metrics: MLflow's "Started monitoring" lines
tracker.end_stage(rid, {})
tracker.finish(None)
logging.getLogger("transfgu").info("done")
"""


def test_a_healthy_run_prints_only_our_lines(camvid, tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "conf" / "tiny.yaml"), str(camvid),
                        str(tmp_path / "runs")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    foreign = [ln for ln in lines if not OUR_LINE.match(ln)]
    assert not foreign, "lines in another format or bare library output:\n" + "\n".join(foreign)
    text = "\n".join(lines)
    for noise in ("Creating initial MLflow database", "Updating database tables", "UserWarning",
                  "monitoring system metrics", "Skip logging GPU metrics", "Token authentication is enabled",
                  " ERROR "):
        assert noise not in text, noise
    assert "a Ray warning the user should see" in text  # quieted, not muted
    assert "RANDOM" not in text  # building a random backbone is not a warning of its own (the run warns once)
    assert text.rstrip().endswith("transfgu: done")


def test_the_run_warns_once_about_a_random_backbone_naming_the_real_key(tiny_run_dir):
    log = (tiny_run_dir / "pipeline.log").read_text()
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln and re.search("random", ln, re.IGNORECASE)]
    assert len(warnings) == 1, warnings
    assert "backbone.weights" in warnings[0] and "model.weights" not in log


def test_progress_bar_on_a_terminal_and_periodic_lines_elsewhere(caplog):
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    with Progress("evaluate", 10, stream=tty) as prog:
        for _ in range(10):
            prog.update(1)
    assert "[evaluate]:" in tty.getvalue() and "/10 [" in tty.getvalue()  # tqdm's bar (redrawn at its own pace)
    caplog.set_level("INFO", logger="transfgu")
    plain = io.StringIO()
    with Progress("predict", 4, stream=plain, min_interval_s=3600) as prog:
        for _ in range(4):
            prog.update(1)
    assert plain.getvalue() == ""  # no bar where stderr is not a terminal
    lines = [r.getMessage() for r in caplog.records if "[predict]" in r.getMessage()]
    assert len(lines) == 2 and "1/4" in lines[0] and "4/4" in lines[1]  # the first and the last (and one per 10 s)


def test_evaluation_counts_its_images():
    from transfgu.evaluate_stage import counted

    class Fake:
        done = 0

        def update(self, n: int) -> None:
            self.done += n

    prog = Fake()
    batches = [{"image": [0] * 3, "label": [0] * 3}, {"image": [0] * 2, "label": [0] * 2}]
    assert list(counted(batches, prog)) == batches and prog.done == 5


def test_prediction_cli_shows_progress_not_a_line_per_batch(tiny_run_dir, camvid, tmp_path):
    images = sorted((camvid / "images" / "val").glob("*.jpg"))[:3]
    r = subprocess.run([sys.executable, "-m", "transfgu.cli", "predict", str(tiny_run_dir), *map(str, images),
                        "--out", str(tmp_path / "out"), "--batch-size", "1", "--device", "cpu"],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    status = [ln for ln in r.stderr.splitlines() if "[predict]" in ln]
    assert 1 <= len(status) <= 2 and "3/3" in status[-1], r.stderr  # first and last (and one per 10 s)
    assert all(OUR_LINE.match(ln) for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning:"))
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["n_images"] == 3


def test_the_ray_stage_status_line_keeps_coming_while_no_result_does(caplog):
    import time

    caplog.set_level("INFO", logger="transfgu")
    with Progress("extract", 6, stream=io.StringIO(), min_interval_s=0.2, heartbeat=True) as prog:
        time.sleep(0.75)  # one shard still running: nothing comes back, the job log still hears from the stage
        prog.update(6)
    lines = [r.getMessage() for r in caplog.records if "[extract]" in r.getMessage()]
    assert len(lines) >= 3 and all("0/6" in ln for ln in lines[:-1]) and "6/6" in lines[-1], lines


# -- a real Ray run of a per-image stage (its own process: Ray's core logs some lines once per process) -------------
#: Ray's C++ core logs ``[2026-01-01 12:00:00,000 E 123 123] core_worker.cc:...`` at ERROR level.
RAY_CORE_ERROR = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ E \d+ \d+\]")
#: Ray Data's progress bar (tqdm): "Running Dataset: ...", "... row/s]", "100%|...|".
RAY_DATA_BAR = re.compile(r"Running Dataset|row/s\]|\d%\|")


def _ray_extract_argv(camvid: Path, tmp_path: Path) -> list[str]:
    return [sys.executable, "-m", "transfgu.cli", "run", "--ray", "--config", str(REPO / "conf" / "tiny.yaml"),
            "--only", "extract", f"data.root={camvid}", f"run.root={tmp_path / 'runs'}", "ray.num_cpus=2"]


def _no_error_line(text: str) -> None:
    errors = [ln for ln in text.splitlines() if RAY_CORE_ERROR.match(ln.strip()) or " ERROR " in ln]
    assert not errors, "a healthy run printed ERROR lines:\n" + "\n".join(errors)


@pytest.mark.slow
@pytest.mark.ray
def test_a_healthy_ray_run_in_a_job_log_prints_no_error_no_bar_and_status_lines(camvid, tmp_path):
    r = subprocess.run(_ray_extract_argv(camvid, tmp_path), capture_output=True, text=True, timeout=900, cwd=REPO)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    _no_error_line(text)  # e.g. Ray core's "constructor arguments in the object store and max_restarts > 0"
    assert not RAY_DATA_BAR.search(text), text  # no bar redraws in a log file
    assert "Progress bars disabled" not in text
    assert re.search(r"INFO transfgu: \[extract\] 6/6 \(100\.0%\)", text), text  # the stage's status line


@pytest.mark.slow
@pytest.mark.ray
def test_a_ray_run_on_a_terminal_shows_ray_datas_progress_bar(camvid, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    master, slave = pty.openpty()
    # A terminal of 40 rows x 120 columns: tqdm draws nothing on a terminal of width 0 (a bare pty's size).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(_ray_extract_argv(camvid, tmp_path), stdin=slave, stdout=slave, stderr=slave, cwd=REPO,
                            env={k: v for k, v in os.environ.items() if k != "TRANSFGU_NO_BAR"})
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:  # read while it runs: a full pty buffer would block the run
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other end has exited
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=900)
    finally:
        proc.kill()
        reader.join(timeout=30)
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r", "\n")
    assert rc == 0, text[-3000:]
    assert RAY_DATA_BAR.search(text), text  # Ray Data's own bar
    _no_error_line(text)
    status = [ln for ln in text.splitlines() if "INFO transfgu: [extract] " in ln and "/6 (" in ln]
    assert len(status) == 1 and "6/6" in status[0], status  # under the bar, only the final count is logged
