"""The configuration is a union discriminated on ``method``: each method's config holds the shared sections and its own
only, a section of another method is refused in one line, and the stage hashes of the presets did not move."""

from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from helpers.data import REPO
from pydantic import ValidationError

from transfgu.config import (
    DEFAULT_METHOD,
    METHOD_CONFIGS,
    Config,
    ConfigError,
    LeopartMethodConfig,
    TransfguMethodConfig,
    load_config,
)
from transfgu.methods import REGISTRY, get_method, stage_hashes

CONF = REPO / "conf"
PRESETS = sorted(p.stem for p in CONF.glob("*.yaml"))
SHARED = ("method", "data", "backbone", "run", "mlflow", "ray")
#: Every method's own top-level keys, written out here (not read from the classes under test).
OWN = {
    "transfgu": ("protocol", "crops", "concepts", "pseudo", "train", "eval"),
    "leopart": ("leopart",),
    "leopart_finetune": ("finetune",),
}
#: (method, key of another method, an override that sets something in it)
FOREIGN = [(m, key, override) for m in OWN for other in OWN if other != m for key, override in (
    ("protocol", "protocol=paper"), ("crops", "crops.crop_size=32"), ("concepts", "concepts.niter=3"),
    ("pseudo", "pseudo.batch_size=2"), ("train", "train.epochs=3"), ("eval", "eval.batch_size=2"),
    ("leopart", "leopart.k_cbfe=7"), ("finetune", "finetune.epochs=2"),
) if key in OWN[other]]


def _owner(key: str) -> str:
    return next(m for m, keys in OWN.items() if key in keys)


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_the_union_covers_the_registry_and_each_method_names_its_class():
    assert set(METHOD_CONFIGS) == set(REGISTRY) == set(OWN)
    for name, cls in METHOD_CONFIGS.items():
        assert get_method(name).config is cls
        assert tuple(cls.model_fields) == SHARED + OWN[name]


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_loads_into_its_method_class(preset):
    path = CONF / f"{preset}.yaml"
    method = (yaml.safe_load(path.read_text()) or {}).get("method", DEFAULT_METHOD)
    cfg = load_config(path)
    assert type(cfg) is METHOD_CONFIGS[method] and cfg.method == method
    others = {k for m, keys in OWN.items() if m != method for k in keys}
    assert not [k for k in others if hasattr(cfg, k)]
    assert {k.split(".")[0] for k in cfg.flat()} == set(SHARED + OWN[method])  # the MLflow params
    assert set(yaml.safe_load(cfg.to_yaml())) == set(SHARED + OWN[method])  # config.yaml, the report


@pytest.mark.parametrize(("method", "key", "override"), FOREIGN)
def test_a_key_of_another_method_is_refused_in_one_line(tmp_path, method, key, override):
    owner = _owner(key)
    # in a file
    path = tmp_path / "c.yaml"
    value = "paper" if key == "protocol" else {override.split(".")[1].split("=")[0]: 2}
    path.write_text(yaml.safe_dump({"method": method, key: value}))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg and f"`{key}`" in msg and f"method {owner}" in msg and f"method {method} reads" in msg
    assert msg.startswith(str(path)) and "remove" in msg
    # as a dotted override, the method given in the file, by an override before or after it, or by default
    for overrides in ([override], [f"method={method}", override], [override, f"method={method}"]):
        base = None if overrides != [override] else path.with_name("m.yaml")
        if base is not None:
            base.write_text(f"method: {method}\n")
        with pytest.raises(ConfigError) as info:
            load_config(base, overrides)
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith(f"override {override!r}") and f"`{key}`" in msg, msg
        assert f"method {method} reads" in msg
    # validated directly (a Ray worker's copy): pydantic's error, with the same sentence
    with pytest.raises(ValidationError, match=f"`{key}` is a "):
        Config.model_validate({"method": method, key: value})


def test_overrides_of_the_run_method_and_switching_method_by_override():
    lp = load_config(CONF / "leopart_msrc.yaml", ["leopart.k_cbfe=7", "leopart.input_size=[64, 64]"])
    assert isinstance(lp, LeopartMethodConfig) and lp.leopart.k_cbfe == 7 and lp.leopart.input_size == (64, 64)
    # the method may come after the keys it owns: keys are checked against the method the config ends up with
    lp2 = load_config(None, ["leopart.k_cbfe=7", "method=leopart"])
    assert lp2.method == "leopart" and lp2.leopart.k_cbfe == 7
    ft = load_config(CONF / "leopart_finetune_tiny.yaml", ["finetune.epochs=1", "run.name=x"])
    assert ft.finetune.epochs == 1 and ft.run.name == "x"
    tf = load_config(CONF / "tiny.yaml", ["train.epochs=1", "concepts.k_per_pool.all=3"])
    assert isinstance(tf, TransfguMethodConfig) and tf.train.epochs == 1 and tf.concepts.k == 3
    # a TransFGU preset switched to Leopart keeps its TransFGU sections: refused, naming the first
    with pytest.raises(ConfigError, match="tiny.yaml: `crops` is a TransFGU section"):
        load_config(CONF / "tiny.yaml", ["method=leopart"])
    with pytest.raises(ConfigError, match="unknown method 'nope'; choose one of leopart, leopart_finetune, transfgu"):
        load_config(None, ["method=nope"])
    with pytest.raises(ConfigError, match="unknown config key 'leopart.k_cbf'"):
        load_config(None, ["method=leopart", "leopart.k_cbf=3"])


