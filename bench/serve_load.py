"""Serve load: requests/s and p50/p99 latency of the Ray Serve endpoint (``POST /predict``) on loopback.

Starts a private local Ray and the application of :mod:`transfgu.serve` bound to 127.0.0.1, then runs a bounded
closed loop per concurrency level: ``C`` client threads, each sending the next request when its previous one has
answered, until ``--requests`` requests are done or ``--seconds`` have passed (whichever first). The body is one
real CamVid image (480x360 JPEG), the response the JSON with the label PNG. Nothing leaves the machine.

    python -m bench.serve_load --out bench/results/cpu/serve_load.json              # the tiny model, built here
    python -m bench.serve_load --model runs/demo_camvid --concurrency 1 8 32       # any run dir or MLflow URI
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.common import REPO, shared_data_dir, write_result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(root: Path) -> Path:
    from bench.end_to_end import build_config
    from transfgu.pipeline import run_pipeline

    cfg = build_config(True, root, "serve_bench", "cpu", ["run.report=false"])
    run_pipeline(cfg)
    return cfg.run_dir


@contextlib.contextmanager
def local_serve(opts: dict[str, str], num_cpus: int, num_gpus: int | None, object_store_mb: int,
                env_vars: dict[str, str]) -> Iterator[int]:
    """A private local Ray with the :mod:`transfgu.serve` application on 127.0.0.1; yields its port, then shuts
    Serve and Ray down."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray
    from ray import serve

    from transfgu.serve import app

    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
             _node_ip_address="127.0.0.1", object_store_memory=object_store_mb * 1024**2,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", **env_vars}})
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app(opts), name="transfgu", route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def run_clients(client: Callable[[], None], concurrency: int) -> float:
    """Run ``client`` in ``concurrency`` threads at once; the wall seconds until the last one returned."""
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def _loop(port: int, body: bytes, concurrency: int, max_requests: int, max_seconds: float) -> dict[str, Any]:
    lat: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    state = {"sent": 0}
    t_end = time.perf_counter() + max_seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                if state["sent"] >= max_requests or time.perf_counter() >= t_end:
                    break
                state["sent"] += 1
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/jpeg"})
                r = conn.getresponse()
                r.read()
                ok = r.status == 200
            except (OSError, http.client.HTTPException) as exc:
                ok, r = False, None
                errors.append(type(exc).__name__)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            dt = time.perf_counter() - t0
            with lock:
                if ok:
                    lat.append(dt)
                elif r is not None:
                    errors.append(str(r.status))
        conn.close()

    wall = run_clients(worker, concurrency)
    lat.sort()

    def pct(q: float) -> float | None:
        return round(1000 * lat[min(len(lat) - 1, int(q * len(lat)))], 1) if lat else None

    return {"concurrency": concurrency, "requests": len(lat), "errors": len(errors), "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2) if wall else None, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="run dir / model dir / MLflow URI (default: build the tiny model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=200, help="at most this many requests per level")
    p.add_argument("--seconds", type=float, default=30.0, help="at most this long per level")
    p.add_argument("--max-replicas", type=int, default=2)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray")
    p.add_argument("--device", default="cpu", help="model replicas' device: cpu or cuda (one GPU per replica)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    load_start = os.getloadavg()
    model = args.model or str(_tiny_model(Path(tempfile.mkdtemp(prefix="transfgu_bench_serve_"))))
    image = sorted((shared_data_dir() / "camvid" / "images" / "val").glob("*.jpg"))[0]
    body = image.read_bytes()
    opts = {"model": model, "device": args.device, "model_cpus": "0.5", "api_cpus": "0.25",
            "max_replicas": str(args.max_replicas), "max_batch_size": str(args.max_batch_size)}
    with local_serve(opts, args.num_cpus, None if args.device == "cuda" else 0, 200, {}) as port:
        _loop(port, body, 1, 5, 60)  # warm-up: replica start, first batch, lazy imports
        levels = [_loop(port, body, c, args.requests, args.seconds) for c in args.concurrency]
    result = {
        "bench": "serve_load",
        "command": "python -m bench.serve_load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": len(os.sched_getaffinity(0)), "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "config": {**{k: v for k, v in opts.items() if k != "model"}, "model": "tiny (tests' tiny_config)"
                   if args.model is None else args.model, "image": f"{image.name} ({len(body)} bytes JPEG)",
                   "requests_per_level": args.requests, "seconds_per_level": args.seconds},
        "results": levels,
    }
    print(f"{'C':>4} {'requests':>9} {'err':>4} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for r in levels:
        print(f"{r['concurrency']:>4} {r['requests']:>9} {r['errors']:>4} {r['requests_per_s']:>7} "
              f"{r['p50_ms']:>8} {r['p99_ms']:>8}")
    print(f"load average: start {load_start}, end {result['machine']['loadavg_end']}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
