"""cluster.yaml passes Ray's own autoscaler schema check; docker/Dockerfile pins what pyproject.toml allows."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    text = (REPO / "docker" / "Dockerfile").read_text()
    pin = re.compile(r'"?([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s"\\]+)"?')
    return {m.group(1).lower(): m.group(2) for m in pin.finditer(text)}


def _requirements() -> dict:
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    return {r.name.lower(): r for r in reqs}


def test_cluster_yaml_is_valid_for_ray():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))  # raises on a schema error
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert "GPU" not in head.get("resources", {})  # a CPU head
    gpu = types["gpu_workers"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))
    assert gpu["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert any(o.startswith("--shm-size") for o in raw["docker"]["run_options"])
    assert "ray-ml" not in raw["docker"]["image"]


def test_cluster_yaml_schema_check_can_fail():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    raw["available_node_types"]["gpu_workers"]["min_wrokers"] = 0  # a typo
    with pytest.raises(Exception, match="min_wrokers"):
        validate_config(prepare_config(raw))


def test_dockerfile_pins_equal_the_project():
    pins = _pins()
    reqs = _requirements()
    base = re.search(r"^FROM rayproject/ray:([0-9.]+)-py(\d)(\d+)-(?:gpu|cu\d+)", (REPO / "docker" / "Dockerfile")
                     .read_text(), re.M)
    assert base, "the image must build FROM a rayproject/ray GPU tag"
    assert base.group(1) == pins["ray"] == version("ray")
    # every runtime dependency is pinned (faiss-gpu stands for faiss-cpu in the GPU image)
    wanted = set(reqs) - {"faiss-cpu"}
    assert wanted <= set(pins), sorted(wanted - set(pins))
    for name, pin in pins.items():
        if name in reqs:
            assert reqs[name].specifier.contains(pin, prereleases=True), (name, pin, str(reqs[name].specifier))
        if name != "faiss-gpu-cu12":  # not installable on the CPU test machine
            assert pin == version(name), (name, pin, version(name))
