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


#: Imports of the package's own modules inside functions: only for optional heavy dependencies (MLflow's pyfunc,
#: the Serve ingress that must not load torch), torch-free modules (the config, the CLI before its arguments are
#: parsed, Leopart's shard-actor modules) and nothing else (docs/architecture.md, "Import rules").
MAX_DEFERRED_IMPORTS = 40


def _package_import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> package modules it imports (at module level or inside a function: a deferred import still
    ties the two modules together), and the deferred ones as ``file:line``."""
    def name_of(path: Path) -> str:
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    files = {name_of(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    deferred = []
    for mod, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = {id(sub) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for sub in ast.walk(fn)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = ".".join(base_parts[:len(base_parts) - node.level + 1] + [node.module or ""]).strip(".")
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            hit = False
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != mod and t != PKG.name:
                    edges[mod].add(t)
                    hit = True
            if hit and id(node) in in_function:
                deferred.append(f"{path.relative_to(PKG.parent)}:{node.lineno}")
    return edges, deferred


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle_and_few_deferred_imports():
    edges, deferred = _package_import_graph()
    assert len(edges) > 50 and sum(map(len, edges.values())) > 300  # the walk saw the package
    assert _cycles(edges) == []
    assert len(deferred) <= MAX_DEFERRED_IMPORTS, "\n".join(deferred)


def test_leopart_entries_come_from_the_layout(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.dense_split("val") == tmp_path / "dense" / "val" and lay.pca_json == tmp_path / "pca" / "pca.json"
    assert lay.cbfe_arrays.parent == lay.cbfe and lay.communities_json.parent == lay.communities
    assert lay.segments_split("train").parent == lay.segments == tmp_path / "segments"
    assert lay.finetune_json == tmp_path / "finetune" / "finetune.json"
    assert lay.train_input.parent == lay.label_bank and lay.train_input.name.startswith("_")  # bank readers skip it
    assert lay.model_json == tmp_path / "model" / "model.json" and lay.report_index.parent == lay.report
