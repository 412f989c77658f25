"""Shared fixtures: the real images of ../shared/data and small models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
