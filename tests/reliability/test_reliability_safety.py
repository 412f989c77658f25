"""Reliability, safety (issue 5 item 4): no pickle in stored artifacts, no unsafe loads, no shell, localhost only.

* Every file a full run writes -- the run directory with its prediction checkpoint ``model/``, and the MLflow store
  and artifacts of a tracked re-run -- is opened with a safe reader of its format and scanned for pickle streams.
* The package source is parsed (AST, not grep, so comments and strings do not count): ``torch.load`` only with
  ``weights_only=True``; no ``torch.save``, ``pickle``/``cloudpickle``/``dill``/``joblib``, ``np.load(allow_pickle=
  True)``, unsafe ``yaml.load``, ``eval``/``exec``; no ``shell=True``, ``os.system`` or ``os.popen``.
* A Ray started by the package listens on 127.0.0.1 only, with the dashboard off by default; MLflow uses a SQLite
  file (no server socket) unless the user names a tracking URI.
* Data lists cannot point outside the data root: ``tests/unit/test_data.py::test_voc_split_file_cannot_escape_root`` and
  ``tests/unit/test_data.py::test_coco_stuff_layout_and_curated_list`` (absolute paths and ``..`` rejected).
"""

from __future__ import annotations

import ast
import inspect
import json
import shutil
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from helpers.configs import tiny_config
from helpers.data import REPO
from PIL import Image
from safetensors import safe_open

