"""Fixtures and hooks only: the real images of ../shared/data, the tiny whole-method run, the shared local Ray and
the headless browser. What test modules share besides fixtures is in ``tests/helpers``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers.chromium import browser  # noqa: F401  (the `browser` fixture of the page tests)
from helpers.configs import tiny_config
from helpers.data import require_shared_data

# Ray replaces 127.0.0.1 with the machine's outward address unless told this is a single-machine setup; tests
# (and the Ray processes they start, which inherit the environment) must talk over loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def camvid() -> Path:
    return require_shared_data("camvid")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A finished one-process run of the whole method (read-only for tests: copy it before changing it)."""
    import torch

    from transfgu.pipeline import run_pipeline

    torch.set_num_threads(2)
    cfg = tiny_config(tmp_path_factory.mktemp("runs"))
    run_pipeline(cfg)
    return cfg.run_dir


@pytest.fixture(autouse=True)
def _keep_mlflow_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets ``MLFLOW_TRACKING_URI`` in the environment, which the pipeline reads:
    no test may leave it changed for the tests after it."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Tests (and module fixtures) set ``torch.set_num_threads`` for speed; the thread count changes the order of
    float reductions, so a bit-exact comparison with a run made earlier in the session (``tiny_run_dir``, 2 threads)
    must not depend on which test ran before it. Every test gets back the count it started with."""
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# -- the shared local Ray ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _ray_session():
    """Stops the shared local Ray at the end of the session (it starts at its first use)."""
    yield
    if "helpers.ray" in sys.modules:
        sys.modules["helpers.ray"].stop_shared_local()


#: Node ids of the modules still to run that use the shared local Ray (set after collection).
_SHARED_RAY_MODULES: set[str] = set()


@pytest.fixture(scope="module")
def ray_local(request, _ray_session):
    """The session's shared local Ray (2 CPUs, 127.0.0.1 only; ``helpers.ray.start_shared_local``): every module that
    needs a plain local Ray uses this one instead of starting its own. A module that needs other settings starts a
    cluster of its own through ``helpers.ray`` (which stops this one; it starts again at its next use). Each module
    leaves the cluster as it found it: no Serve application survives the module. After the last module that uses it,
    it stops (the rest of the session runs without Ray's processes)."""
    pytest.importorskip("ray")
    from helpers import ray as ray_helpers

    ray_helpers.start_shared_local()
    yield
    ray_helpers.clean_shared_local()
    _SHARED_RAY_MODULES.discard(request.node.nodeid)
    if not _SHARED_RAY_MODULES:
        ray_helpers.stop_shared_local()


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(session, config, items):
    """Modules that use the shared local Ray run one after the other (at the place of the first), so that a cluster of
    some module's own in between does not stop it and make it start again. Modules stay whole; the order is otherwise
    the collection order."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.getparent(pytest.Module) or item.parent, []).append(item)
    shared = [m for m, its in modules.items() if any("ray_local" in getattr(i, "fixturenames", ()) for i in its)]
    _SHARED_RAY_MODULES.clear()
    _SHARED_RAY_MODULES.update(m.nodeid for m in shared)
    if len(shared) < 2:
        return
    ordered = []
    for m, its in modules.items():
        if m is shared[0]:
            for s in shared:
                ordered.extend(modules[s])
        elif m not in shared:
            ordered.extend(its)
    items[:] = ordered


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """How many Ray clusters the session started (the shared one should start once)."""
    ray_helpers = sys.modules.get("helpers.ray")
    if ray_helpers is not None and ray_helpers.STARTS:
        started = ", ".join(f"{kind} {n}" for kind, n in ray_helpers.STARTS.items())
        terminalreporter.write_line(f"Ray clusters started by this session: {started}")
