"""Trust boundaries (docs/reliability.md, "Trust boundaries"): what the program writes or deletes stays inside its
root, files follow the umask, one run per run directory, the command line takes stage names and overrides apart,
and every refusal is one line with exit code 2 before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_CONFIG, require_shared_data

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
    assert run_main(_tiny_args(root, "method=leopart", flag, "extract")) == 2
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
