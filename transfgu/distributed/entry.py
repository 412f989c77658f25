"""Command-line plumbing shared by the thin entry points in ``ray_jobs/``.

``python ray_jobs/<job>.py --config conf/X.yaml key=value ...`` parses the preset and dotted overrides with
:func:`transfgu.config.load_config` (a bad key fails before Ray starts), joins or starts Ray, runs its stages with
skip-if-done, and prints where the results are.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from transfgu.config import Config, ConfigError, load_config


def parser(description: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", default=None, help="YAML preset (see conf/); defaults if omitted")
    p.add_argument("--force", nargs="*", default=(), help="re-run these stages even if done")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=2 ray.num_workers=2")
    return p


def parse(argv: Sequence[str] | None, description: str | None,
          extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Config, argparse.Namespace]:
    p = parser(description)
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    _warn_relative_paths(cfg)
    return cfg, args


def _warn_relative_paths(cfg: Config) -> None:
    """Under ``ray job submit`` the working dir is a temporary copy: relative roots would point inside it."""
    if "runtime_resources" not in str(Path.cwd()):
        return
    for key, path in (("data.root", cfg.data.root), ("run.root", cfg.run.root)):
        if not Path(path).is_absolute():
            print(f"warning: {key}={path} is relative to the job's temporary working dir {Path.cwd()}; "
                  f"pass an absolute path every node can see (e.g. {key}=/mnt/efs/...)", file=sys.stderr)


def print_outputs(cfg: Config) -> None:
    """Where the run's metrics, report, model and MLflow store are."""
    from transfgu.tracking import resolve_tracking_uri

    run_dir = Path(cfg.run_dir).resolve()
    print(f"run directory:  {run_dir}")
    for label, rel in (("metrics:", "eval/metrics.json"), ("report:", "report/index.html"), ("model:", "model"),
                       ("manifest:", "_manifest.json")):
        if (run_dir / rel).exists():
            print(f"{label:15} {run_dir / rel}")
    if cfg.mlflow.enabled:
        uri = resolve_tracking_uri(cfg)
        print(f"{'mlflow store:':15} {uri}")
        if uri.startswith("sqlite:///"):
            print(f"{'mlflow ui:':15} mlflow ui --backend-store-uri {uri}")


def main_stages(stages: Sequence[str] | None, description: str | None, argv: Sequence[str] | None = None) -> int:
    """Run ``stages`` (None = all, plus the report) of the Ray pipeline and print the outputs."""
    from transfgu.distributed.pipeline import run_pipeline_ray

    cfg, args = parse(argv, description)
    try:
        manifest: dict[str, Any] = run_pipeline_ray(cfg, only=stages, force=args.force)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, rec in manifest["stages"].items():
        extra = rec.get("extra", {})
        print(f"{name:12} {rec.get('status', '?'):8} rows={rec.get('rows')} seconds={extra.get('seconds')}")
    print_outputs(cfg)
    return 0
