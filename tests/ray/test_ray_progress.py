"""A Ray task's progress bars reach the driver: the task reports its counts to a relay actor, the driver mirrors
them (a bar on a terminal, status lines and the final count in its log)."""

from __future__ import annotations

import logging
import time

import pytest

from transfgu.distributed.progress import relay_sink, run_with_progress
from transfgu.logs import Progress, progress_sink

pytestmark = pytest.mark.ray


@pytest.fixture(autouse=True)
def _by_value():
    """The task below is this module's function: it travels to the workers by value (they cannot import tests/)."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _work(relay, n: int, relayed: bool = True, fail: bool = False) -> int:
    import contextlib

    import ray

    with progress_sink(relay_sink(relay)) if relayed else contextlib.nullcontext():
        for stage in ("evaluate", "quality"):  # two bars, one after the other, as evaluate_model draws them
            with Progress(stage, n) as prog:
                for _ in range(n):
                    time.sleep(0.05)
                    prog.update(1)
                    if fail:
                        raise RuntimeError("the task failed half-way")
    ray.get(relay.snapshot.remote())
    return n


def _driver_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "transfgu"]


def test_the_tasks_bars_reach_the_drivers_log(ray_local, caplog):
    import ray

    caplog.set_level(logging.INFO, logger="transfgu")
    task = ray.remote(num_cpus=1)(_work)
    assert run_with_progress(lambda relay: task.remote(relay, 7), poll_s=0.2) == 7
    lines = _driver_lines(caplog)
    finals = [ln.split()[0] for ln in lines if " 7/7 (100.0%)" in ln]
    assert finals == ["[evaluate]", "[quality]"], lines  # the final count of each bar, once, in the task's order


def test_without_the_relay_the_driver_shows_nothing(ray_local, caplog):
    import ray

    caplog.set_level(logging.INFO, logger="transfgu")
    task = ray.remote(num_cpus=1)(_work)
    assert run_with_progress(lambda relay: task.remote(relay, 3, relayed=False), poll_s=0.2) == 3
    assert not [ln for ln in _driver_lines(caplog) if ln.startswith(("[evaluate]", "[quality]"))]


def test_a_failing_task_raises_in_the_driver_and_its_bar_is_closed(ray_local, caplog):
    import ray

    caplog.set_level(logging.INFO, logger="transfgu")
    task = ray.remote(num_cpus=1, max_retries=0)(_work)
    with pytest.raises(ray.exceptions.RayTaskError, match="failed half-way"):
        run_with_progress(lambda relay: task.remote(relay, 3, fail=True), poll_s=0.2)
    lines = [ln for ln in _driver_lines(caplog) if ln.startswith("[evaluate]")]
    assert len(lines) <= 1 and not any("3/3" in ln for ln in lines), lines  # closed where it stopped, not "done"
