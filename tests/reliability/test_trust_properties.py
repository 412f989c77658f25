"""Property-based tests (hypothesis) of the readers of untrusted input: the config loader (files and overrides) and
the model-file loaders. Whatever the input, the result is a valid object or the reader's one documented error
(``ConfigError``, ``FileSchemaError``, ...): never another exception (a traceback), never an unbounded allocation.
The HTTP endpoint's properties are in tests/ray/test_trust_serve.py (they need Ray)."""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transfgu.config import ConfigError, load_config
from transfgu.schemas import (
    ConceptsMeta,
    FileSchemaError,
    ManifestFile,
    StateInfo,
    read_json,
    validate,
    validate_model_meta,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                      HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
CONFIG_KEYS = ["run.name", "run.seed", "crops.input_size", "crops.batch_size", "concepts.k_per_pool",
               "concepts.k_per_pool.fg", "train.epochs", "train.train_size", "eval.eval_size", "data.options.x",
               "data.name", "backbone.arch", "leopart.input_size", "nonsense.key", "run", ""]


@FAST
@given(text=st.text(max_size=400) | st.builds(lambda v: yaml.safe_dump(v), json_values))
def test_config_file_is_a_config_or_a_config_error(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_text(text, encoding="utf-8")
    try:
        load_config(f)
    except ConfigError as exc:
        assert str(exc)


@FAST
@given(overrides=st.lists(st.tuples(st.sampled_from(CONFIG_KEYS),
                                    st.text(max_size=60) | st.builds(lambda v: yaml.safe_dump(v).strip(),
                                                                     json_values)),
                          max_size=4))
def test_config_overrides_are_a_config_or_a_config_error(overrides):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in overrides])
    except ConfigError as exc:
        assert str(exc)
    else:
        assert max(cfg.crops.input_size) >= 1


# -- model files ---------------------------------------------------------------------------------------------------
VALID_META = {
    "format": "transfgu-model/1",
    "backbone": {"arch": "vit_test_tiny", "weights": "none", "pretrained": False, "prior": "random",
                 "pos_embed": "timm"},
    "decoder": {"n_classes": 4, "d_encoder": 48, "cls_emb_init": "orthogonal"},
    "variant": "paper", "k_per_pool": {"all": 4}, "eval_size": [64, 80], "train_size": [64, 80],
    "class_names": ["sky", "road", "car", "tree", "person"], "cluster_to_class": [0, 1, -1, 4], "config": {},
    "selection": "last", "input_hash": "abc", "backbone_file": "backbone.safetensors",
}


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


META_PATHS = [p for p in _paths(VALID_META) if p]


def _mutate(obj, path, value, delete):
    obj = copy.deepcopy(obj)
    node = obj
    for k in path[:-1]:
        node = node[k]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return obj


mutations = st.tuples(st.sampled_from(META_PATHS), json_values, st.booleans())


def test_the_valid_meta_is_valid():
    validate_model_meta("model.json", VALID_META)


@FAST
@given(muts=st.lists(mutations, min_size=1, max_size=3))
def test_mutated_model_json_is_valid_or_named(muts):
    meta = VALID_META
    for path, value, delete in muts:
        try:
            meta = _mutate(meta, path, value, delete)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed the path
            continue
    try:
        out = validate_model_meta("model.json", meta)
    except FileSchemaError as exc:
        assert str(exc).startswith("model.json: field ")
    else:  # what the readers rely on holds
        n = out["decoder"]["n_classes"]
        assert 1 <= n <= 4096 and all(1 <= int(s) <= 8192 for s in out["eval_size"])
        m = out.get("cluster_to_class")
        assert m is None or (len(m) == n and max(m, default=-1) < max(len(out.get("class_names") or []), 1 << 16))


@FAST
@given(data=st.binary(max_size=300) | st.builds(lambda v: json.dumps(v).encode(), json_values))
def test_random_bytes_are_json_or_a_named_error(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("j") / "state.json"
    f.write_bytes(data)
    for cls in (None, StateInfo, ConceptsMeta, ManifestFile):
        try:
            read_json(f, cls)
        except FileSchemaError as exc:
            assert str(f) in str(exc)


@FAST
@given(obj=json_values)
def test_random_objects_against_every_schema(obj):
    for cls in (StateInfo, ConceptsMeta, ManifestFile):
        with contextlib.suppress(FileSchemaError):
            validate("f.json", obj, cls)


def test_a_huge_file_is_refused_without_reading_it(tmp_path):
    f = tmp_path / "model.json"
    with open(f, "wb") as fh:
        fh.truncate(65 * 1024**2)  # sparse: 65 MB announced, nothing allocated
    with pytest.raises(FileSchemaError, match="bytes, more than"):
        read_json(f)


@pytest.fixture(scope="module")
def real_ckpt(tiny_run_dir, tmp_path_factory) -> Path:
    return Path(shutil.copytree(tiny_run_dir / "model", tmp_path_factory.mktemp("ck") / "model"))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(mut=mutations)
def test_a_mutated_checkpoint_loads_and_predicts_or_is_refused(real_ckpt, tmp_path_factory, mut):
    """The property the CLIs rely on: predict.load either gives a predictor that works on an image, or raises one of
    the errors they turn into a one-line refusal (FileNotFoundError, ValueError, RuntimeError)."""
    from transfgu.predict import load

    d = Path(shutil.copytree(real_ckpt, tmp_path_factory.mktemp("m") / "model"))
    meta = json.loads((d / "model.json").read_text())
    path, value, delete = mut
    try:
        meta = _mutate(meta, path, value, delete)
    except (KeyError, IndexError, TypeError):
        return
    (d / "model.json").write_text(json.dumps(meta))
    try:
        p = load(d, device="cpu")
    except (FileNotFoundError, ValueError, RuntimeError):
        return
    lab = p.predict(np.zeros((40, 50, 3), np.uint8), as_classes=p.cluster_to_class is not None)
    assert lab.shape == (40, 50)
