"""Serve memory under load: the resident memory of the Serve replicas (the HTTP front ``Api`` and the model
``SegmentationModel``) idle, at its peak while ``C`` large images are in flight at once, and again once they have
answered.

The images are synthetic ``S x S`` PNGs that compress well (~100 KB for 6000 x 6000: big in pixels, small on the
wire, under ``max_pixels``: the case a body-size limit does not catch). Starts a private local Ray on 127.0.0.1 and
the application of :mod:`transfgu.serve` on the tiny model; nothing leaves the machine. Memory is the sum of the
replicas' RSS (psutil), sampled every 50 ms.

    python -m bench.serve_memory --out bench/results/cpu/serve_memory.json      # 8 x 6000 x 6000 PNGs
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, write_result
from bench.serve_load import _tiny_model, local_serve, run_clients


def synthetic_png(side: int) -> bytes:
    """A ``side x side`` RGB PNG of smooth bands and blocks: large in pixels, ~100 KB on the wire at 6000."""
    from PIL import Image

    y = np.arange(side, dtype=np.int64)[:, None]
    x = np.arange(side, dtype=np.int64)[None, :]
    r = ((x // 97) * 23 % 256).astype(np.uint8)
    g = ((y // 131) * 41 % 256).astype(np.uint8)
    b = (((x // 211) + (y // 173)) * 59 % 256).astype(np.uint8)
    img = np.stack(np.broadcast_arrays(r, g, b), axis=2)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def replica_pids() -> dict[int, str]:
    """PIDs of this machine's Serve replica processes of the ``transfgu`` application (Ray names them
    ``ray::ServeReplica:transfgu:<Deployment>``), with the deployment name."""
    import psutil

    procs = psutil.process_iter(["pid", "cmdline"])
    node = _this_node_raylet()
    if node is not None:  # only this driver's Ray: other Serve apps on the machine are not ours
        procs = psutil.Process(node).children(recursive=True)
    out: dict[int, str] = {}
    for p in procs:
        try:
            cmd = " ".join(p.cmdline() or [])
        except psutil.Error:
            continue
        if "ServeReplica:transfgu:" in cmd:
            out[p.pid] = cmd.split("ServeReplica:transfgu:")[1].split()[0]
    return out


def _this_node_raylet() -> int | None:
    """PID of the raylet of the Ray this process started (its workers are the raylet's children), or None."""
    try:
        import ray

        node = ray._private.worker._global_node
        return int(node.all_processes["raylet"][0].process.pid) if node is not None else None
    except (ImportError, AttributeError, KeyError, IndexError):
        return None


def rss(pids: dict[int, str]) -> dict[str, int]:
    import psutil

    by: dict[str, int] = {}
    for pid, name in pids.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            by[name] = by.get(name, 0) + psutil.Process(pid).memory_info().rss
    return by


def _measure(port: int, body: bytes, small: bytes, concurrency: int, settle: float
             ) -> tuple[dict[str, int], dict[str, int], dict[str, int], list[tuple[int, float]], float]:
    """Replicas' RSS idle, at the peak of ``concurrency`` large requests in flight and ``settle`` s after them."""

    def post(data: bytes) -> tuple[int, float]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/predict?format=json", body=data, headers={"Content-Type": "image/png"})
            r = conn.getresponse()
            r.read()
            return r.status, time.perf_counter() - t0
        finally:
            conn.close()

    for _ in range(3):  # warm-up: replica start, first batch, lazy imports
        post(small)
    post(body)  # one large request alone: the allocator's first touch is not the load's
    time.sleep(3)
    pids = replica_pids()
    idle = rss(pids)
    peak = dict(idle)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = rss(pids)
            if sum(now.values()) > sum(peak.values()):
                peak.clear()
                peak.update(now)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    results: list[tuple[int, float]] = []
    lock = threading.Lock()

    def one() -> None:
        r = post(body)
        with lock:
            results.append(r)

    wall = run_clients(one, concurrency)
    time.sleep(settle)
    stop.set()
    sampler.join()
    after = rss(pids)
    return idle, peak, after, results, wall


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="run dir / model dir (default: build the tiny model)")
    p.add_argument("--side", type=int, default=6000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait for memory to come back")
    p.add_argument("--num-cpus", type=int, default=2)
    p.add_argument("--app-option", action="append", default=[], help="extra key=value of the Serve application")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    model = args.model or str(_tiny_model(Path(tempfile.mkdtemp(prefix="transfgu_bench_servemem_"))))
    body = synthetic_png(args.side)
    small = synthetic_png(256)
    opts = {"model": model, "device": "cpu", "model_cpus": "0.5", "api_cpus": "0.25", "min_replicas": "1",
            "max_replicas": "1", **dict(o.split("=", 1) for o in args.app_option)}
    env = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    with local_serve(opts, args.num_cpus, 0, 300, env) as port:
        idle, peak, after, results, wall = _measure(port, body, small, args.concurrency, args.settle)
    mb = 1024**2
    total = {k: round(sum(v.values()) / mb, 1) for k, v in (("idle", idle), ("peak", peak), ("after", after))}
    result = {
        "bench": "serve_memory",
        "command": "python -m bench.serve_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg": os.getloadavg()},
        "config": {"image": f"{args.side}x{args.side} PNG, {len(body)} bytes", "concurrency": args.concurrency,
                   "options": {k: v for k, v in opts.items() if k != "model"}},
        "results": {
            "replicas_rss_mb": {"idle": {k: round(v / mb, 1) for k, v in idle.items()},
                                "peak": {k: round(v / mb, 1) for k, v in peak.items()},
                                "after": {k: round(v / mb, 1) for k, v in after.items()}, **total},
            "added_at_peak_mb": round(total["peak"] - total["idle"], 1),
            "held_after_mb": round(total["after"] - total["idle"], 1),
            "statuses": sorted(s for s, _ in results), "seconds": round(wall, 2),
            "latency_s": sorted(round(t, 2) for _, t in results),
        },
    }
    print(json.dumps({k: result["results"][k] for k in ("replicas_rss_mb", "added_at_peak_mb", "held_after_mb",
                                                        "statuses", "seconds")}, indent=1))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
