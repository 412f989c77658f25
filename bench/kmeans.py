"""k-means (stage 2): streamed/distributed Lloyd over feature shards vs single-process faiss, same data, same init.

Synthetic features: ``n x 384`` float32 drawn around ``k`` random centres (full: 1M points, quick: 20k). All
sides start from the same ``k`` randomly sampled points and run ``niter`` Lloyd iterations:

* ``faiss``: :func:`transfgu.kmeans.kmeans` in one process (faiss ``Kmeans`` with ``init_centroids``, then the
  pipeline's final assignment and means recomputation), all features in memory;
* ``ray``: :func:`transfgu.distributed.kmeans.distributed_kmeans`, Ray tasks that re-read their Parquet shards
  every iteration and return sufficient statistics (no process holds all features), on a local Ray;
* ``shard_loop``: the same reduction (:func:`transfgu.concepts.lloyd_step_stats` per in-memory shard) in this one
  process, which separates the arithmetic from Ray's and Parquet's overheads.

Reported: seconds per iteration of each, final inertia of each (sum of squared distances to the final centroids,
computed the same way for all) and its relative difference to faiss.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import base_parser, comparison, finish, new_result, start


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def synthetic_features(n: int, d: int, k_true: int, seed: int = 0, chunk: int = 1 << 17) -> np.ndarray:
    """``(n, d)`` float32 points around ``k_true`` centres (centre spread 2, unit noise), built in chunks."""
    rng = np.random.default_rng(seed)
    centres = (2.0 * rng.standard_normal((k_true, d))).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x[s : s + m] = centres[rng.integers(0, k_true, m)]
        x[s : s + m] += rng.standard_normal((m, d), dtype=np.float32)
    return x


def final_inertia(x: np.ndarray, centroids: np.ndarray) -> float:
    from transfgu.kmeans import assign

    _, d2 = assign(x, centroids, use_gpu=False)
    return float(d2.astype(np.float64).sum())


def sharded_lloyd(
    x: np.ndarray, init: np.ndarray, niter: int, n_shards: int
) -> tuple[np.ndarray, list[float], list[int]]:
    """Lloyd iterations as a distributed driver runs them: per-shard statistics, one reduction per step."""
    from transfgu.kmeans import lloyd_step_stats

    bounds = np.linspace(0, x.shape[0], n_shards + 1).astype(int)
    shards = [x[bounds[i] : bounds[i + 1]] for i in range(n_shards)]
    c = init.astype(np.float32).copy()
    times: list[float] = []
    splits: list[int] = []
    try:  # faiss's empty-cluster rule, as the distributed driver applies it
        from transfgu.distributed.kmeans import split_empty_clusters as split_empty
    except ImportError:
        split_empty = None
    for _ in range(niter):
        t0 = time.perf_counter()
        sums = np.zeros(c.shape, dtype=np.float64)
        counts = np.zeros(c.shape[0], dtype=np.int64)
        for sh in shards:
            s, n, _ = lloyd_step_stats(sh, c, use_gpu=False)
            sums += s
            counts += n
        nonempty = counts > 0
        c = c.copy()
        c[nonempty] = (sums[nonempty] / counts[nonempty, None]).astype(np.float32)
        if split_empty is not None:
            n_split = split_empty(c, counts.astype(np.float32), x.shape[0])
            splits.append(int(n_split))
        times.append(time.perf_counter() - t0)
    return c, times, splits


def write_shards(x: np.ndarray, directory: Path, n_shards: int, pool: str = "all") -> list[Path]:
    """Write ``x`` as ``n_shards`` features Parquet files in the pipeline's schema (``transfgu.store.formats``)."""
    import pyarrow as pa

    from transfgu.store.formats import features_schema, write_parquet_atomic

    directory.mkdir(parents=True, exist_ok=True)
    d = x.shape[1]
    bounds = np.linspace(0, x.shape[0], n_shards + 1).astype(int)
    paths = []
    for i in range(n_shards):
        part = x[bounds[i] : bounds[i + 1]]
        m = part.shape[0]
        rows = np.arange(bounds[i], bounds[i + 1])
        cols = [
            pa.array([f"img{r // 142:07d}" for r in rows], type=pa.string()),
            pa.array(["train"] * m, type=pa.string()),
            pa.array((rows % 142).astype(np.int32), type=pa.int32()),
            pa.array(np.full(m, 0.5, dtype=np.float32), type=pa.float32()),
            pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(4 * m, dtype=np.int32)), 4),
            pa.array([pool] * m, type=pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), d),
        ]
        path = directory / f"part-{i:05d}.parquet"
        write_parquet_atomic(pa.Table.from_arrays(cols, schema=features_schema(d)), path)
        paths.append(path)
    return paths


