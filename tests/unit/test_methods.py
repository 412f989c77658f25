"""Methods are plug-ins: the registry, the generic hash chain, the core's independence from every method."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest
from helpers.data import REPO

from transfgu.config import Config, load_config
from transfgu.methods import REGISTRY, get_method, stage_hashes

PKG = REPO / "transfgu"
#: The core: knows no method (docs/architecture.md, "A method is a plug-in").
CORE = ("pipeline", "context", "layout", "integrity", "tracking", "report", "preflight", "method", "sharded",
        "local", "distributed/pipeline", "distributed/executor")
METHOD_MODULES = ("transfgu.methods.", "transfgu.stages", "transfgu.leopart", "transfgu.training",
                  "transfgu.evaluate_stage", "transfgu.concepts", "transfgu.crops", "transfgu.pseudo_labels")


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
    return out


@pytest.mark.parametrize("module", CORE)
def test_the_core_imports_no_method_and_never_branches_on_it(module):
    path = PKG / f"{module}.py"
    # the one-process executor still holds TransFGU's concepts and train loops; the report TransFGU's concept
    # galleries (reading concepts/ when there is one)
    allowed = {"local": ("transfgu.stages", "transfgu.concepts", "transfgu.training"),
               "report": ("transfgu.concepts",)}.get(module, ())
    assert not [m for m in _imports(path) if m.startswith(METHOD_MODULES) and not m.startswith(allowed)]
    assert "cfg.method ==" not in path.read_text(encoding="utf-8")
    assert ".method ==" not in path.read_text(encoding="utf-8")


def _method_comparisons(path: Path) -> list[str]:
    """Comparisons of a method's name with anything named ``method`` (``cfg.method == "leopart"``, ``self.method !=
    'transfgu'``, ``method in ("leopart", ...)``, ``"leopart" == m.method``...)."""
    def named_method(node: ast.AST) -> bool:
        return (isinstance(node, ast.Name) and "method" in node.id) or \
            (isinstance(node, ast.Attribute) and "method" in node.attr)

    def names(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [x for e in node.elts for x in names(e)]
        return []

    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(named_method, operands)) and [n for o in operands for n in names(o) if n in REGISTRY]:
                out.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return out


@pytest.mark.parametrize("module", (*CORE, "config"))
def test_the_core_compares_no_method_name(module):
    assert _method_comparisons(PKG / f"{module}.py") == []


def test_the_method_comparison_check_catches_each_form(tmp_path):
    forms = ['cfg.method == "leopart"', "self.method != 'transfgu'", 'method == "leopart_finetune"',
             '"leopart" == c.method', 'cfg.method in ("leopart", "x")']
    for form in forms:
        (tmp_path / "m.py").write_text(f"x = {form}\n")
        assert _method_comparisons(tmp_path / "m.py"), form
    (tmp_path / "m.py").write_text('x = cfg.method == other\ny = name == "leopart"\n')
    assert _method_comparisons(tmp_path / "m.py") == []


def test_no_untyped_context_executor_or_loader_in_the_package():
    offenders = [f"{p.relative_to(PKG)}: {a.arg}" for p in PKG.rglob("*.py")
                 for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for a in node.args.args + node.args.kwonlyargs
                 if a.arg in ("ctx", "ex", "loader") and a.annotation is not None
                 and ast.unparse(a.annotation) == "Any"]
    assert not offenders


def test_every_registered_method_loads_and_names_itself():
    assert set(REGISTRY) == {"transfgu", "leopart", "leopart_finetune"}
    for name in REGISTRY:
        m = get_method(name)
        assert m.name == name and m.stages and len(set(m.stage_names)) == len(m.stage_names)
    with pytest.raises(ValueError, match="known methods"):
        get_method("nope")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_stage_hashes_chain_each_stage_inputs_with_its_upstream_hash():
    cfg = load_config(None, ["method=leopart", "run.root=/tmp/x"])
    h = stage_hashes(cfg)
    d = json.loads(cfg.model_dump_json())
    lp = d["leopart"]
    dense = _sha({"method": "leopart", "data": d["data"], "backbone": d["backbone"],
                  "input_size": lp["input_size"], "seed": d["run"]["seed"]})
    assert h["dense"] == dense
    assert h["pca"] == _sha({"up": dense, "pca_dim": lp["pca_dim"]})
    assert h["segments"] == _sha({"up": h["communities"]})
    # one changed setting changes its stage and every stage after it, none before
    other = stage_hashes(load_config(None, ["method=leopart", "run.root=/tmp/x", "leopart.k_cbfe=7"]))
    assert [s for s in h if h[s] != other[s]] == ["cbfe", "communities", "segments", "evaluate"]


@pytest.mark.parametrize(("method", "absent", "present"), [
    ("transfgu", ("leopart", "finetune"), ("crops", "concepts", "pseudo", "train", "eval")),
    ("leopart", ("crops", "concepts", "pseudo", "train", "eval", "finetune"), ("leopart",)),
    ("leopart_finetune", ("crops", "concepts", "pseudo", "train", "eval", "leopart"), ("finetune",)),
])
def test_a_run_shows_its_own_method_sections_only(tmp_path, method, absent, present):
    cfg = load_config(None, [f"method={method}", f"run.root={tmp_path}"])
    params = {k.split(".")[0] for k in cfg.flat()}  # the MLflow params
    assert not params & set(absent) and set(present) <= params
    dumped = cfg.to_yaml()  # config.yaml and the report's configuration section
    assert not [s for s in absent if f"\n{s}:" in "\n" + dumped]
    (tmp_path / "config.yaml").write_text(dumped)
    assert load_config(tmp_path / "config.yaml") == cfg  # read back: the same config
    assert isinstance(cfg, Config)
