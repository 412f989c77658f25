"""Data-parallel ranks as real processes on one machine (gloo process groups over a file store)."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path


def run_ranks(target, tmp: Path, world: int, opts: dict, timeout: float = 240.0) -> None:
    """Spawn ``world`` ranks of ``target(rank, world, out, opts)`` with one thread each (``opts["init"]`` is the
    process group's file store); a rank still running after ``timeout`` s fails the test (a collective without its
    partner)."""
    opts = {**opts, "init": str(tmp / "pg_init")}
    ctx = mp.get_context("spawn")
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        procs = [ctx.Process(target=target, args=(r, world, str(tmp), opts)) for r in range(world)]
        for p in procs:
            p.start()
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} did not finish within {timeout}s (a collective without its partner?)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
