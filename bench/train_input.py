"""Scale evidence (issue 14 item 6): memory and bytes read of the training input and of a k-means iteration at N
and 4N items stay flat.

``python -m bench.train_input [--quick] [--n 20000] [--out bench/results/cpu/train_input.json]``

Every measurement runs in a fresh subprocess (so ``ru_maxrss`` is that process's own peak) on synthetic data
written once by the parent:

* **training input**: a label bank of N and 4N rows (K x h x w compact maps, lossless format) and one small PNG
  per row path. ``stream`` is the training loader (:func:`transfgu.ddp.step_loader` over
  :class:`transfgu.data.train_store.StreamingBankDataset`, packed bank + image store, written once in a separate
  ``build`` process); ``dict`` is the loader it replaced (``read_label_bank(dense=False)`` into a dict, decoded
  images cached in memory). Each reads ``--steps`` batches of ``--batch`` images; reported: peak RSS, RSS after
  the steps, bytes per step from the reader's counters and from ``/proc/self/io`` ``rchar``, and the peak RSS of
  ``--loader-workers`` DataLoader processes (``RUSAGE_CHILDREN``).
* **row groups**: the alternative to the packed bank, Parquet with one row per row group and an index, read with
  ``read_row_group``: bytes per step and the bytes of opening it (every footer) at N and 4N.
* **k-means**: features of N and 4N crops in Parquet shards, held by 1 and 4 :class:`ShardHolder` s (one process
  each: a holder per ``1/num_tasks`` of the data, as ``distributed_kmeans`` does). Reported per holder: peak RSS,
  bytes read while loading and while running ``--iters`` Lloyd iterations (``rchar``; the iterations read 0).
  ``all_in_one`` is the one-process path (every feature in one process) for contrast.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.common import base_parser, comparison, finish, new_result, start


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return -1


def _rss_mib() -> float:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


# -- data ------------------------------------------------------------------------------------------------------------
def _write_bank(bank: Path, n: int, k: int, h: int, w: int, per_file: int = 2000) -> None:
    from transfgu.store.formats import LabelMaps, label_bank_table, write_parquet_atomic

    rng = np.random.default_rng(0)
    for j in range(0, n, per_file):
        ids = [f"im{i:07d}" for i in range(j, min(n, j + per_file))]
        maps = []
        for _ in ids:
            a = rng.random((h, w), dtype=np.float32)
            g = rng.random((k, h, w)) < 0.5
            b = np.where(g & (rng.random((k, h, w)) < 0.1), rng.random((k, h, w), dtype=np.float32) * 1e-3, 0)
            b = b.astype(np.float32)
            maps.append(LabelMaps.from_parts(a, g, b, np.where(g, a[None] + b, np.float32(0)).astype(np.float32)))
        write_parquet_atomic(label_bank_table(ids, maps), bank / f"part-{j // per_file:05d}.parquet")


def _write_features(out: Path, n: int, d: int, files: int) -> None:
    from transfgu.store.formats import features_table, write_parquet_atomic

    rng = np.random.default_rng(1)
    for i, idx in enumerate(np.array_split(np.arange(n), files)):
        x = rng.standard_normal((len(idx), d)).astype(np.float32)
        rec = SimpleNamespace(crop_index=np.arange(len(idx), dtype=np.int32), scale=np.ones(len(idx), np.float32),
                              box=np.zeros((len(idx), 4), np.int32), pool=np.array(["fg"] * len(idx)), cls=x)
        write_parquet_atomic(features_table([f"img{i}"], "train", [rec]), out / f"part-{i:05d}.parquet")


# -- children --------------------------------------------------------------------------------------------------------
def _paths(png: str, n: int) -> list[str]:
    return [png] * n


def child_build(a: dict[str, Any]) -> dict[str, Any]:
    from transfgu.data import train_store as ts

    t0 = time.perf_counter()
    bank = ts.open_packed_bank(Path(a["bank"]), "bench")
    images = ts.open_image_store(Path(a["bank"]), _paths(a["png"], a["n"]), tuple(a["size"]), "bench")
    return {"peak_rss_mib": _peak(), "s": time.perf_counter() - t0, "packed_bytes": int(bank.offsets[-1]),
            "image_bytes": images.rows * 3 * a["size"][0] * a["size"][1] if images else 0}


def child_loader(a: dict[str, Any]) -> dict[str, Any]:
    import torch

    from transfgu.data import train_store as ts
    from transfgu.data.loaders import BankDataset
    from transfgu.ddp import step_loader

    torch.set_num_threads(1)
    n, size = a["n"], tuple(a["size"])
    ids = [f"im{i:07d}" for i in range(n)]
    base = _rss_mib()
    if a["reader"] == "stream":
        bank = ts.open_packed_bank(Path(a["bank"]), "bench")
        images = ts.open_image_store(Path(a["bank"]), _paths(a["png"], n), size, "bench")
        ds: Any = ts.StreamingBankDataset(bank.rows_of(ids), _paths(a["png"], n), bank, size, images=images)
    else:
        from transfgu.store.formats import read_label_bank

        records = [SimpleNamespace(image_id=i, image_path=a["png"]) for i in ids]
        ds = BankDataset(records, read_label_bank(Path(a["bank"]), dense=False), size)
    workers = int(a["workers"])
    loader = step_loader(ds, a["batch"], seed=0, num_workers=workers, persistent_workers=workers > 0)
    ready = _rss_mib()
    r0, steps = _rchar(), 0
    c0 = ds.counters() if hasattr(ds, "counters") else None
    t0 = time.perf_counter()
    for _ in range(a["epochs"]):
        for _, _batch in zip(range(a["steps"]), loader):
            steps += 1
    dt = time.perf_counter() - t0
    out = {"reader": a["reader"], "n": n, "workers": workers, "steps": steps, "s_per_step": dt / steps,
           "rss_start_mib": base, "rss_ready_mib": ready, "rss_end_mib": _rss_mib(), "peak_rss_mib": _peak(),
           "rchar_per_step": (_rchar() - r0) / steps}
    if workers:
        out["worker_peak_rss_mib"] = _peak(resource.RUSAGE_CHILDREN)
    if c0 is not None and workers == 0:
        c = ds.counters()
        out["reader_bytes_per_step"] = (c.bank_bytes + c.image_bytes - c0.bank_bytes - c0.image_bytes) / steps
    return out


def child_kmeans(a: dict[str, Any]) -> dict[str, Any]:
    from transfgu.distributed.kmeans import ShardHolder
    from transfgu.store.formats import list_parquet_files, read_features

    files = [str(p) for p in list_parquet_files(Path(a["features"]))]
    k = a["k"]
    rng = np.random.default_rng(2)
    c = {"fg": rng.standard_normal((k, a["d"])).astype(np.float32)}
    r0 = _rchar()
    t0 = time.perf_counter()
    if a["mode"] == "all_in_one":
        _, x = read_features(Path(a["features"]), pools=["fg"])
        from transfgu.kmeans import lloyd_step_stats

        load_bytes, r1 = _rchar() - r0, _rchar()
        for _ in range(a["iters"]):
            lloyd_step_stats(x, c["fg"])
        held = x.nbytes
    else:
        groups = np.array_split(np.arange(len(files)), a["tasks"])
        holder = ShardHolder([files[i] for i in groups[a["task"]]], ["fg"])
        load_bytes, r1 = _rchar() - r0, _rchar()
        for _ in range(a["iters"]):
            holder.stats(c)
        held = holder.nbytes()
    return {"mode": a["mode"], "tasks": a["tasks"], "task": a.get("task", 0), "peak_rss_mib": _peak(),
            "held_mib": held / 2**20, "load_rchar": load_bytes, "iter_rchar": (_rchar() - r1) / a["iters"],
            "s": time.perf_counter() - t0}


def child_rowgroups(a: dict[str, Any]) -> dict[str, Any]:
    """The alternative to the packed bank: the bank rewritten as Parquet with one row per row group plus an index
    (file, row group), each item read with ``read_row_group``. Same steps as ``child_loader`` (bank rows only)."""
    import pyarrow.parquet as pq

    from transfgu.ddp import epoch_order
    from transfgu.store.formats import list_parquet_files, write_parquet_atomic

    src = list_parquet_files(Path(a["bank"]))
    out = Path(a["bank"]).parent / f"rowgroups{a['n']}"
    for f in src:
        write_parquet_atomic(pq.read_table(f), out / f.name, row_group_size=1)
    r0 = _rchar()
    files = [pq.ParquetFile(f) for f in list_parquet_files(out)]
    index = [(i, g) for i, pf in enumerate(files) for g in range(pf.metadata.num_row_groups)]
    open_bytes = _rchar() - r0
    footer = sum(pf.metadata.serialized_size for pf in files)
    order = epoch_order(len(index), 0, 0)
    r1 = _rchar()
    steps = 0
    for s in range(a["steps"]):
        for j in order[s * a["batch"] : (s + 1) * a["batch"]]:
            i, g = index[j]
            files[i].read_row_group(g)
        steps += 1
    return {"n": a["n"], "open_rchar": open_bytes, "footer_bytes": footer, "rchar_per_step": (_rchar() - r1) / steps,
            "peak_rss_mib": _peak(), "bytes_on_disk": sum(p.stat().st_size for p in out.glob("*.parquet"))}


CHILDREN = {"build": child_build, "loader": child_loader, "kmeans": child_kmeans, "rowgroups": child_rowgroups}


def _run(kind: str, args: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.train_input", "--child", kind, "--child-args", json.dumps(args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- driver ----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=None, help="label-bank rows at 1x (default 20000; quick 2000)")
    p.add_argument("--crops", type=int, default=None, help="k-means crops at 1x (default 200000; quick 20000)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None, help="where the synthetic data goes (default: a temp dir)")
    p.add_argument("--child", default=None, help=argparse_hidden())
    p.add_argument("--child-args", default=None, help=argparse_hidden())
    raw = sys.argv[1:] if argv is None else argv
    if "--child" in raw:
        a = p.parse_args(raw)
        print(json.dumps(CHILDREN[a.child](json.loads(a.child_args))))
        return {}
    args, device, t_start = start(p, argv, model=False)
    n = args.n or (2000 if args.quick else 20000)
    crops = args.crops or (20000 if args.quick else 200000)
    k, h, w, size, d, kk = 8, 12, 12, (32, 40), 64, 32
    result = new_result("train_input", args, device, {
        "n": n, "four_n": 4 * n, "maps": [k, h, w], "train_size": list(size), "batch": args.batch,
        "steps": args.steps, "loader_workers": args.loader_workers, "crops": crops, "dim": d, "k": kk})
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        from PIL import Image

        png = root / "img.png"
        Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(png)
        rows: dict[str, Any] = {"build": [], "loader": [], "kmeans": [], "rowgroups": []}
        for mult in (1, 4):
            bank = root / f"bank{mult}"
            _write_bank(bank, mult * n, k, h, w)
            base = {"bank": str(bank), "png": str(png), "n": mult * n, "size": list(size), "batch": args.batch,
                    "steps": args.steps, "epochs": 1}
            rows["build"].append({"n": mult * n, **_run("build", base)})
            for reader, workers in (("stream", 0), ("stream", args.loader_workers), ("dict", 0)):
                rows["loader"].append(_run("loader", {**base, "reader": reader, "workers": workers}))
            rows["rowgroups"].append(_run("rowgroups", base))
            rows["build"][-1]["parquet_bytes"] = sum(f.stat().st_size for f in bank.glob("*.parquet"))
            feats = root / f"features{mult}"
            _write_features(feats, mult * crops, d, files=8 * mult)
            kb = {"features": str(feats), "d": d, "k": kk, "iters": 3}
            for t in range(mult):
                rows["kmeans"].append({"n": mult * crops, **_run("kmeans", {**kb, "mode": "holder", "tasks": mult,
                                                                             "task": t})})
            rows["kmeans"].append({"n": mult * crops, **_run("kmeans", {**kb, "mode": "all_in_one", "tasks": 1})})
    result["results"] = rows

    def loader(reader: str, nn: int, workers: int = 0) -> dict[str, Any]:
        return next(r for r in rows["loader"] if r["reader"] == reader and r["n"] == nn and r["workers"] == workers)

    s1, s4 = loader("stream", n), loader("stream", 4 * n)
    d1, d4 = loader("dict", n), loader("dict", 4 * n)
    w1, w4 = loader("stream", n, args.loader_workers), loader("stream", 4 * n, args.loader_workers)
    cmp = result["comparisons"]
    cmp.append(comparison("training loader peak RSS, 4N / N", f"stream N={n}", f"stream 4N={4 * n}",
                          s4["peak_rss_mib"] / s1["peak_rss_mib"], "x", "<= 1.1",
                          s4["peak_rss_mib"] / s1["peak_rss_mib"] <= 1.1))
    cmp.append(comparison("DataLoader worker peak RSS, 4N / N", f"stream N={n}", f"stream 4N={4 * n}",
                          w4["worker_peak_rss_mib"] / w1["worker_peak_rss_mib"], "x", "<= 1.1",
                          w4["worker_peak_rss_mib"] / w1["worker_peak_rss_mib"] <= 1.1))
    cmp.append(comparison("bytes read per step, 4N / N", f"stream N={n}", f"stream 4N={4 * n}",
                          s4["reader_bytes_per_step"] / s1["reader_bytes_per_step"], "x", "<= 1.1",
                          s4["reader_bytes_per_step"] / s1["reader_bytes_per_step"] <= 1.1))
    cmp.append(comparison("old in-memory loader peak RSS, 4N / N", f"dict N={n}", f"dict 4N={4 * n}",
                          d4["peak_rss_mib"] / d1["peak_rss_mib"], "x", measured=True))
    g1, g4 = rows["rowgroups"]
    packed_row = s1["reader_bytes_per_step"] / args.batch - 3 * size[0] * size[1]
    cmp.append(comparison("label-bank bytes per step: Parquet, 1 row per row group / packed rows", "packed",
                          "Parquet row groups", g1["rchar_per_step"] / (args.batch * packed_row), "x", measured=True))
    cmp.append(comparison("opening the row-group index (footers read), 4N / N", f"N={n}", f"4N={4 * n}",
                          g4["open_rchar"] / max(1, g1["open_rchar"]), "x", measured=True))
    hold = [r for r in rows["kmeans"] if r["mode"] == "holder"]
    h1 = max(r["peak_rss_mib"] for r in hold if r["n"] == crops)
    h4 = max(r["peak_rss_mib"] for r in hold if r["n"] == 4 * crops)
    cmp.append(comparison("k-means holder peak RSS (1 vs 4 holders), 4N / N", f"N={crops}", f"4N={4 * crops}",
                          h4 / h1, "x", "<= 1.1", h4 / h1 <= 1.1))
    it = max(r["iter_rchar"] for r in hold)
    cmp.append(comparison("bytes read per k-means iteration after loading (max over holders)", "0", "holders",
                          it, "B", "< 64 KiB (no feature bytes)", it < 64 * 1024))
    result["notes"].append("RSS includes the interpreter with torch/pyarrow imported (the flat floor); the index "
                           "(8 B a row) and the image paths are the only per-image memory of the stream reader")
    return finish(result, args, t_start)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
