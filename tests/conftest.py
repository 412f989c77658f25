"""Shared fixtures: the real images of ../shared/data and small models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Ray replaces 127.0.0.1 with the machine's outward address unless told this is a single-machine setup; tests
# (and the Ray processes they start, which inherit the environment) must talk over loopback only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Under pytest-xdist (`-n 2`) two test processes share the cores; OpenMP threads that spin while they wait for work
# would burn the other worker's core. Waiting passively changes no result (the thread count, which orders float
# reductions, stays what each test sets); it must be set before torch loads OpenMP, so here at import.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SHARED_DATA = Path(
    os.environ.get("TRANSFGU_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def require_shared_data(name: str = "") -> Path:
    """Path to ``../shared/data/<name>``; fails under CI, skips elsewhere, when it is missing."""
    path = SHARED_DATA / name if name else SHARED_DATA
    if not path.exists():
        msg = f"shared data not found at {path} (set TRANSFGU_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def camvid() -> Path:
    return require_shared_data("camvid")


REPO = Path(__file__).resolve().parents[1]
#: The tiny whole-method config of the tests and the quick benchmarks.
TINY_CONFIG = REPO / "conf" / "tiny.yaml"


def tiny_config(run_root: Path, name: str = "tiny", **over: str):
    """``conf/tiny.yaml`` on the shared CamVid images: tiny random ViT, 6 training images, two epochs."""
    from transfgu.config import load_config

    camvid = require_shared_data("camvid")
    overrides = {"data.root": str(camvid), "run.root": str(run_root), "run.name": name, **over}
    return load_config(TINY_CONFIG, [f"{k}={v}" for k, v in overrides.items()])


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadfile``) hand out the long files first: files with Ray tests, then files that
    use the shared tiny run, then the rest. A worker that finishes early then picks up short files instead of idling
    while the other runs a long file at the end. Within a file the order stays as written (stable sort)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    rank: dict[str, int] = {}
    for item in items:
        r = 0 if item.get_closest_marker("ray") else 1 if "tiny_run_dir" in getattr(item, "fixturenames", ()) else 2
        rank[item.nodeid.split("::")[0]] = min(r, rank.get(item.nodeid.split("::")[0], 2))
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])
