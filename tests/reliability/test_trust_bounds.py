"""Sizes that drive memory are bounded before any work (preflight, before the run directory exists), and
configuration text (files and ``key=value`` overrides) is bounded in size, nesting and YAML alias expansion."""

from __future__ import annotations

import time

import pytest
from helpers.configs import TINY_CONFIG, tiny_config
from helpers.data import REPO, require_shared_data

from transfgu.config import ConfigError, load_config
from transfgu.preflight import PreflightError, preflight


def test_huge_input_size_is_refused_before_the_run_directory_exists(tmp_path, capsys):
    """Regression: crops.input_size=[20000,20000] passed preflight, created the run and died on a 4.8 GB allocation."""
    from transfgu.cli import main

    cfg = tiny_config(tmp_path, "huge", **{"crops.input_size": "[20000,20000]"})
    with pytest.raises(PreflightError, match=r"crops\.input_size: \[20000, 20000\]: each side at most 8192"):
        preflight(cfg)
    camvid = require_shared_data("camvid")
    rc = main(["run", "--config", str(TINY_CONFIG), f"data.root={camvid}", f"run.root={tmp_path}", "run.name=huge",
               "crops.input_size=[20000,20000]"])
    assert rc == 2 and "crops.input_size" in capsys.readouterr().err
    assert not (tmp_path / "huge").exists()


def test_memory_estimate_refuses_what_the_machine_cannot_hold(tmp_path):
    import psutil

    from transfgu.preflight import pass_memory

    cfg = tiny_config(tmp_path, "wide", **{"backbone.arch": "vit_base_patch8", "crops.input_size": "[8000,8000]"})
    need = pass_memory((8000, 8000), 1, 8, 768, 1)
    assert need > psutil.virtual_memory().total  # ~30 GiB: one fp32 input of 768 MB and 1M tokens of 768 channels
    with pytest.raises(PreflightError, match=r"crops\.input_size: \[8000, 8000\] with crops\.batch_size=1 needs about "
                                             r"[\d.]+ GiB per pass \(estimate\)"):
        preflight(cfg)
    assert not (tmp_path / "wide").exists()


def test_memory_estimate_is_the_sum_of_its_parts():
    """Oracle: input (3 fp32 channels) + 40 bytes per token and channel + 8 bytes per output pixel and channel."""
    from transfgu.preflight import pass_memory

    h, w, b, p, d, c = 320, 640, 4, 8, 384, 28
    assert pass_memory((h, w), b, p, d, c) == b * (12 * h * w + 40 * (h // p) * (w // p) * d + 8 * c * h * w)


@pytest.mark.parametrize("preset", sorted((REPO / "conf").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_preset_is_within_the_bounds(preset):
    from transfgu.preflight import check_memory, patch_size_of

    cfg = load_config(preset)
    problems = check_memory(cfg, patch_size_of(cfg.backbone.arch))
    assert [key for key, msg in problems if "at most" in msg] == []


def _bomb(levels: int, width: int = 10) -> str:
    lines = ["data:", "  options:", "    l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_expansion_is_bounded(tmp_path):
    """Regression: a 'billion laughs' preset loaded (aliases of aliases, 10^6 values after expansion here)."""
    f = tmp_path / "laughs.yaml"
    f.write_text(_bomb(6))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="laughs.yaml: expands to more than 100000 values"):
        load_config(f)
    f.write_text(_bomb(9))  # 10^9 values: refused as fast
    with pytest.raises(ConfigError, match="laughs.yaml"):
        load_config(f)
    assert time.perf_counter() - t0 < 5


def test_alias_count_nesting_size_and_recursion_are_bounded(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  options:\n    a: &a 1\n    b: [" + ", ".join(["*a"] * 100) + "]\n")
    with pytest.raises(ConfigError, match="more than 64 YAML aliases"):
        load_config(f)
    f.write_text("data:\n  options:\n    x: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        load_config(f)
    f.write_text("data:\n  options:\n    x: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(f)
    f.write_text("run:\n  name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="bytes, more than"):
        load_config(f)
    f.write_bytes(b"run: {name: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="not a readable YAML file"):
        load_config(f)
    f.write_text("run: !!python/object:os.system {}\n")
    with pytest.raises(ConfigError, match="not a readable YAML file"):
        load_config(f)


def test_overrides_are_bounded_too():
    with pytest.raises(ConfigError, match="override 'data.options.x': nested deeper"):
        load_config(None, ["data.options.x=" + "[" * 100 + "]" * 100])
    with pytest.raises(ConfigError, match="override 'data.options.x': .* more than"):
        load_config(None, ["data.options.x=" + "a" * (2 * 1024 * 1024)])
    cfg = load_config(None, ["data.options.x=[1, 2, {a: 3}]"])
    assert cfg.data.options["x"] == [1, 2, {"a": 3}]
