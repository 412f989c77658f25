"""End to end: wall time per stage of the demo pipeline on this machine (``conf/demo_camvid.yaml``).

Runs :func:`transfgu.pipeline.run_pipeline` in a fresh run directory and reads the stage seconds the pipeline
itself records in ``<run>/_manifest.json``. Quick mode runs the tiny whole-method config of the tests
(``conf/tiny.yaml``). Compared in the same run: the sum of the
recorded stage times against the wall time of the whole call (bookkeeping overhead), and the per-image cost of
the pseudo-label stage against the per-image cost of the crop stage.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, base_parser, comparison, finish, new_result, shared_data_dir, start


def build_config(quick: bool, run_root: Path, name: str, device: str, extra: list[str]) -> Any:
    from transfgu.config import load_config

    camvid = shared_data_dir() / "camvid"
    if not camvid.is_dir():
        raise SystemExit(f"the demo needs real images at {camvid} (set TRANSFGU_SHARED_DATA)")
    common = {"data.root": str(camvid), "run.root": str(run_root), "run.name": name, "run.device": device}
    if quick:
        return load_config(REPO / "conf" / "tiny.yaml", [f"{k}={v}" for k, v in common.items()] + extra)
    over = {**common, "mlflow.enabled": "false"}
    return load_config(REPO / "conf" / "demo_camvid.yaml", [f"{k}={v}" for k, v in over.items()] + extra)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import torch

    from transfgu.pipeline import run_pipeline
    from transfgu.stages import STAGES

    p = base_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--run-root", type=Path, default=None, help="where the run goes (default: a temp dir, removed)"
    )
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    p.add_argument("--set", action="append", default=[], help="extra config override key=value (repeatable)")
    args, device, t_start = start(p, argv, model=False)
    root = args.run_root or Path(tempfile.mkdtemp(prefix="transfgu_bench_e2e_"))
    name = f"bench_{'tiny' if args.quick else 'demo'}_{int(time.time())}"
    cfg = build_config(args.quick, root, name, args.device, args.set)
    config = {
        "preset": "conf/tiny.yaml" if args.quick else "conf/demo_camvid.yaml",
        "overrides": args.set,
        "config": json.loads(cfg.model_dump_json()),
    }
    result = new_result("end_to_end", args, device, config)
    res = result["results"]
    try:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        run_pipeline(cfg)
        wall = time.perf_counter() - t0
        manifest = json.loads((cfg.run_dir / "_manifest.json").read_text())
    finally:
        if not args.keep and args.run_root is None:
            shutil.rmtree(root, ignore_errors=True)
    stages: dict[str, Any] = {}
    for st in STAGES:
        rec = manifest["stages"].get(st, {})
        extra = rec.get("extra", {})
        stages[st] = {"seconds": extra.get("seconds"), "rows": rec.get("rows"), "status": rec.get("status")}
    total = sum(s["seconds"] or 0.0 for s in stages.values())
    for s in stages.values():
        s["share"] = (s["seconds"] or 0.0) / total if total else None
    n_train = manifest["stages"]["label_bank"].get("rows") or cfg.data.max_train_images
    res["stages"] = stages
    res["wall_s"] = wall
    res["train_images"] = n_train
    res["run_dir"] = str(cfg.run_dir) if (args.keep or args.run_root is not None) else None
    result["comparisons"].append(
        comparison(
            "sum of stage seconds / pipeline wall",
            "run_pipeline wall time",
            "sum of _manifest.json stage seconds",
            total / wall,
            "fraction",
            None,
            None,
            stage_sum_s=total,
            wall_s=wall,
        )
    )
    ex, lb = stages["extract"]["seconds"], stages["label_bank"]["seconds"]
    result["comparisons"].append(
        comparison(
            "pseudo labels / crop stage, per image",
            "extract seconds",
            "label_bank seconds",
            lb / ex,
            "x",
            None,
            None,
            extract_s_per_image=ex / n_train,
            label_bank_s_per_image=lb / n_train,
        )
    )
    for st, s in stages.items():
        result["comparisons"].append(
            comparison(
                f"stage {st}", "-", st, s["seconds"] or 0.0, "s", None, None, rows=s["rows"], share=s["share"]
            )
        )
    result["notes"].append("random-weight backbone: wall times are representative, metrics are not")
    return finish(result, args, t_start)


if __name__ == "__main__":
    main()
