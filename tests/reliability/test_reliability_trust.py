"""Trust boundaries (docs/reliability.md, "Trust boundaries"): what the program writes or deletes stays inside its
root, files follow the umask, one run per run directory, the command line takes stage names and overrides apart,
and every refusal is one line with exit code 2 before any work."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.configs import TINY_CONFIG
from helpers.data import REPO, require_shared_data

from transfgu.cli import parse_run_args, run_main


def _tiny_args(root: Path, *extra: str) -> list[str]:
    camvid = require_shared_data("camvid")
    return ["--config", str(TINY_CONFIG), f"data.root={camvid}", f"run.root={root}", *extra]


def _cli(*args: str, cwd: Path = REPO, umask: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m transfgu.cli ARGS`` in a fresh process (exit code and stderr as a user sees them)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "transfgu.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=pre)


# -- the command line: stage names and overrides ------------------------------------------------------------------
def test_an_override_after_only_is_an_override_not_a_stage(tmp_path: Path) -> None:
    cfg, args = parse_run_args(_tiny_args(tmp_path, "--only", "extract", "run.name=a", "train.epochs=1"),
                               "transfgu run", None)
    assert args.only == ["extract"]
    assert cfg.run.name == "a" and cfg.train.epochs == 1
    cfg, args = parse_run_args(_tiny_args(tmp_path, "--force", "train", "run.name=b"), "transfgu run", None)
    assert list(args.force) == ["train"] and cfg.run.name == "b"


@pytest.mark.parametrize("flag", ["--only", "--force"])
def test_unknown_stage_names_are_refused_with_the_valid_ones(tmp_path: Path, flag: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    assert run_main(_tiny_args(root, flag, "extrct")) == 2
    err = capsys.readouterr().err
    assert "'extrct'" in err and "extract, concepts, label_bank, train, evaluate" in err
    assert len(err.strip().splitlines()) == 1
    assert not root.exists()
    # the valid names are the run's method's: Leopart has no "extract"
    leopart = ["--config", str(REPO / "conf" / "leopart_msrc.yaml"), f"run.root={root}"]
    assert run_main([*leopart, flag, "extract"]) == 2
    assert "dense" in capsys.readouterr().err and not root.exists()


# -- paths: everything written or deleted stays inside its root ---------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", "..", "~x"])
def test_run_name_is_a_name_not_a_path(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "runs"
    assert run_main(_tiny_args(root, f"run.name={name.replace('/abs', str(tmp_path / 'abs'))}")) == 2
    err = capsys.readouterr().err
    assert "run.name" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the root nor anything beside it


def _run_with_stale(tmp_path: Path) -> Path:
    from transfgu.integrity import set_aside

    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    (run / "_manifest.json").write_text("{}", encoding="utf-8")
    (run / "features" / "part-0.parquet").write_bytes(b"y" * 300)
    set_aside(run / "features" / "part-0.parquet", run, "extract", None, "test")
    return run


def test_clean_never_follows_a_symlinked_stale_folder_out_of_the_run(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from transfgu.clean import main as clean_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "_manifest.json").write_text("{}", encoding="utf-8")
    outside = tmp_path / "precious"
    (outside / "extract" / "unstamped").mkdir(parents=True)
    (outside / "extract" / "unstamped" / "thesis.tex").write_text("keep", encoding="utf-8")
    (outside / "extract" / "notes.txt").write_text("keep", encoding="utf-8")
    (run / "_stale").symlink_to(outside, target_is_directory=True)
    assert clean_main([str(run), "--yes"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and len(err.strip().splitlines()) == 1
    assert (outside / "extract" / "unstamped" / "thesis.tex").read_text(encoding="utf-8") == "keep"
    assert (outside / "extract" / "notes.txt").is_file()


def test_clean_deletes_only_what_the_pipeline_set_aside(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transfgu.clean import main as clean_main

    run = _run_with_stale(tmp_path)
    tag = run / "_stale" / "extract" / "unstamped"
    assert (tag / "part-0.parquet").is_file()
    (tag / "mine.txt").write_text("a user's file", encoding="utf-8")  # not set aside by the pipeline
    outside = tmp_path / "outside.txt"
    outside.write_text("keep", encoding="utf-8")
    (tag / "link").symlink_to(outside)  # a planted link: neither followed nor (unproven) removed
    assert clean_main([str(run), "--yes"]) == 0
    captured = capsys.readouterr()
    assert "mine.txt" in captured.err and "left alone" in captured.err
    assert not (tag / "part-0.parquet").exists()
    assert (tag / "mine.txt").read_text(encoding="utf-8") == "a user's file"
    assert (tag / "link").is_symlink() and outside.read_text(encoding="utf-8") == "keep"


def test_set_aside_refuses_a_stale_folder_that_leads_out_of_the_run(tmp_path: Path) -> None:
    from transfgu.integrity import set_aside
    from transfgu.paths import PathEscapeError

    run = tmp_path / "run"
    (run / "features").mkdir(parents=True)
    (run / "features" / "part-0.parquet").write_bytes(b"y")
    (tmp_path / "elsewhere").mkdir()
    (run / "_stale").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(PathEscapeError, match="outside"):
        set_aside(run / "features" / "part-0.parquet", run, "extract", None, "test")
    assert (run / "features" / "part-0.parquet").is_file() and not any((tmp_path / "elsewhere").iterdir())


def test_report_refuses_a_report_folder_linked_out_of_the_run(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from transfgu.report import main as report_main

    run = _run_with_stale(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "_report.json").write_text('{"files": ["photo.png"]}', encoding="utf-8")
    (elsewhere / "photo.png").write_bytes(b"png")
    (run / "report").symlink_to(elsewhere, target_is_directory=True)
    assert report_main([str(run)]) == 2
    assert "outside" in capsys.readouterr().err
    assert sorted(p.name for p in elsewhere.iterdir()) == ["_report.json", "photo.png"]
    # a real report/ folder with a planted link in it: refused as well, the link's target untouched
    (run / "report").unlink()
    (run / "report").mkdir()
    (run / "report" / "index.html").symlink_to(elsewhere / "photo.png")
    assert report_main([str(run)]) == 2
    assert (elsewhere / "photo.png").read_bytes() == b"png"


def test_predict_out_with_a_link_out_of_it_is_refused(tmp_path: Path) -> None:
    from transfgu.integrity import check_predict_output
    from transfgu.paths import PathEscapeError

    out = tmp_path / "pred"
    out.mkdir()
    (out / "predict.json").write_text("{}", encoding="utf-8")
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"x")
    (out / "img.png").symlink_to(victim)
    with pytest.raises(PathEscapeError, match="symbolic link"):
        check_predict_output(out, [tmp_path / "inputs"])
    (out / "img.png").unlink()
    (out / "overlay").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(PathEscapeError, match="symbolic link"):
        check_predict_output(out, [tmp_path / "inputs"])


def test_export_out_never_writes_through_a_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transfgu.export import main as export_main

    victim = tmp_path / "victim.txt"
    victim.write_text("keep", encoding="utf-8")
    (tmp_path / "model.pt").symlink_to(victim)
    assert export_main([str(tmp_path / "no-run"), "--out", str(tmp_path / "model.pt")]) == 2
    assert "symbolic link" in capsys.readouterr().err and victim.read_text(encoding="utf-8") == "keep"


def test_ray_storage_defaults_stay_inside_the_run(tmp_path: Path) -> None:
    from transfgu.paths import PathEscapeError, default_storage

    run = tmp_path / "run"
    run.mkdir()
    assert default_storage(None, run / "ray_results", run) == str((run / "ray_results").resolve())
    assert default_storage("s3://bucket/x", run / "ray_results", run) == "s3://bucket/x"  # the user's choice
    (run / "ray_results").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(PathEscapeError):
        default_storage(None, run / "ray_results", run)
    from transfgu.config import load_config
    from transfgu.distributed.tune import run_sweep

    with pytest.raises(ValueError, match="name"):
        run_sweep(load_config(None, [f"run.root={tmp_path}"]), name="../sweep")


# -- one run per run directory --------------------------------------------------------------------------------------
_HOLDER = """
import sys, time
from transfgu.runlock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock (as a run does from its first write to its end)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*")}


