"""cluster.yaml passes Ray's own autoscaler schema check (the image's pins: tests/unit/test_environment.py)."""

from __future__ import annotations

import pytest
import yaml
from helpers.data import REPO

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.ray



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
