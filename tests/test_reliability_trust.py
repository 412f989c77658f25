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
