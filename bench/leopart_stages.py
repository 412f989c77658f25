"""Leopart CBFE + CD: wall time per stage of the one-process pipeline (``conf/leopart_horse.yaml``), and the
vectorised co-occurrence counting against a per-image loop.

Runs :func:`transfgu.pipeline.run_pipeline` with ``method: leopart`` in a fresh run directory and reads the stage
seconds the pipeline records in ``<run>/_manifest.json``. Full mode: the preset as is (random ViT-S/16 at 224 x 224,
all 168 train + 160 val Weizmann-horse images). Quick mode: the tiny config of ``tests/stages/test_leopart.py``.

The co-occurrence comparison counts the same (B, 100, 100) cluster maps (k + 1 = 150 nodes) two ways and checks
they agree: one sparse matrix for the whole batch (:func:`transfgu.leopart.communities.cooccurrence_stats`) vs a
loop over images that counts each image's pairs with ``np.add.at`` per offset (the structure of the authors' loop
over ``skimage.greycomatrix`` calls, without its 256-cluster limit).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import REPO, base_parser, comparison, finish, new_result, parse, setup, shared_data_dir

QUICK_OVERRIDES: dict[str, str] = {
    "data.max_train_images": "12", "data.max_val_images": "8", "backbone.arch": "vit_test_tiny",
    "leopart.input_size": "[64, 64]", "leopart.pca_dim": "16", "leopart.k_cbfe": "12", "leopart.cbfe_niter": "10",
    "leopart.cbfe_nredo": "2", "leopart.k_community": "8", "leopart.community_niter": "10",
    "leopart.cooc_size": "[32, 32]", "leopart.edge_threshold": "0.02", "leopart.overcluster_k": "[5, 10]",
    "leopart.eval_size": "[32, 32]",
}


def loop_cooccurrence(maps: np.ndarray, n: int, offsets: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per image: ``np.add.at`` per offset, diagonal zeroed, rows normalised; summed over images."""
    total = np.zeros((n, n))
    present = np.zeros(n, dtype=np.int64)
    for m in maps:
        h, w = m.shape
        c = np.zeros((n, n))
        for dr, dc in offsets:
            r0, r1, c0, c1 = max(0, -dr), min(h, h - dr), max(0, -dc), min(w, w - dc)
            np.add.at(c, (m[r0:r1, c0:c1].ravel(), m[r0 + dr : r1 + dr, c0 + dc : c1 + dc].ravel()), 1)
        np.fill_diagonal(c, 0)
        s = c.sum(axis=1, keepdims=True)
        total += np.where(s > 0, c / np.where(s > 0, s, 1), 0)
        present[np.unique(m)] += 1
    return total, present


def _cooc_comparison(result: dict[str, Any], quick: bool) -> None:
    """Vectorised batch vs per-image loop on the same random (B, 100, 100) maps; they must agree."""
    from transfgu.leopart.communities import cooccurrence_stats, glcm_offsets

    rng = np.random.default_rng(0)
    b, n = (8, 20) if quick else (160, 150)
    maps = rng.integers(0, n, size=(b, 100, 100))
    off = glcm_offsets()
    t0 = time.perf_counter()
    fast = cooccurrence_stats(maps, n, off)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = loop_cooccurrence(maps, n, off)
    t_loop = time.perf_counter() - t0
    err = float(np.abs(fast[0] - slow[0]).max())
    if err > 1e-9 or not np.array_equal(fast[1], slow[1]):
        raise AssertionError(f"vectorised and loop co-occurrence differ (max {err})")
    result["comparisons"].append(comparison(
        "co-occurrence, per-image loop / vectorised", "per-image np.add.at loop",
        "one bincount per offset per chunk of images",
        t_loop / t_fast, "x", images=b, nodes=n, loop_s=t_loop, vectorised_s=t_fast, max_abs_diff=err))