SOURCE_DIRS = ("transfgu", "ray_jobs")
PICKLE_SUFFIXES = {".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".bin", ".pt2"}


def _is_pickle_stream(head: bytes) -> bool:
    # Protocol 2+ pickles start with PROTO (0x80) and the protocol number; torch.save zips hold data.pkl.
    return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def check_file(path: Path) -> str:
    """Open ``path`` with the safe reader of its format; returns the format; raises AssertionError otherwise."""
    head = path.read_bytes()[:8]
    assert path.suffix.lower() not in PICKLE_SUFFIXES, f"{path}: pickle-capable file type"
    assert not _is_pickle_stream(head), f"{path}: pickle stream"
    if zipfile.is_zipfile(path):
        names = zipfile.ZipFile(path).namelist()
        assert not any(n.endswith((".pkl", ".pickle")) for n in names), f"{path}: zip holding a pickle {names[:5]}"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pq.read_table(path)
    elif suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif suffix == ".jsonl":
        [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix in (".yaml", ".yml") or path.name == "MLmodel":
        yaml.safe_load(path.read_text(encoding="utf-8"))
    elif suffix == ".safetensors":
        with safe_open(str(path), framework="numpy") as f:
            [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118 - safe_open is not iterable
    elif suffix == ".npy":
        np.load(path, allow_pickle=False)
    elif suffix in (".png", ".jpg", ".jpeg"):
        with Image.open(path) as im:
            im.verify()
    elif suffix == ".db":
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            con.execute("select count(*) from sqlite_master").fetchone()
    elif suffix in (".rows", ".u8"):  # training input stores: raw records behind their JSON stamp (train_store)
        from transfgu.data.train_store import ImageStore, PackedLabelBank

        stamp = path.with_suffix(".json")
        if suffix == ".rows":
            bank = PackedLabelBank(stamp)
            [bank.row(r) for r in range(len(bank))]
        else:
            store = ImageStore(stamp)
            [store.row(r) for r in range(store.rows)]
    elif suffix in (".csv", ".html", ".log", ".txt", ".svg", ".css", ".js", ".md"):
        path.read_text(encoding="utf-8")
    elif suffix == ".py" and "code" in path.parts:  # the package an MLflow model carries (its code path): source
        compile(path.read_text(encoding="utf-8"), str(path), "exec")
    else:
        raise AssertionError(f"{path}: unexpected file type in a run")
    return suffix or path.name


def _scan(root: Path) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        kind = check_file(path)
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def test_run_directory_holds_no_pickle(tiny_run_dir):
    kinds = _scan(tiny_run_dir)
    assert {".parquet", ".json", ".safetensors", ".npy", ".yaml", ".csv", ".png", ".html", ".log"} <= set(kinds)
    assert (tiny_run_dir / "model" / "decoder.safetensors").is_file()  # the prediction checkpoint was scanned


def test_mlflow_store_and_artifacts_hold_no_pickle(tiny_run_dir, tmp_path):
    shutil.copytree(tiny_run_dir, tmp_path / "tiny")
    from transfgu.pipeline import run_pipeline

    run_pipeline(tiny_config(tmp_path, "tiny", **{"mlflow.enabled": "true"}))  # every stage is skipped; logs
    kinds = _scan(tmp_path)
    assert kinds.get(".db") == 1  # the SQLite tracking store
    artifacts = [p for p in tmp_path.rglob("*") if p.is_file() and "mlartifacts" in p.parts]
    assert any(p.name == "metrics.json" for p in artifacts)


def test_check_file_catches_pickles(tmp_path):
    import pickle

    import torch

    cases = {"a.pkl": None, "state.json": pickle.dumps({"a": 1}), "w.safetensors": pickle.dumps([1])}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data or b"x")
        with pytest.raises(AssertionError, match="pickle"):
            check_file(tmp_path / name)
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.data")  # torch.save's zip with data.pkl, any name
    with pytest.raises(AssertionError, match="pickle"):
        check_file(tmp_path / "model.data")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="allow_pickle"):
        check_file(tmp_path / "obj.npy")


# -- source ------------------------------------------------------------------------------------------------------
def _sources() -> list[Path]:
    files = [p for d in SOURCE_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py")]
    assert any(p.name == "pipeline.py" for p in files)
    return sorted(files)


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def source_findings(files: list[Path], root: Path = REPO) -> list[str]:
    bad: list[str] = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    if m.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"):
                        bad.append(f"{where}: imports {m}")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            if name == "torch.load" and _kw(node, "weights_only") is not True:
                bad.append(f"{where}: torch.load without weights_only=True")
            if name == "torch.save":
                bad.append(f"{where}: torch.save writes a pickle; use safetensors")
            if name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") not in (None, False):
                bad.append(f"{where}: {name} with allow_pickle")
            if name in ("np.save", "numpy.save") and _kw(node, "allow_pickle") is not False:
                bad.append(f"{where}: {name} pickles object arrays unless allow_pickle=False")
            if name == "yaml.load" and "Safe" not in ast.unparse(node):
                bad.append(f"{where}: yaml.load without SafeLoader")
            if name in ("eval", "exec", "os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput",
                        "pd.read_pickle", "pandas.read_pickle"):
                bad.append(f"{where}: {name}")
            if _kw(node, "shell") not in (None, False):
                bad.append(f"{where}: shell=True")
    return bad


def test_package_source_has_no_unsafe_calls():
    assert source_findings(_sources()) == []


def test_source_scan_catches_unsafe_calls(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import pickle, os, subprocess, torch, numpy as np, yaml\n"
        "torch.load('x')\ntorch.load('x', weights_only=False)\ntorch.save({}, 'x')\nnp.save('x', a)\n"
        "np.load('x', allow_pickle=True)\nos.system('ls ' + user)\nsubprocess.run(cmd, shell=True)\n"
        "yaml.load(text)\neval(s)\n"
        "# fine:\ntorch.load('x', weights_only=True)\nnp.load('x')\nnp.save('x', a, allow_pickle=False)\n"
        "yaml.safe_load(t)\nyaml.load(t, Loader=yaml.SafeLoader)\nsubprocess.run(['git', 'rev-parse', 'HEAD'])\n"
    )
    found = source_findings([bad], root=tmp_path)
    assert [int(f.split(":")[1]) for f in found] == list(range(1, 11)), found


def test_subprocess_calls_take_argument_lists():
    """The only subprocesses of the package run fixed argument lists (no string built from user input)."""
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _dotted(node.func).startswith("subprocess."):
                assert node.args and isinstance(node.args[0], (ast.List, ast.Tuple)), (
                    f"{path.relative_to(REPO)}:{node.lineno}: subprocess with a non-list command")


# -- network exposure --------------------------------------------------------------------------------------------
def test_local_ray_listens_on_localhost_only(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    from transfgu.distributed.cluster import init_ray

    default_host = inspect.signature(ray.init).parameters["dashboard_host"].default  # Ray's own default
    calls: list[dict] = []

    def fake_init(**kwargs):
        calls.append(kwargs)
        if kwargs.get("address") == "auto":
            raise ConnectionError("no running cluster")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})
    init_ray(tiny_config(tmp_path))
    started = calls[-1]
    assert started.get("address") in (None, "local")  # a new private local Ray, not a join
    assert started.get("_node_ip_address") == "127.0.0.1"
    assert started.get("include_dashboard") is False  # the dashboard is off unless ray.include_dashboard=true
    assert started.get("dashboard_host", default_host) in ("127.0.0.1", "localhost", "::1")


def test_no_source_binds_all_interfaces():
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        assert "0.0.0.0" not in text and "dashboard_host=\"0" not in text, path


def test_mlflow_default_store_is_a_local_file(tmp_path, monkeypatch):
    from transfgu.tracking import resolve_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = resolve_tracking_uri(tiny_config(tmp_path))
    assert uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve().as_posix()}"  # a file: no server socket


def test_package_starts_no_servers():
    """The package's only subprocesses are ``git rev-parse`` (run metadata) and a Python child of this same
    interpreter (``sys.executable``: Leopart's Infomap worker, isolated for its bundled OpenMP); it starts no
    MLflow/Ray server itself."""
    commands = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and _dotted(node.func).startswith("subprocess."):
                first = node.args[0].elts[0] if isinstance(node.args[0], ast.List) else node.args[0]
                commands.append("sys.executable" if _dotted(first) == "sys.executable" else ast.literal_eval(first))
    assert set(commands) <= {"git", "sys.executable"}, commands
    assert "git" in commands  # the scan sees the known call (it can fail)
