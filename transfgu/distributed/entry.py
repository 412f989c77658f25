"""What the thin entry points in ``ray_jobs/`` share: ``transfgu run --ray`` for ``ray job submit``.

``python ray_jobs/<job>.py --config conf/X.yaml key=value ...`` parses the preset and dotted overrides exactly as
``transfgu run`` does (:func:`transfgu.cli.parse_run_args`: a bad key fails before Ray starts), joins or starts
Ray, runs its stages with skip-if-done, and prints where the results are (:func:`transfgu.cli.print_outputs`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from transfgu.cli import check_stage_names, execute, parse_run_args, print_outputs, refuse
from transfgu.config import Config, ConfigError

__all__ = ["main_stages", "parse", "print_outputs"]


def parse(argv: Sequence[str] | None, description: str | None,
          extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Config, argparse.Namespace]:
    """Arguments of a ``ray_jobs/`` script: ``transfgu run``'s, without ``--ray`` (always Ray) and ``--only``."""
    try:
        cfg, args = parse_run_args(argv, Path(sys.argv[0]).name, description, ray_flag=False, extra=extra)
    except ConfigError as exc:
        raise SystemExit(refuse(exc)) from None
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


def main_stages(stages: Sequence[str] | None, description: str | None, argv: Sequence[str] | None = None) -> int:
    """Run ``stages`` (None = all, plus the report) with the Ray executor and print the outputs."""
    cfg, args = parse(argv, description)
    try:
        check_stage_names(cfg, stages, "--only")
    except ConfigError as exc:  # a job script of one method's stage run with another method
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return execute(cfg, ray=True, only=stages, force=args.force, verbose=args.verbose)
