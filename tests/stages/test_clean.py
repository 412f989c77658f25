"""``transfgu clean``: lists what the pipeline set aside under ``_stale/`` and deletes only that, only with --yes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from transfgu.clean import main, remove_entries, stale_entries
from transfgu.cli import main as cli_main
from transfgu.integrity import set_aside


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "label_bank").mkdir(parents=True)
    (run / "_manifest.json").write_text("{}", encoding="utf-8")
    (run / "label_bank" / "part-0.parquet").write_bytes(b"x" * 1000)
    (run / "features").mkdir()
    (run / "features" / "part-0.parquet").write_bytes(b"y" * 300)
    return run


def _set_aside_two(run: Path) -> None:
    """What the pipeline does on a re-run under new settings: the old outputs are moved aside (the real producer)."""
    set_aside(run / "label_bank", run, "label_bank", "a" * 64, "test")
    set_aside(run / "features" / "part-0.parquet", run, "extract", None, "test")


def test_lists_without_deleting_then_deletes_only_stale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path)
    _set_aside_two(run)
    (run / "model").mkdir()
    (run / "model" / "decoder.safetensors").write_bytes(b"m" * 50)

    entries = stale_entries(run)
    assert sorted((e.stage, e.tag, e.bytes) for e in entries) == [("extract", "unstamped", 300),
                                                                 ("label_bank", "a" * 12, 1000)]
    assert main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "2 set-aside outputs and caches" in out and "--yes" in out
    assert (run / "_stale" / "label_bank" / ("a" * 12) / "label_bank" / "part-0.parquet").is_file()

    assert main([str(run), "--yes"]) == 0
    assert "1.3 KiB freed" in capsys.readouterr().out
    assert not (run / "_stale").exists()
    assert (run / "model" / "decoder.safetensors").read_bytes() == b"m" * 50  # nothing outside _stale/ touched
    assert (run / "_manifest.json").is_file()
    assert main([str(run)]) == 0 and "nothing set aside" in capsys.readouterr().out


def test_stage_and_age_filters(tmp_path: Path) -> None:
    run = _run_dir(tmp_path)
    _set_aside_two(run)
    old = time.time() - 10 * 86400
    os.utime(run / "_stale" / "extract" / "unstamped", (old, old))

    assert [e.stage for e in stale_entries(run, stages=["label_bank"])] == ["label_bank"]
    assert [e.stage for e in stale_entries(run, older_than_days=5)] == ["extract"]
    assert main([str(run), "--older-than", "5", "--yes"]) == 0
    assert not (run / "_stale" / "extract").exists()
    assert (run / "_stale" / "label_bank").is_dir()
    assert main([str(run), "--stage", "label_bank", "-y"]) == 0
    assert not (run / "_stale").exists()


def test_refuses_a_folder_that_is_not_a_run_and_a_stale_link_that_escapes(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    foreign = tmp_path / "photos"
    (foreign / "_stale" / "x" / "y").mkdir(parents=True)
    assert main([str(foreign), "--yes"]) == 2
    assert "not a transfgu run directory" in capsys.readouterr().err
    assert (foreign / "_stale" / "x" / "y").is_dir()

    run = _run_dir(tmp_path)
    outside = tmp_path / "precious"
    (outside / "tag").mkdir(parents=True)
    (outside / "tag" / "keep.txt").write_text("keep", encoding="utf-8")
    (run / "_stale").mkdir()
    (run / "_stale" / "label_bank").symlink_to(outside, target_is_directory=True)
    assert stale_entries(run) == []  # a symlinked stage folder is not listed ...
    fake = stale_entries.__globals__["StaleEntry"]("label_bank", "tag", run / "_stale" / "label_bank" / "tag", 4, 0.0)
    with pytest.raises(ValueError, match="refusing"):  # ... nor deleted when handed over directly
        remove_entries(run, [fake])
    assert (outside / "tag" / "keep.txt").read_text(encoding="utf-8") == "keep"


def test_is_a_transfgu_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path)
    assert cli_main(["clean", str(run)]) == 0
    assert "nothing set aside" in capsys.readouterr().out


def test_train_input_caches_are_listed_and_deleted_only_on_request(tiny_run_dir: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A finished run's packed label bank and image store (written by its training) are caches: listed with
    --train-input, deleted with --yes, and the label bank itself is untouched."""
    import shutil

    from transfgu.clean import train_input_entries

    run = tmp_path / "tiny"
    shutil.copytree(tiny_run_dir, run)
    caches = train_input_entries(run)
    assert {e.tag.split("-")[0] for e in caches} == {"bank", "images"} and all(e.bytes > 0 for e in caches)
    bank_files = sorted(p.name for p in (run / "label_bank").glob("*.parquet"))
    assert main([str(run)]) == 0 and "nothing set aside" in capsys.readouterr().out  # not without the flag
    assert main([str(run), "--train-input"]) == 0
    assert f"{len(caches)} set-aside outputs and caches" in capsys.readouterr().out
    assert train_input_entries(run) == caches
    assert main([str(run), "--train-input", "--yes"]) == 0
    assert train_input_entries(run) == []
    assert sorted(p.name for p in (run / "label_bank").glob("*.parquet")) == bank_files