def _options(cfg: Any, over: dict[str, str], extra: list[str], result: dict[str, Any]) -> None:
    """label_free, then + linear probe (only evaluate reruns), then protocol=paper (cbfe onwards rerun, the grid
    search in communities), one run directory: the stage seconds of each, and the ratios of the two options."""
    from transfgu.config import load_config
    from transfgu.pipeline import run_pipeline

    variants = [("label_free", []), ("label_free+probe", ["leopart.linear_probe.enabled=true"]),
                ("paper+probe", ["leopart.protocol=paper", "leopart.linear_probe.enabled=true"])]
    seconds: dict[str, dict[str, float]] = {}
    for name, more in variants:
        c = load_config(REPO / "conf" / "leopart_horse.yaml", [f"{k}={v}" for k, v in over.items()] + extra + more)
        run_pipeline(c)
        manifest = json.loads((c.run_dir / "_manifest.json").read_text())
        metrics = json.loads((c.run_dir / "eval" / "metrics.json").read_text())
        seconds[name] = {st: manifest["stages"][st]["extra"].get("seconds") or 0.0 for st in manifest["stages"]}
        result["results"][name] = {"stages": seconds[name], "mIoU": metrics["mIoU"],
                                   "hyperparameters": metrics["hyperparameters"],
                                   "linear_probe_mIoU": (metrics.get("linear_probe") or {}).get("mIoU")}
    base = seconds["label_free"]
    result["comparisons"].append(comparison(
        "evaluate with / without the linear probe", "evaluate (Hungarian)", "evaluate + linear probe",
        seconds["label_free+probe"]["evaluate"] / base["evaluate"], "x"))
    result["comparisons"].append(comparison(
        "communities, paper grid search / label_free", "communities (fixed values)",
        "communities (grid search with train labels)", seconds["paper+probe"]["communities"] / base["communities"], "x",
        grid=json.loads(cfg.model_dump_json())["leopart"]["paper_grid"]))
    result["notes"].append("random-weight backbone: wall times are representative, metrics are not")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transfgu.config import load_config
    from transfgu.leopart.pipeline import STAGES
    from transfgu.pipeline import run_pipeline

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--run-root", type=Path, default=None, help="where the run goes (default: a temp dir, removed)")
    p.add_argument("--set", action="append", default=[], help="extra config override key=value (repeatable)")
    p.add_argument("--cooc-only", action="store_true", help="only the co-occurrence comparison (no pipeline run)")
    p.add_argument("--options", action="store_true",
                   help="the label-using options side by side in one run directory: label_free, + linear probe, "
                        "protocol=paper (grid search): their communities and evaluate seconds")
    args = parse(p, argv)
    device = setup(args)
    t_start = time.perf_counter()
    if args.cooc_only:
        result = new_result("leopart_stages", args, device, {"cooc_only": True})
        _cooc_comparison(result, args.quick)
        return finish(result, args, t_start)
    horse = shared_data_dir() / "weizmann_horse"
    if not horse.is_dir():
        raise SystemExit(f"the bench needs real images at {horse} (set TRANSFGU_SHARED_DATA)")
    root = args.run_root or Path(tempfile.mkdtemp(prefix="transfgu_bench_leopart_"))
    over = {**(QUICK_OVERRIDES if args.quick else {}), "data.root": str(horse), "run.root": str(root),
            "run.name": f"bench_leopart_{int(time.time())}", "run.device": args.device, "mlflow.enabled": "false"}
    cfg = load_config(REPO / "conf" / "leopart_horse.yaml", [f"{k}={v}" for k, v in over.items()] + args.set)
    result = new_result("leopart_stages", args, device, {"preset": "conf/leopart_horse.yaml", "overrides": over,
                                                         "config": json.loads(cfg.model_dump_json())})
    res = result["results"]
    if args.options:
        try:
            _options(cfg, over, args.set, result)
        finally:
            if args.run_root is None:
                shutil.rmtree(root, ignore_errors=True)
        return finish(result, args, t_start)
    try:
        t0 = time.perf_counter()
        run_pipeline(cfg)
        wall = time.perf_counter() - t0
        manifest = json.loads((cfg.run_dir / "_manifest.json").read_text())
        metrics = json.loads((cfg.run_dir / "eval" / "metrics.json").read_text())
    finally:
        if args.run_root is None:
            shutil.rmtree(root, ignore_errors=True)
    stages = {st: {"seconds": manifest["stages"][st]["extra"].get("seconds"), "rows": manifest["stages"][st]["rows"]}
              for st in STAGES}
    total = sum(s["seconds"] or 0.0 for s in stages.values())
    res.update({"stages": stages, "wall_s": wall, "mIoU": metrics["mIoU"], "n_segments": metrics["n_segments"],
                "overclustering": metrics["overclustering"]})
    result["comparisons"].append(comparison("sum of stage seconds / pipeline wall", "run_pipeline wall time",
                                            "sum of stage seconds", total / wall, "fraction"))
    for st, s in stages.items():
        result["comparisons"].append(comparison(f"stage {st}", "-", st, s["seconds"] or 0.0, "s", rows=s["rows"],
                                                share=(s["seconds"] or 0.0) / total if total else None))
    _cooc_comparison(result, args.quick)
    result["notes"].append("random-weight backbone: wall times are representative, metrics are not")
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
