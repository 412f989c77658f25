"""Fixtures and hooks only: the real images of ../shared/data, the tiny whole-method run, the shared local Ray and
the headless browser. What test modules share besides fixtures is in ``tests/helpers``."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
from helpers.chromium import browser  # noqa: F401  (the `browser` fixture of the page tests)
from helpers.configs import tiny_config
from helpers.data import require_shared_data

# Ray replaces 127.0.0.1 with the machine's outward address unless told this is a single-machine setup; tests
# (and the Ray processes they start, which inherit the environment) must talk over loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Under pytest-xdist (`-n 2`) two test processes share the cores; OpenMP threads that spin while they wait for work
# would burn the other worker's core. Waiting passively changes no result (the thread count, which orders float
# reductions, stays what each test sets); it must be set before torch loads OpenMP, so here at import.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def camvid() -> Path:
    return require_shared_data("camvid")


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> Path:
    """A finished one-process run of the whole method (read-only for tests: copy it before changing it).

    Under pytest-xdist the workers share one build: the first worker that needs it makes it in the session's
    common temp directory while the others wait on a file lock (the same run, made once instead of per worker)."""
    import torch

    from transfgu.pipeline import run_pipeline

    def build(root: Path) -> Path:
        torch.set_num_threads(2)
        cfg = tiny_config(root)
        run_pipeline(cfg)
        return cfg.run_dir

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build(tmp_path_factory.mktemp("runs"))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "tiny_run_dir"  # the session's directory, above each worker's
    with FileLock(f"{shared}.lock"):
        built = shared / "BUILT"
        if not built.is_file():  # first worker here (or an earlier build failed half-way: build again)
            shutil.rmtree(shared, ignore_errors=True)
            built.parent.mkdir(parents=True)
            built.write_text(str(build(shared / "runs")), encoding="utf-8")
        return Path(built.read_text(encoding="utf-8"))


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


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist's --dist loadfile would hand out files by their number of tests (many short parametrized cases
    # first); keep the order below instead (in the controller, which schedules, and in the workers alike)
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


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
    the collection order.

    Under pytest-xdist (``--dist loadfile``) the long files are handed out first instead: files with Ray tests, then
    files that use the shared tiny run, then the rest. A worker that finishes early then picks up short files instead of
    idling while the other runs a long file at the end. Within a file the order stays as written (stable sort); each
    worker has its own shared Ray, kept to the end of its session (a worker cannot know which modules it will get)."""
    modules: dict = {}
    for item in items:
        modules.setdefault(item.getparent(pytest.Module) or item.parent, []).append(item)
    shared = [m for m, its in modules.items() if any("ray_local" in getattr(i, "fixturenames", ()) for i in its)]
    _SHARED_RAY_MODULES.clear()
    _SHARED_RAY_MODULES.update(m.nodeid for m in shared)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank: dict[str, int] = {}
        for item in items:
            r = 0 if item.get_closest_marker("ray") else 1 if "tiny_run_dir" in getattr(item, "fixturenames", ()) else 2
            key = item.nodeid.split("::")[0]
            rank[key] = min(r, rank.get(key, 2))
        items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])
        return
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
