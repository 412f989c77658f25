"""Run every benchmark, each in its own process (so peak-RSS figures are per bench), and summarise.

``python -m bench.run_all [--quick] [--device cpu|cuda] [--out-dir bench_results] [--only a,b] [-- extra args]``
writes ``<out-dir>/<bench>.json`` per bench and ``<out-dir>/summary.json`` (every comparison of every bench).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import print_table

#: Benchmarks in pipeline order (cost_model last: it reads the others' results when present).
BENCHES = (
    "crop_embedding",
    "kmeans",
    "pseudo_labels",
    "training",
    "storage",
    "end_to_end",
    "throughput",
    "train_input",
    "cost_model",
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=Path("bench_results"))
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHES))
    args = p.parse_args(argv)
    names = [n for n in BENCHES if args.only is None or n in args.only.split(",")]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"benches": {}, "failed": []}
    for name in names:
        out = str(args.out_dir / f"{name}.json")
        cmd = [sys.executable, "-m", f"bench.{name}", "--device", args.device, "--out", out]
        if args.quick:
            cmd.append("--quick")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if name == "cost_model":
            cmd += ["--results-dir", str(args.out_dir)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            summary["failed"].append(
                {"bench": name, "returncode": proc.returncode, "stderr": proc.stderr[-4000:]}
            )
            print(f"bench.{name} FAILED ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        res = json.loads((args.out_dir / f"{name}.json").read_text())
        summary["benches"][name] = {
            "wall_s": time.perf_counter() - t0,
            "comparisons": res["comparisons"],
            "machine": res["machine"],
            "quick": res["quick"],
        }
        print_table(res)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["failed"]:
        raise SystemExit(
            f"{len(summary['failed'])} bench(es) failed: {[f['bench'] for f in summary['failed']]}"
        )
    return summary


if __name__ == "__main__":
    main()
