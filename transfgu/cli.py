"""The ``transfgu`` command: ``run`` (one-process pipeline), ``evaluate``, ``predict``, ``report``, ``export``.

Subcommands import their module lazily so ``transfgu --help`` stays fast and a missing optional piece only affects
its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS = {
    "run": ("transfgu.cli", "run_main", "run every stage of the method in this process"),
    "evaluate": ("transfgu.evaluate_folders", "main", "score predicted label PNGs against ground truth"),
    "predict": ("transfgu.predict", "main", "label new images with a trained checkpoint"),
    "report": ("transfgu.report", "main", "write the visual HTML report of a run directory"),
    "export": ("transfgu.export", "main", "export a trained model (backbone + decoder) for deployment"),
    "import-decoder": ("transfgu.import_reference", "main", "make a model from an authors' decoder checkpoint"),
}


def run_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="transfgu run", description=SUBCOMMANDS["run"][2])
    p.add_argument("--config", "-c", default=None, help="YAML preset (see conf/); defaults if omitted")
    p.add_argument("--only", nargs="*", default=None, help="run only these stages")
    p.add_argument("--force", nargs="*", default=(), help="re-run these stages even if done")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2")
    args = p.parse_args(argv)
    from transfgu.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from transfgu.pipeline import run_pipeline

    try:
        run_pipeline(cfg, only=args.only, force=args.force)
    except ConfigError as exc:  # preflight: data, weights, device, window layout
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_outputs(cfg.run_dir)
    return 0


def print_outputs(run_dir) -> None:
    from pathlib import Path

    run_dir = Path(run_dir)
    print(f"run directory:  {run_dir.resolve()}")
    for label, rel in (("metrics:", "eval/metrics.json"), ("report:", "report/index.html"),
                       ("model:", "model"), ("mlflow store:", "mlflow.db")):
        path = run_dir / rel if rel != "mlflow.db" else run_dir.parent / rel
        if path.exists():
            print(f"{label:15} {path.resolve()}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: transfgu {" + ",".join(SUBCOMMANDS) + "} ...\n")
        for name, (_, _, doc) in SUBCOMMANDS.items():
            print(f"  {name:10} {doc}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)}", file=sys.stderr)
        return 2
    module, func, _ = SUBCOMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