def run_distributed(files: list[Path], k: int, niter: int, init: np.ndarray, tasks: int, cpus: int) -> dict:
    """transfgu.distributed.kmeans.distributed_kmeans on a fresh local Ray (startup timed separately)."""
    import ray

    from transfgu.distributed.kmeans import distributed_kmeans

    t0 = time.perf_counter()
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=256 * 1024**2,
        _node_ip_address="127.0.0.1",
    )
    startup = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        out = distributed_kmeans(
            files,
            {"all": k},
            niter=niter,
            init_centroids={"all": init},
            num_tasks=tasks,
            task_options={"num_cpus": 1},
        )
        total = time.perf_counter() - t0
    finally:
        ray.shutdown()
    return {
        "startup_s": startup,
        "total_s": total,
        "centroids": out["all"].centroids,
        "objective": out["all"].objective,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transfgu.kmeans import kmeans

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="points (default 1,000,000; quick 20,000)")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=None, help="clusters (default 171; quick 16)")
    p.add_argument("--niter", type=int, default=None, help="Lloyd iterations (default 10; quick 5)")
    p.add_argument("--shards", type=int, default=8, help="shards of the streamed/sharded run")
    p.add_argument(
        "--tasks", type=int, default=None, help="Ray tasks of the distributed run (default: cores)"
    )
    p.add_argument(
        "--no-ray", action="store_true", help="skip the Ray run (faiss vs in-process shard loop only)"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="where the Parquet shards go (default: a temp dir)"
    )
    args, device, t_start = start(p, argv, model=False)
    q = args.quick
    n = args.n or (20_000 if q else 1_000_000)
    k = args.k or (16 if q else 171)
    niter = args.niter or (5 if q else 10)

    t0 = time.perf_counter()
    x = synthetic_features(n, args.dim, k_true=k, seed=0)
    gen_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    init = x[rng.choice(n, size=k, replace=False)].copy()

    has_ray = (
        importlib.util.find_spec("ray") is not None
        and importlib.util.find_spec("transfgu.distributed.kmeans") is not None
    )
    use_ray = has_ray and not args.no_ray
    tasks = args.tasks or max(1, torch_threads())
    loop_name = f"lloyd_step_stats over {args.shards} in-memory shards, one process"
    config = {
        "n": n,
        "dim": args.dim,
        "k": k,
        "niter": niter,
        "shards": args.shards,
        "ray_tasks": tasks,
        "ray": use_ray,
        "data": "synthetic gaussian mixture around k centres",
        "bytes": int(x.nbytes),
    }
    result = new_result("kmeans", args, device, config)
    res = result["results"]
    res["generate_s"] = gen_s

    t0 = time.perf_counter()
    fr = kmeans(x, k, niter=niter, seed=1, init_centroids=init, use_gpu=False)
    faiss_s = time.perf_counter() - t0
    faiss_inertia = final_inertia(x, fr.centroids)
    res["faiss"] = {
        "total_s": faiss_s,
        "per_iter_s": faiss_s / niter,
        "inertia": faiss_inertia,
        "note": "total includes the final assignment + means recomputation of transfgu.kmeans.kmeans",
    }

    def add(name: str, key: str, total_s: float, cents: np.ndarray, **extra: Any) -> None:
        inertia = final_inertia(x, cents)
        res[key] = {
            "impl": name,
            "total_s": total_s,
            "per_iter_s": total_s / niter,
            "inertia": inertia,
            **extra,
        }
        result["comparisons"].append(
            comparison(
                f"time per iteration, {key} / faiss",
                "faiss single process",
                name,
                total_s / faiss_s,
                "x faiss time",
                None,
                None,
                faiss_per_iter_s=faiss_s / niter,
                per_iter_s=total_s / niter,
            )
        )
        rel = inertia / faiss_inertia - 1.0
        result["comparisons"].append(
            comparison(
                f"final inertia, {key} vs faiss",
                "faiss single process",
                name,
                rel,
                "relative difference",
                "|diff| <= 1e-3",
                abs(rel) <= 1e-3,
                faiss_inertia=faiss_inertia,
                inertia=inertia,
            )
        )

    t0 = time.perf_counter()
    # niter + 1 updates: faiss's niter iterations plus the final means recomputation of the pipeline
    cents, iter_times, splits = sharded_lloyd(x, init, niter + 1, args.shards)
    add(
        loop_name,
        "shard_loop",
        time.perf_counter() - t0,
        cents,
        iter_s=iter_times,
        empty_cluster_splits=splits,
    )

    if use_ray:
        with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
            t0 = time.perf_counter()
            files = write_shards(x, Path(tmp) / "features", args.shards)
            res["write_shards_s"] = time.perf_counter() - t0
            res["shards_bytes"] = int(sum(f.stat().st_size for f in files))
            out = run_distributed(files, k, niter, init, tasks, cpus=tasks)
        add(
            f"transfgu.distributed.kmeans.distributed_kmeans, {tasks} Ray tasks over {args.shards} Parquet shards",
            "ray",
            out["total_s"],
            out["centroids"],
            ray_startup_s=out["startup_s"],
        )
        result["notes"].append(
            "ray: time excludes Ray startup and writing the shards; each iteration re-reads the Parquet shards "
            "(the streaming design: no process holds all features)"
        )
    else:
        result["notes"].append("Ray run skipped (--no-ray or ray/transfgu.distributed.kmeans not importable)")
    result["notes"].append(
        "per-iteration times are total / niter; every side's total includes one final assignment pass"
    )
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
