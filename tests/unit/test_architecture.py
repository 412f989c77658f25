"""The structure docs/architecture.md describes: run layout, backbone source, progress, and the import rules
(only ``transfgu/distributed`` imports Ray; it never imports a private name of the method layer)."""

from __future__ import annotations

import ast
import io
import logging
from pathlib import Path

import pytest
from helpers.data import REPO

from transfgu.layout import STAGE_OUTPUTS, RunLayout, round_name, shard_file
from transfgu.logs import Progress
from transfgu.models.source import parse_source

PKG = REPO / "transfgu"


def test_run_layout_names_every_stage_output(tmp_path):
    lay = RunLayout(tmp_path / "run")
    assert {s: lay.output(s).name for s in STAGE_OUTPUTS} == {
        "extract": "features", "concepts": "concepts", "label_bank": "label_bank", "train": "train",
        "evaluate": "eval"}
    assert lay.round_dir(3) == tmp_path / "run" / "train" / "round_003" and round_name(12) == "round_012"
    assert lay.metrics == tmp_path / "run" / "eval" / "metrics.json"
    assert shard_file(lay.features, 2).name == "part-00002.parquet"
    assert shard_file(lay.features, 2, first=70).name == "part-00002-0000070.parquet"
    assert not (tmp_path / "run").exists()  # building a layout creates nothing


def test_backbone_source_is_parsed_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("none").kind == "random" and not parse_source("none").pretrained
    assert parse_source("timm").kind == "timm" and parse_source("timm").pretrained
    hub = parse_source("hub:vit_small_patch8_224.dino")
    assert (hub.kind, hub.tag, hub.spec) == ("hub", "vit_small_patch8_224.dino", "hub:vit_small_patch8_224.dino")
    f = parse_source("w/dino.pth")
    assert f.kind == "file" and f.path == (tmp_path / "w" / "dino.pth").resolve() and f.path.is_absolute()
    assert f.pretrained and parse_source(f.spec) == f


def test_backbone_config_source_matches_the_string(tmp_path):
    from transfgu.config import load_config

    cfg = load_config(None, ["backbone.weights=none"])
    assert cfg.backbone.source.kind == "random"
    cfg = load_config(None, [f"backbone.weights={tmp_path / 'x.pth'}"])
    assert cfg.backbone.source.path == tmp_path / "x.pth"


def test_progress_logs_periodically_when_not_on_a_terminal(caplog):
    stream = io.StringIO()  # not a tty: no bar, log lines
    with caplog.at_level(logging.INFO, logger="transfgu"), \
            Progress("extract", 10, stream=stream, min_interval_s=3600) as prog:
        for _ in range(10):
            prog.update(1)
    lines = [r.getMessage() for r in caplog.records if "[extract]" in r.getMessage()]
    # the first update (interval elapsed since the epoch) and the last one only, not one per update
    assert len(lines) == 2 and lines[-1].startswith("[extract] 10/10 (100.0%)")
    assert stream.getvalue() == ""


def test_progress_draws_a_bar_when_asked(caplog):
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="transfgu"), \
            Progress("label_bank", 4, stream=stream, bar=True) as prog:
        prog.update(4, "rows=4")
    assert "[label_bank]" in stream.getvalue() and "0/4" in stream.getvalue()  # the bar was drawn
    # and the log (pipeline.log) gets one final line, not one per update
    lines = [r.getMessage() for r in caplog.records if "[label_bank]" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("[label_bank] 4/4 (100.0%)")


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_only_the_distributed_package_imports_ray():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "distributed" not in p.parts
                 for mod, _ in _imports(p) if mod == "ray" or mod.startswith("ray.")]
    assert not offenders


def test_distributed_uses_only_public_names_of_the_method_layer():
    private = [f"{p.name}: {mod}.{n}" for p in (PKG / "distributed").glob("*.py") for mod, names in _imports(p)
               if mod.startswith("transfgu.") and not mod.startswith("transfgu.distributed")
               for n in names if n.startswith("_")]
    assert not private


@pytest.mark.parametrize("module", ["pipeline", "stages", "local"])
def test_method_modules_do_not_import_the_ray_executor(module):
    mods = [m for m, _ in _imports(PKG / f"{module}.py")]
    assert not [m for m in mods if m.startswith("transfgu.distributed")]


def test_pipeline_is_orchestration_only():
    assert len((PKG / "pipeline.py").read_text(encoding="utf-8").splitlines()) < 300


def test_run_command_has_one_ray_flag():
    from transfgu.cli import run_parser

    args = run_parser("transfgu run", None).parse_args(["--ray", "--verbose", "train.epochs=1"])
    assert args.ray and args.verbose and args.overrides == ["train.epochs=1"]
    assert not run_parser("transfgu run", None).parse_args([]).ray
