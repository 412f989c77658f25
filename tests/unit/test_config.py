"""Config: presets load, overrides apply, and every mistake fails early with the key in the message."""

from __future__ import annotations

import pytest
from helpers.data import REPO

from transfgu.config import METHOD_CONFIGS, ConfigError, TransfguMethodConfig, load_config

CONF = REPO / "conf"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONF.glob("*.yaml")))
def test_every_preset_validates(preset):
    cfg = load_config(CONF / preset)
    assert type(cfg) is METHOD_CONFIGS[cfg.method]
    assert cfg.method != "transfgu" or cfg.concepts.k >= 1


def test_paper_presets_carry_the_paper_settings():
    c27 = load_config(CONF / "coco_stuff27.yaml")
    assert c27.concepts.k_per_pool == {"fg": 12, "bg": 15} and c27.crops.resize_mode == "nearest"
    c171 = load_config(CONF / "coco_stuff171.yaml")
    assert c171.concepts.k_per_pool == {"fg": 80, "bg": 91} and c171.train.teacher_intervals == [3, 3, 3, 2]
    voc = load_config(CONF / "pascal_voc.yaml")
    assert voc.crops.betas == [0.6, 0.5, 0.4, 0.3] and voc.crops.selection == "fg" and voc.train.variant == "things"
    cs = load_config(CONF / "cityscapes27.yaml")
    assert cs.crops.input_size == (640, 1280) and cs.concepts.k_per_pool == {"all": 27} and cs.train.lr == 5e-5
    lip5 = load_config(CONF / "lip5.yaml")
    assert lip5.concepts.k == 5 and lip5.train.train_size == (480, 240) and lip5.data.options["granularity"] == 5


def test_overrides_parse_yaml_values_and_merge_into_dicts():
    cfg = load_config(CONF / "coco_stuff27.yaml", ["train.lr=3e-4", "crops.betas=[0.5, 0.3]",
                                                    "concepts.k_per_pool.fg=20", "data.options.curated_list=x.txt"])
    assert cfg.train.lr == 3e-4 and cfg.crops.betas == [0.5, 0.3]
    assert cfg.concepts.k_per_pool == {"fg": 20, "bg": 15}
    assert cfg.data.options == {"granularity": 27, "curated_list": "x.txt"}


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.lrr=1", "train.lrr"),
        ("trian.lr=1", "trian"),
        ("train.lr=abc", "train.lr"),
        ("concepts.k_per_pool.fg=0", "K must be >= 1"),
        ("crops.betas=[0.5, 1.5]", "crops.betas"),
        ("crops.betas=[0.0]", "crops.betas"),
        ("crops.selection=all", "k_per_pool"),
        ("backbone.arch=vit_huge", "backbone.arch"),
        ("train.teacher_intervals=[0]", "teacher_intervals"),
        ("crops.input_size=[4, 4]", "crops.input_size"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_fail_with_the_key_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1.0e-4\n  epocs: 3\n")
    with pytest.raises(ConfigError, match="epocs"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_yaml_round_trip_and_flat_view(tmp_path):
    cfg = load_config(CONF / "lip19.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    flat = cfg.flat()
    assert flat["train.lr"] == cfg.train.lr and flat["concepts.k_per_pool.all"] == 19
    default = TransfguMethodConfig()
    assert default.train.w_unc == 0.3 and default.train.w_div == 1.0  # eq. 16 weights of the reference