@pytest.mark.parametrize("entry", ["run", "run --ray", "ray_jobs/full_pipeline.py"])
def test_a_second_run_of_a_locked_directory_is_refused_before_writing(tmp_path: Path, entry: str) -> None:
    root = tmp_path / "runs"
    holder = _hold_lock(root / "tiny")
    try:
        before = _tree(root)
        args = [*entry.split()[1:], *_tiny_args(root, "concepts.k_per_pool={all: 6}")]
        if entry.startswith("ray_jobs"):
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            res = subprocess.run([sys.executable, str(REPO / entry), *args], cwd=REPO, env=env, capture_output=True,
                                 text=True, timeout=600)
        else:
            res = _cli("run", *args)
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "in use by another run" in lines[0] and f"pid {holder.pid}" in lines[0] and "host " in lines[0]
        assert _tree(root) == before  # nothing written by the refused run
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import json
    import signal

    from transfgu.runlock import LOCK_FILE, run_lock

    run = tmp_path / "run"
    holder = _hold_lock(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
    assert json.loads((run / LOCK_FILE).read_text(encoding="utf-8"))["pid"] == holder.pid  # left behind
    with caplog.at_level("WARNING", logger="transfgu.runlock"), run_lock(run):
        assert json.loads((run / LOCK_FILE).read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert f"pid {holder.pid}" in caplog.text and "taking over" in caplog.text
    assert "released" in json.loads((run / LOCK_FILE).read_text(encoding="utf-8"))


def test_the_lock_is_reentrant_in_one_thread_and_exclusive_across_threads(tmp_path: Path) -> None:
    import threading

    from transfgu.runlock import RunDirLocked, run_lock

    errors: list[BaseException] = []
    with run_lock(tmp_path / "run"), run_lock(tmp_path / "run"):  # the Ray executor nests the shared pipeline
        t = threading.Thread(target=lambda: _try(lambda: run_lock(tmp_path / "run").__enter__(), errors))
        t.start()
        t.join()
    assert len(errors) == 1 and isinstance(errors[0], RunDirLocked)
    with run_lock(tmp_path / "run"):  # released after the outer block
        pass


def _try(fn, errors: list[BaseException]) -> None:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - collected for the assertion
        errors.append(exc)


@pytest.mark.slow
def test_two_concurrent_runs_of_one_directory_the_second_is_refused(tmp_path: Path) -> None:
    """The probe: the same run.name started twice with different K. The second is refused with exit 2; the
    directory then holds the first run's config and results only."""
    import json
    import time

    import yaml

    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "transfgu.cli", "run", *_tiny_args(root)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not (root / "tiny" / "config.yaml").is_file():
        time.sleep(0.02)  # the first run has taken the directory's lock and started writing
    # Paused while the second starts: the tiny run can finish in less time than a second CLI takes to start on a
    # loaded machine, and the probe is about two runs at once
    assert first.poll() is None, first.communicate()[1]
    os.kill(first.pid, signal.SIGSTOP)
    try:
        second = _cli("run", *_tiny_args(root, "concepts.k_per_pool={all: 6}"))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, err
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
    assert f"pid {first.pid}" in second.stderr
    cfg = yaml.safe_load((root / "tiny" / "config.yaml").read_text(encoding="utf-8"))
    assert cfg["concepts"]["k_per_pool"] == {"all": 4}
    assert json.loads((root / "tiny" / "model" / "model.json").read_text())["k_per_pool"] == {"all": 4}


# -- refusals: one line, exit code 2, before any work ---------------------------------------------------------------
def _refusal_case(tmp_path: Path, case: str) -> list[str]:
    """The CLI arguments of one refusal probe (files it needs are written under ``tmp_path``)."""
    root = tmp_path / "runs"
    if case == "yaml tag":
        bad = tmp_path / "tag.yaml"
        bad.write_text("train: !!python/object/apply:os.system ['echo hi']\n", encoding="utf-8")
        return ["run", "--config", str(bad), f"run.root={root}"]
    if case == "weights not a checkpoint":
        (tmp_path / "w.pth").write_text("not a checkpoint", encoding="utf-8")
        return ["run", *_tiny_args(root, f"backbone.weights={tmp_path / 'w.pth'}")]
    if case == "weights of another model":
        import torch
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        return ["run", *_tiny_args(root, f"backbone.weights={tmp_path / 'w.safetensors'}")]
    if case == "two preflight problems":
        return ["run", *_tiny_args(root, f"data.root={tmp_path / 'nowhere'}", "crops.betas=[0.5, 0.05]")]
    if case == "unknown stage":
        return ["run", *_tiny_args(root, "--only", "extrct")]
    if case == "run.name a path":
        return ["run", *_tiny_args(root, "run.name=../x")]
    if case == "two bad values":
        return ["run", *_tiny_args(root, "train.lr=nan", "train.epochs=two")]
    raise AssertionError(case)


REFUSALS = ["yaml tag", "weights not a checkpoint", "weights of another model", "two preflight problems",
            "unknown stage", "run.name a path", "two bad values"]


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refusal_is_one_line_exit_2_and_creates_nothing(tmp_path: Path, case: str) -> None:
    res = _cli(*_refusal_case(tmp_path, case), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x").exists()


def test_verbose_shows_the_traceback_of_a_refusal(tmp_path: Path) -> None:
    res = _cli(*_refusal_case(tmp_path, "weights not a checkpoint"), "--verbose", cwd=tmp_path)
    assert res.returncode == 2 and "Traceback" in res.stderr and "PreflightError" in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not (tmp_path / "runs").exists()


def test_an_integrity_refusal_in_a_stage_is_one_line_without_traceback(tiny_run_dir: Path, tmp_path: Path) -> None:
    """Non-finite centroids found by the label-bank stage: refused with one ``error:`` line and exit 2 (the run's
    log lines before it are not part of the refusal), never a traceback."""
    import shutil

    import numpy as np

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run_dir, run)
    centroids = np.load(run / "concepts" / "centroids.npy")
    np.save(run / "concepts" / "centroids.npy", np.full_like(centroids, np.nan))
    res = _cli("run", *_tiny_args(tmp_path, "--only", "label_bank", "--force", "label_bank"), cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("non-finite centroids" in last or "values are not finite" in last)


# -- file modes follow the umask ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_every_file_of_a_run_and_its_mlflow_model_follows_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Atomic writes (mkstemp: 0600) and safetensors files (0600) used to ignore the umask: a run directory on
    shared storage, or an MLflow server running as another user, could not read the manifest, the config, the
    Parquet shards, the metrics, the weights. Now every file of a tiny tracked run, and of its logged MLflow
    model, has the mode ``0666 & ~umask``."""
    root = tmp_path / "runs"
    res = _cli("run", *_tiny_args(root, "mlflow.enabled=true"), cwd=tmp_path, umask=umask)
    assert res.returncode == 0, res.stderr[-3000:]
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".safetensors" for p in files) and any("mlartifacts" in p.parts for p in files)
    wrong = {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in files if p.stat().st_mode & 0o777 != mode}
    assert wrong == {}
