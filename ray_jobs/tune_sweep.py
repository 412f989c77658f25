"""Ray Tune sweep over K, the beta set, omega1 (train.w_div), omega2 (train.w_unc) and lr with ASHA.

    python ray_jobs/tune_sweep.py --config conf/demo_camvid.yaml --name sweep1 --num-samples 8 train.epochs=4

Objective: val mIoU (reported once per epoch). Trials that share betas reuse the features; trials that share betas
and K reuse the concepts and the label bank (<run.root>/<name>/cache). MLflow: a parent run "sweep <name>" with one
child per trial; the best config is logged on the parent and written to <run.root>/<name>/best.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Import the transfgu next to this script (the uploaded working dir under `ray job submit`), not another install.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transfgu.distributed.entry import parse, print_outputs  # noqa: E402


def _extra(p) -> None:
    p.add_argument("--name", default="sweep", help="sweep name (directory under run.root)")
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--max-concurrent", type=int, default=0, help="0 = as many as the cluster fits")
    p.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop a trial")
    p.add_argument("--metric", default="val_mIoU")
    p.add_argument("--mode", default="max", choices=("max", "min"))


def main(argv=None) -> int:
    from transfgu.distributed.tune import best_trial_config, run_sweep

    cfg, args = parse(argv, __doc__, _extra)
    summary = run_sweep(cfg, name=args.name, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                        metric=args.metric, mode=args.mode, grace_period=args.grace_period)
    print(json.dumps(summary, indent=2))
    best = best_trial_config(cfg, summary)
    if best is None:
        print(f"no trial finished: see {summary['sweep_dir']}", file=sys.stderr)
        return 1
    print(f"{'best trial:':15} {summary['best_trial']} ({args.metric} {summary['best_metric']:.4f})")
    print_outputs(best)
    if summary.get("registered_model"):
        print(f"{'registered:':15} models:/{summary['registered_model']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