def test_model_validate_on_config_gives_the_method_class_and_round_trips():
    for name, cls in METHOD_CONFIGS.items():
        cfg = load_config(None, [f"method={name}"])
        again = Config.model_validate(json.loads(cfg.model_dump_json()))  # what a Ray worker rebuilds
        assert type(again) is cls and again == cfg
    assert type(Config.model_validate({})) is TransfguMethodConfig  # no method: TransFGU
    with pytest.raises(ValidationError, match="shared sections"):
        Config()


def test_a_run_directory_config_of_an_older_version_is_read_back(tmp_path):
    """Before the union, config.yaml held every method's sections: reading a run directory back drops the others';
    a config given to a run is refused."""
    from transfgu.report import _validate_lenient

    cfg = load_config(CONF / "leopart_msrc.yaml")
    legacy = {**cfg.method_dump(), "protocol": "default",
              **{k: json.loads(TransfguMethodConfig().model_dump_json())[k] for k in OWN["transfgu"][1:]},
              "finetune": {"epochs": 50}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(legacy))
    with pytest.raises(ConfigError, match=r"config.yaml: `\w+` is a TransFGU (section|setting)"):
        load_config(path)
    assert load_config(path, drop_other_methods=True) == cfg
    assert _validate_lenient(legacy) == cfg


def test_paper_protocol_is_each_method_config_s_own_decision():
    assert load_config(None, ["protocol=paper"]).follows_paper
    assert not load_config(None, []).follows_paper
    assert load_config(None, ["method=leopart", "leopart.protocol=paper"]).follows_paper
    assert not load_config(None, ["method=leopart"]).follows_paper
    assert not load_config(None, ["method=leopart_finetune"]).follows_paper


#: sha256 (first 16 hex digits) of every preset's ``stage_hashes`` (sorted-key JSON), computed with the code before
#: the configuration became a union (one class with every method's sections): a run started before resumes after.
#: A deliberate change of a stage's hash inputs changes these; update them with it.
PRESET_HASHES = {
    "cityscapes27": "7471758f2af41cb3",
    "coco80": "7f0eca2addec249d",
    "coco_stuff171": "edcfa7e153b41de6",
    "coco_stuff27": "e6194e342036af22",
    "coco_stuff27_curated": "ef06c0f1c5c32e96",
    "coco_stuff27_dinov2_reg": "8b6053f86360923f",
    "coco_stuff27_dinov3": "7f0fee42562e0e99",
    "demo_camvid": "5a8574b81b5991fe",
    "demo_camvid_dinov2_reg": "d30b7eb86f828385",
    "demo_camvid_dinov3": "4718d11f66dbc74d",
    "leopart_finetune": "b5c4fec407b17979",
    "leopart_finetune_camvid": "45402019dcdf3f82",
    "leopart_finetune_tiny": "289e17232c17fa75",
    "leopart_horse": "341ca9e46fcb8c37",
    "leopart_msrc": "e1c4412f425dcf2d",
    "leopart_pvoc": "3c5c937272cdfdaa",
    "leopart_pvoc_dinov2_reg": "2e8c11bc35f05881",
    "leopart_pvoc_dinov3": "136614415ec32af4",
    "lip16": "cdf5f8b0fe2ec7cb",
    "lip19": "bdba73b1c2919829",
    "lip5": "72f0c7af208d7606",
    "pascal_voc": "47689b32f769e8ea",
    "pascal_voc_dinov2_reg": "32f74feae2dd5eeb",
    "pascal_voc_dinov3": "bd1c2e5504d7d48c",
    "tiny": "2e3c78ab509df6a7",
}


@pytest.mark.parametrize("preset", PRESETS)
def test_stage_hashes_of_the_presets_are_unchanged(preset):
    """Regression: the hard-coded digests above are the pre-union code's; the chain is also recomputed here from a
    config that carries every other method's default sections (what the one-class config held), so a hash that
    came to read a section of another method would differ."""
    cfg = load_config(CONF / f"{preset}.yaml")
    h = stage_hashes(cfg)
    assert hashlib.sha256(json.dumps(h, sort_keys=True).encode()).hexdigest()[:16] == PRESET_HASHES[preset]
    full = json.loads(cfg.model_dump_json())
    for name, cls in METHOD_CONFIGS.items():
        if name != cfg.method:
            defaults = json.loads(cls().model_dump_json())
            full.update({k: defaults[k] for k in OWN[name]})
    up, chained = None, {}
    for stage in get_method(cfg.method).stages:
        up = _sha({**({"up": up} if up is not None else {}), **stage.inputs(full)})
        chained[stage.name] = up
    assert chained == h


def test_the_command_line_refuses_a_key_of_another_method_in_one_line(tmp_path, capsys):
    from transfgu.cli import run_main

    root = tmp_path / "runs"
    assert run_main(["--config", str(CONF / "tiny.yaml"), f"run.root={root}", "leopart.k_cbfe=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "override 'leopart.k_cbfe=3': `leopart` is a Leopart section" in err
    assert run_main(["--config", str(CONF / "leopart_msrc.yaml"), f"run.root={root}", "train.epochs=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "`train` is a TransFGU section" in err and "method leopart reads" in err
    assert not root.exists()
